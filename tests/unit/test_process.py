"""What a worker process keeps between tasks, without a server: one object,
a new one in a forked child, and the parent's left untouched there."""

from __future__ import annotations

import os

from qmover.tasks import process


def test_a_forked_child_starts_with_a_process_of_its_own_and_keeps_its_parents():
    parent = process.current()
    assert process.current() is parent  # one per process
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without any cleanup of the parent's objects
        child = process.current()
        fresh = child is not parent and child.mover is not parent.mover and child.pid == os.getpid()
        kept = parent in process._parents and process.current() is child
        os.write(write, b"1" if fresh and kept else b"0")
        os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0 and os.read(read, 1) == b"1"
    os.close(read)
    assert process.current() is parent and parent not in process._parents


def test_a_process_reads_a_config_again_only_when_the_file_changes(tmp_path):
    path = tmp_path / "routes.ini"
    route = "[r]\nsrc_db = dbname=a\ndst_db = dbname=b\npgq_queue_name = q\n"
    path.write_text(route)
    state = process.Process()
    first = state.config(path)
    assert state.config(path) is first
    path.write_text("[qmover]\nmax_idle_connections = 3\n" + route)
    os.utime(path, (1, 1))  # a new modification time, whatever the clock's resolution
    second = state.config(path)
    assert second is not first and state.mover.connector.max_idle == 3
