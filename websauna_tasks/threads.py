"""The package's background threads: one helper, :class:`BackgroundLoop`, for all of them.

Four loops run beside the application's own threads:

- the outbox relay and the done-row pruner, in a worker's main process,
  started and stopped by their bootsteps (:meth:`~BackgroundLoop.start`,
  :meth:`~BackgroundLoop.stop`);
- the outbox's fast path, in any process that commits, and the keeper of
  queue concurrency leases, in any process that runs tasks: both started on
  first use (:meth:`~BackgroundLoop.ensure_running`).

A thread does not survive ``fork()``. A loop started on first use may find
itself in a child (a prefork pool's, a server's ``--preload`` workers):
``ensure_running`` notices, lets the loop forget what was its parent's
(:meth:`~BackgroundLoop.forked`) and starts a thread of the child's own.
"""
from __future__ import annotations

import atexit
import os
import threading


class BackgroundLoop:
    """:meth:`run` in a named daemon thread, with a ``wakeup`` event to cut its waits short and ``stopping``.

    A loop waits with :meth:`wait` (or on ``stopping`` itself), so that
    :meth:`stop` is noticed at once, and finishes the work it holds before it
    returns.
    """

    #: The thread's name, as it shows in py-spy, faulthandler and thread dumps.
    thread_name = "websauna_tasks-loop"
    #: Seconds an exiting interpreter gives :meth:`stop` once the thread has run, for a loop whose work in
    #: hand must not die with the process; None: the daemon thread just ends with it.
    stop_at_exit: float | None = None

    def __init__(self, name: str | None = None) -> None:
        if name is not None:
            self.thread_name = name
        self.stopping = threading.Event()
        self.wakeup = threading.Event()
        self.thread: threading.Thread | None = None
        self._pid = 0
        self._starting = threading.Lock()
        self._exit_registered = False

    @property
    def started_here(self) -> bool:
        """True when this process started the thread (one inherited through a fork does not exist)."""
        return self._pid == os.getpid()

    @property
    def running(self) -> bool:
        return self.started_here and self.thread is not None and self.thread.is_alive()

    def start(self) -> None:
        """Run :meth:`run` in a new thread of this process."""
        self._pid = os.getpid()
        self.thread = threading.Thread(target=self.run, name=self.thread_name, daemon=True)
        self.thread.start()
        if self.stop_at_exit is not None and not self._exit_registered:
            # Registered once: a forked child inherits it and, having started
            # a thread of its own, needs it as much.
            atexit.register(self.stop, self.stop_at_exit)
            self._exit_registered = True

    def ensure_running(self) -> None:
        """Start the thread unless it is running in this process: on first use, and again after a fork."""
        if self.running:
            return
        with self._starting:
            if self.running:
                return
            if self._pid and not self.started_here:
                self.forked()
            self.start()

    def forked(self) -> None:
        """In a forked child, before its own thread starts: drop what was the parent's to do."""

    def wake(self) -> None:
        self.wakeup.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep up to ``timeout`` seconds; True, the wake-up consumed, when woken or stopped before."""
        if self.wakeup.wait(timeout):
            self.wakeup.clear()
            return True
        return self.stopping.is_set()

    def stop(self, timeout: float = 15.0) -> None:
        """Ask the loop to end, and wait up to ``timeout`` seconds for its thread in this process."""
        self.stopping.set()
        self.wakeup.set()
        thread = self.thread
        if thread is not None and self.started_here and thread is not threading.current_thread():
            thread.join(timeout)

    def run(self) -> None:  # pragma: no cover - every subclass has its own
        raise NotImplementedError
