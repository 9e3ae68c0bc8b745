"""A daemon thread running one object's ``run()`` until :meth:`stop`: the base of the worker-side loops.

The outbox relay and the done-row pruner each run in the worker's main
process (bootsteps) and stop on shutdown; their loops wait on
``stopping`` so that a stop is noticed at once.
"""
from __future__ import annotations

import threading


class BackgroundLoop:
    """``start()`` runs :meth:`run` in a daemon thread; ``stop()`` sets ``stopping`` and joins it."""

    #: The thread's name, as it shows in py-spy, faulthandler and thread dumps.
    thread_name = "websauna_tasks-loop"

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name=self.thread_name, daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 15.0) -> None:
        self.stopping.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout)

    def run(self) -> None:  # pragma: no cover - every subclass has its own
        raise NotImplementedError
