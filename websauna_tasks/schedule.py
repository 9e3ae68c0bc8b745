"""Beat schedule entries: cron strings and validation.

The INI (and, later, code) may give a schedule as ``timedelta``, a number of
seconds, a ``crontab(...)``/``schedule(...)`` object or a five-field cron
string. Celery only understands the objects, so strings are turned into
``crontab`` here, and malformed entries are refused before beat starts rather
than when the first tick fires.
"""
from __future__ import annotations

import typing as t
from datetime import timedelta

from celery.schedules import crontab, schedule
from pyramid.exceptions import ConfigurationError

_CRON_FIELDS = ("minute", "hour", "day_of_month", "month_of_year", "day_of_week")


def parse_cron(expression: str, where: str = "schedule") -> crontab:
    """``"*/5 * * * *"`` -> ``crontab(minute="*/5")`` (minute hour dom month dow)."""
    fields = expression.split()
    if len(fields) != 5:
        raise ConfigurationError(
            f"{where}: a cron string needs 5 fields (minute hour day-of-month month day-of-week), got {expression!r}"
        )
    try:
        return crontab(**dict(zip(_CRON_FIELDS, fields)))
    except Exception as exc:  # celery raises ValueError or its own ParseException
        raise ConfigurationError(f"{where}: invalid cron string {expression!r}: {exc}") from None


def normalize_schedule(value: t.Any, where: str = "schedule") -> timedelta | crontab | schedule:
    """One entry's ``schedule`` -> an object beat understands, or ConfigurationError naming ``where``."""
    if isinstance(value, str):
        return parse_cron(value, where)
    if isinstance(value, bool):
        raise ConfigurationError(f"{where}: expected a timedelta, seconds, crontab() or cron string, got {value!r}")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ConfigurationError(f"{where}: an interval must be positive, got {value!r}")
        return timedelta(seconds=value)
    if isinstance(value, timedelta):
        if value.total_seconds() <= 0:
            raise ConfigurationError(f"{where}: an interval must be positive, got {value!r}")
        return value
    if isinstance(value, crontab):
        return value
    if isinstance(value, schedule):
        # schedule(0) would make beat send the task in a busy loop.
        run_every = getattr(value, "run_every", None)
        if not isinstance(run_every, timedelta) or run_every.total_seconds() <= 0:
            raise ConfigurationError(f"{where}: an interval must be positive, got {value!r}")
        return value
    raise ConfigurationError(f"{where}: expected a timedelta, seconds, crontab() or cron string, got {value!r}")


def normalize_beat_schedule(beat_schedule: t.Any) -> dict[str, dict[str, t.Any]]:
    """Validate ``beat_schedule`` and convert cron strings, returning a new dict."""
    if not isinstance(beat_schedule, dict):
        raise ConfigurationError(f"beat_schedule must be a dict of entries, got {type(beat_schedule).__name__}")
    result: dict[str, dict[str, t.Any]] = {}
    for name, entry in beat_schedule.items():
        where = f"beat_schedule[{name!r}]"
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"{where}: entry names must be non-empty strings")
        if not isinstance(entry, dict):
            raise ConfigurationError(f"{where}: must be a dict with 'task' and 'schedule'")
        if not isinstance(entry.get("task"), str) or not entry["task"]:
            raise ConfigurationError(f"{where}: 'task' must name a task")
        if "schedule" not in entry:
            raise ConfigurationError(f"{where}: 'schedule' is missing")
        normalized = dict(entry)
        normalized["schedule"] = normalize_schedule(entry["schedule"], f"{where}['schedule']")
        if "args" in normalized and not isinstance(normalized["args"], (list, tuple)):
            raise ConfigurationError(f"{where}: 'args' must be a list")
        if "kwargs" in normalized and not isinstance(normalized["kwargs"], dict):
            raise ConfigurationError(f"{where}: 'kwargs' must be a dict")
        if "options" in normalized and not isinstance(normalized["options"], dict):
            raise ConfigurationError(f"{where}: 'options' must be a dict")
        result[name] = normalized
    return result
