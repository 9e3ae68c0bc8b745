"""The one background-thread helper (websauna_tasks.threads): start, wake, stop, and a fork's lazy restart."""
from __future__ import annotations

import os
import threading

from websauna_tasks.testing import wait_for
from websauna_tasks.threads import BackgroundLoop


class Counter(BackgroundLoop):
    """Counts its wake-ups; holds work (``pending``) that it finishes before it stops."""

    thread_name = "test-counter"

    def __init__(self, name: str | None = None):
        super().__init__(name)
        self.woken = 0
        self.pending = 0
        self.done = 0
        self.forks = 0

    def run(self) -> None:
        while True:
            if self.pending:
                self.pending -= 1
                self.done += 1
                continue
            if self.stopping.is_set():
                return
            if self.wait(30):
                self.woken += 1

    def forked(self) -> None:
        self.forks += 1
        self.pending = 0


def test_ensure_running_starts_one_named_thread_and_wake_cuts_its_wait_short():
    loop = Counter("test-counter-a")
    assert not loop.running and not loop.started_here
    loop.ensure_running()
    loop.ensure_running()
    thread = loop.thread
    assert loop.running and thread.name == "test-counter-a" and thread.daemon
    assert [t for t in threading.enumerate() if t.name == "test-counter-a"] == [thread]
    loop.wake()
    wait_for(lambda: loop.woken == 1, timeout=5)
    loop.stop(timeout=5)
    assert not thread.is_alive()


def test_stop_lets_the_loop_finish_the_work_it_holds():
    loop = Counter()
    loop.start()
    loop.pending = 3
    loop.stop(timeout=5)
    assert not loop.thread.is_alive() and loop.done == 3


def test_a_forked_child_forgets_the_parents_work_and_starts_a_thread_of_its_own():
    loop = Counter()
    loop.ensure_running()
    parent_thread = loop.thread
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe and the exit code only
        code = 1
        try:
            os.close(read)
            inherited = loop.running
            loop.pending = 5  # the parent's, as far as the child is concerned
            loop.ensure_running()
            ok = (not inherited and loop.forks == 1 and loop.running and loop.thread is not parent_thread
                  and loop.done == 0)
            loop.stop(timeout=5)
            os.write(write, b"ok" if ok and not loop.thread.is_alive() else b"no")
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read, "rb") as child:
        assert child.read() == b"ok"
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent's thread is untouched, and still its own.
    assert loop.running and loop.thread is parent_thread and loop.forks == 0
    loop.stop(timeout=5)
