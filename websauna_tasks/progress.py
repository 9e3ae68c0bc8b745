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
and a call with ``done == total`` (the last one) is always written.
"""
from __future__ import annotations

import dataclasses
import math
import time
import typing as t

from celery.backends.base import DisabledBackend

from .settings import DEFAULT_PROGRESS_INTERVAL_SECONDS
from .state import find_state

if t.TYPE_CHECKING:
    from celery import Celery

__all__ = ["PROGRESS", "TaskProgress", "check_progress", "report_progress", "task_progress", "MAX_NOTE_LENGTH"]

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


def report_progress(task: t.Any, done: t.Any, total: t.Any, note: t.Any = None) -> bool:
    """``task.set_progress``: check, throttle, write; True when this call was written to the backend."""
    done, total, note = check_progress(done, total, note)
    request = task.request
    task_id = getattr(request, "id", None)
    if not task_id or isinstance(task.backend, DisabledBackend):
        return False
    now = time.monotonic()
    # Kept on Celery's request context: one per run, gone when the run ends.
    last = getattr(request, _LAST_WRITE, None)
    if last is not None and done < total and now - last < _interval(task.app):
        return False
    progress = TaskProgress(task_id, done, total, note, done / total if total else None)
    task.update_state(task_id=task_id, state=PROGRESS, meta=progress.as_meta())
    setattr(request, _LAST_WRITE, now)
    return True


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
