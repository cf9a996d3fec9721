"""Move one batch of the config's first route and die hard at a fault point.

Usage: python fault_mover.py CONFIG POINT, POINT being a name the move
protocol reports (before_target_commit, after_target_commit).  os._exit
skips every cleanup, like a killed process: the servers see the connection
drop with whatever transaction was open.
"""

import os
import sys

from qmover.config import load_config
from qmover.mover import RouteMover

CRASH_EXIT = 17


def crash_at(point: str):
    def fault(name: str) -> None:
        if name == point:
            os._exit(CRASH_EXIT)
    return fault


if __name__ == "__main__":
    config, point = sys.argv[1], sys.argv[2]
    with RouteMover(load_config(config).select()[0], crash_at(point)) as mover:
        mover.move_one()
    sys.exit(0)
