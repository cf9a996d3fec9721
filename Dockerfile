# qmover: worker, beat, Flower and the CLI share this image.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md celeryconfig.py ./
COPY qmover ./qmover
RUN pip install --no-cache-dir .
# qmover's app reads its Celery settings file by path (qmover.tasks.app.settings_file)
ENV QMOVER_CELERY_SETTINGS=/app/celeryconfig.py
USER nobody
ENTRYPOINT []
CMD ["qmover", "--help"]
