"""skytools' queue_mover, rebuilt on the real python-pgq SerialConsumer.

skytools' own script is this class: a SerialConsumer whose remote batch is a
bulk insert into the target queue.  The live benchmark runs one per route as
the daemon skytools users run; the tests use it as "the other tool" that
reads and writes the pgq_ext tick position.  Needs python-pgq and skytools
(the test extra).

Usage: python -m qmover_lab.skytools_mover CONFIG          (moves until no batch is ready)
       python -m qmover_lab.skytools_mover --loop CONFIG   (the daemon: after an empty poll it sleeps loop_delay)
       python -m qmover_lab.skytools_mover CONFIG --register|--rewind|...   (skytools' own commands)
"""

import sys

import pgq


class QueueMover(pgq.SerialConsumer):
    def __init__(self, args):
        super().__init__("queue_mover3", "src_db", "dst_db", args)
        self.dst_queue_name = self.cf.get("dst_queue_name")

    def process_remote_batch(self, db, batch_id, ev_list, dst_db):
        fields = ["type", "data", "extra1", "extra2", "extra3", "extra4", "time"]
        rows = [[ev.type, ev.data, ev.extra1, ev.extra2, ev.extra3, ev.extra4, ev.time]
                for ev in ev_list]
        pgq.bulk_insert_events(dst_db.cursor(), rows, fields, self.dst_queue_name)


if __name__ == "__main__":
    args = sys.argv[1:]
    looping = args[:1] == ["--loop"]
    if looping:
        args = args[1:]
    mover = QueueMover(args)
    if looping:
        mover.set_single_loop(0)
        mover.start()  # in the foreground: no -d
    else:
        mover.set_single_loop(1)
        if len(args) > 1:  # --register, --rewind, ... handled by skytools itself
            mover.start()
        else:
            while mover.work():
                pass
