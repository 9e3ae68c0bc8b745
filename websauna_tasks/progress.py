"""Progress of one run: ``self.set_progress(done, total, note=None)`` and ``task_progress(task_id)``.

One mechanism: the result backend's ``PROGRESS`` state (``update_state``),
so ``AsyncResult(task_id).info`` shows the same figures as
``task_progress``, the console and ``ws-celery INI -- progress ID``. Not
iteration.py's tables: those describe shards of one iteration, and a run's
progress lives exactly as long as its result. Without a result backend
nothing is stored (``set_progress`` still checks its arguments and returns
False). The run's result replaces the figures when it ends.

A loop may report every item: writes are throttled to one per
``websauna_tasks.progress_interval_seconds`` per run (0.5 s by default),
and a call with ``done == total`` (the last one) is always written. A
figure held back by the throttle is not lost when the loop then stalls
(a long item, a slow call): one thread per worker process (not per run)
writes the latest held figure of each run once its interval has passed,
unless a newer call wrote first. When the run ends its held figure is
dropped before Celery stores the result (:func:`end_progress`, called by
``WebsaunaTask``), so a late write can never replace the result; a task
that ignores its result has it written then instead, as its last word.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time
import typing as t

from celery.backends.base import DisabledBackend

from .settings import DEFAULT_PROGRESS_INTERVAL_SECONDS
from .state import find_state

if t.TYPE_CHECKING:
    from celery import Celery

__all__ = ["PROGRESS", "TaskProgress", "check_progress", "report_progress", "task_progress", "end_progress",
           "MAX_NOTE_LENGTH"]

logger = logging.getLogger(__name__)

#: The state a run reporting its progress is in (Celery leaves custom states to the application).
PROGRESS = "PROGRESS"
#: Longest note kept: it travels with every write.
MAX_NOTE_LENGTH = 1000

_LAST_WRITE = "_websauna_progress_written_at"


@dataclasses.dataclass(frozen=True)
class TaskProgress:
    """A run's last written figures; ``fraction`` is done / total (None when total is 0)."""

    task_id: str
    done: float
    total: float
    note: str | None
    fraction: float | None

    def as_meta(self) -> dict[str, t.Any]:
        return {"done": self.done, "total": self.total, "note": self.note, "fraction": self.fraction}


def _number(value: t.Any, what: str) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"set_progress(): {what} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"set_progress(): {what} must be finite, got {value!r}")
    if value < 0:
        raise ValueError(f"set_progress(): {what} must be >= 0, got {value!r}")
    return value


def check_progress(done: t.Any, total: t.Any, note: t.Any = None) -> tuple[float | int, float | int, str | None]:
    """The figures if they make sense: TypeError for a wrong type, ValueError for non-finite, negative, done > total."""
    done = _number(done, "done")
    total = _number(total, "total")
    if done > total:
        raise ValueError(f"set_progress(): done ({done!r}) is more than total ({total!r})")
    if note is not None:
        if not isinstance(note, str):
            raise TypeError(f"set_progress(): note must be a string or None, got {type(note).__name__}")
        if len(note) > MAX_NOTE_LENGTH:
            raise ValueError(f"set_progress(): note is longer than {MAX_NOTE_LENGTH} characters")
    return done, total, note


def _interval(app: Celery) -> float:
    state = find_state(app)
    return state.settings.progress_interval_seconds if state is not None else DEFAULT_PROGRESS_INTERVAL_SECONDS


@dataclasses.dataclass
class _Held:
    """A figure the throttle held back: written at ``due`` unless a newer call writes, or the run ends, first."""

    backend: t.Any
    task_id: str
    meta: dict[str, t.Any]
    request: t.Any  # Celery's context of the run, captured: the flushing thread has none of its own
    due: float

    def write(self) -> None:
        self.backend.store_result(self.task_id, self.meta, PROGRESS, request=self.request)
        # The run's throttle counts this write: its next call within the interval is held again.
        setattr(self.request, _LAST_WRITE, time.monotonic())


class _Flusher:
    """The process's one thread writing held figures when they fall due (made at the first hold, again after a fork)."""

    def __init__(self) -> None:
        self.condition = threading.Condition()
        self.held: dict[str, _Held] = {}
        self.thread: threading.Thread | None = None
        self.pid = 0

    def hold(self, held: _Held) -> None:
        with self.condition:
            if self.pid != os.getpid() or self.thread is None:
                # After a fork the parent's thread does not exist here, and neither do its held figures.
                self.held = {}
                self.pid = os.getpid()
                self.thread = threading.Thread(target=self._run, name="websauna_tasks-progress", daemon=True)
                self.thread.start()
            known = self.held.get(held.task_id)
            self.held[held.task_id] = held
            if known is None or held.due < known.due:
                # Waking the thread for every call of a fast loop would cost more than the writes it saves.
                self.condition.notify()

    def take(self, task_id: str) -> _Held | None:
        """Remove and return ``task_id``'s held figure: once this returns, the thread cannot write it any more."""
        with self.condition:
            return self.held.pop(task_id, None) if self.pid == os.getpid() else None

    def _run(self) -> None:
        with self.condition:
            while True:
                if not self.held:
                    self.condition.wait()
                    continue
                now = time.monotonic()
                due = [held for held in self.held.values() if held.due <= now]
                if not due:
                    self.condition.wait(min(held.due for held in self.held.values()) - now)
                    continue
                for held in due:
                    del self.held[held.task_id]
                    # Under the lock: end_progress (the run's end) waits for this write rather than race it.
                    try:
                        held.write()
                    except Exception:
                        logger.exception("websauna_tasks: writing the progress of task %s failed", held.task_id)


_flusher = _Flusher()


def report_progress(task: t.Any, done: t.Any, total: t.Any, note: t.Any = None) -> bool:
    """``task.set_progress``: check, throttle, write; True when this call was written to the backend.

    A call the throttle holds back is written by the process's flushing
    thread once the interval has passed, if no newer call was written by then.
    """
    done, total, note = check_progress(done, total, note)
    request = task.request
    task_id = getattr(request, "id", None)
    if not task_id or isinstance(task.backend, DisabledBackend):
        return False
    now = time.monotonic()
    progress = TaskProgress(task_id, done, total, note, done / total if total else None)
    # Kept on Celery's request context: one per run, gone when the run ends.
    last = getattr(request, _LAST_WRITE, None)
    interval = _interval(task.app)
    if last is not None and done < total and now - last < interval:
        # Only a run that WebsaunaTask frames has a held figure: its end (end_progress) drops it before the
        # result is stored. Any other run's figure is dropped here, as before there was a flushing thread.
        if find_state(task.app) is not None:
            _flusher.hold(_Held(task.backend, task_id, progress.as_meta(), request, last + interval))
        return False
    _flusher.take(task_id)
    task.update_state(task_id=task_id, state=PROGRESS, meta=progress.as_meta())
    setattr(request, _LAST_WRITE, now)
    return True


def end_progress(task: t.Any) -> None:
    """The run of ``task`` ends: its held figure, if any, is dropped (written when its result is ignored).

    Called before Celery stores the result, so the flushing thread never
    writes ``PROGRESS`` over it.
    """
    if not _flusher.held:
        # Nothing held in this process (read without the lock: only a run's own set_progress adds, before
        # this, and the thread only removes): most runs end here, without reading Celery's context stack.
        return
    task_id = getattr(task.request, "id", None)
    if not task_id:
        return
    held = _flusher.take(task_id)
    if held is not None and (task.ignore_result or getattr(task.request, "ignore_result", False)):
        try:
            held.write()
        except Exception:
            logger.exception("websauna_tasks: writing the progress of task %s failed", task_id)


def task_progress(task_id: str, app: Celery | None = None) -> TaskProgress | None:
    """The last figures ``task_id``'s run wrote; None when it wrote none, has ended, or there is no backend.

    ``app`` defaults to the current Celery app (the one of the current
    request or worker). The figures are also ``AsyncResult(task_id).info``
    while ``AsyncResult(task_id).state == "PROGRESS"``.
    """
    if not isinstance(task_id, str):
        raise TypeError(f"a task id is a string, got {type(task_id).__name__}")
    if not task_id or len(task_id) > 255:
        raise ValueError(f"not a task id: {task_id[:80]!r}")
    if app is None:
        from celery import current_app

        app = current_app._get_current_object()
    if isinstance(app.backend, DisabledBackend):
        return None
    meta = app.backend.get_task_meta(task_id)
    if meta.get("status") != PROGRESS or not isinstance(meta.get("result"), dict):
        return None
    info = meta["result"]
    try:
        done, total, note = check_progress(info.get("done"), info.get("total"), info.get("note"))
    except (TypeError, ValueError):
        return None  # not figures set_progress wrote
    return TaskProgress(task_id, done, total, note, done / total if total else None)
