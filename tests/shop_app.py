"""A Celery project of its own that adds qmover's tasks and beat entries.

SHOP_BROKER_URL: its broker (Redis or RabbitMQ); SHOP_RESULT_BACKEND: its
result backend, none when unset; SHOP_REDBEAT_URL: the Redis of its beat's
lock, when its beat runs celery-redbeat's scheduler.
"""

import os

from celery import Celery

import qmover.tasks

app = Celery("shop", broker=os.environ["SHOP_BROKER_URL"], backend=os.environ.get("SHOP_RESULT_BACKEND"))
app.conf.beat_schedule = {}
if os.environ.get("SHOP_REDBEAT_URL"):
    app.conf.redbeat_redis_url = os.environ["SHOP_REDBEAT_URL"]
qmover.tasks.attach(app, os.environ["SHOP_QMOVER_CONFIG"])


@app.task
def add(x: int, y: int) -> int:
    return x + y
