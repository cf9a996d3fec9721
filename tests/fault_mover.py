"""Move one batch of the config's first route and die hard at a fault point.

Usage: python fault_mover.py CONFIG POINT[@N], POINT being a name the move
protocol reports (before_target_commit, after_target_commit); the move loop
moves batch after batch and dies the Nth time (default: the first) POINT
is reported.  os._exit
skips every cleanup, like a killed process: the servers see the connection
drop with whatever transaction was open.
"""

import os
import sys

from qmover.config import load_config
from qmover.protocol.mover import Mover

CRASH_EXIT = 17


def crash_at(point: str, nth: int = 1):
    seen = 0

    def fault(_route, name: str) -> None:
        nonlocal seen
        seen += name == point
        if seen == nth:
            os._exit(CRASH_EXIT)
    return fault


if __name__ == "__main__":
    config, point = sys.argv[1], sys.argv[2]
    point, _, nth = point.partition("@")
    Mover().move(load_config(config).select()[:1], budget=60, checkpoint=crash_at(point, int(nth or 1)))
    sys.exit(0)
