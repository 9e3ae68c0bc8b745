"""Beat schedule entries: cron strings and validation.

The INI and ``@task(periodic=...)`` may give a schedule as ``timedelta``, a
number of seconds, a ``crontab(...)``/``schedule(...)`` object or a
five-field cron string. Celery only understands the objects, so strings are
turned into ``crontab`` here, and malformed entries are refused before beat
starts rather than when the first tick fires.

An interval (a number of seconds, a ``timedelta``, ``schedule(run_every=...)``)
must be a finite number of seconds from :data:`MIN_INTERVAL_SECONDS` to
:data:`MAX_INTERVAL_SECONDS`: below the floor beat sends the task in a busy
loop (``0.0000001`` rounds to no interval at all), and above the ceiling
beat's date arithmetic overflows.
"""
from __future__ import annotations

import copy
import math
import typing as t
from datetime import timedelta

from celery.schedules import crontab, schedule
from pyramid.exceptions import ConfigurationError

_CRON_FIELDS = ("minute", "hour", "day_of_month", "month_of_year", "day_of_week")

#: Shortest interval between two runs of a periodic task, in seconds.
MIN_INTERVAL_SECONDS = 1.0
#: Longest interval, in seconds (100 years): beat adds it to the last run's datetime.
MAX_INTERVAL_SECONDS = 100 * 365 * 24 * 3600.0


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
        _check_interval(value, value, where)
        return timedelta(seconds=value)
    if isinstance(value, timedelta):
        _check_interval(value.total_seconds(), value, where)
        return value
    if isinstance(value, crontab):
        return value
    if isinstance(value, schedule):
        run_every = getattr(value, "run_every", None)
        if not isinstance(run_every, timedelta):
            raise ConfigurationError(f"{where}: an interval must be positive, got {_shown(value)}")
        _check_interval(run_every.total_seconds(), value, where)
        return value
    raise ConfigurationError(f"{where}: expected a timedelta, seconds, crontab() or cron string, got {value!r}")


def _check_interval(seconds: int | float, value: t.Any, where: str) -> None:
    # Compared before any timedelta is built: timedelta(seconds=nan) is a ValueError and
    # timedelta(seconds=10**37) an OverflowError, neither of which names the entry.
    if isinstance(seconds, float) and not math.isfinite(seconds):
        raise ConfigurationError(f"{where}: an interval must be a finite number of seconds, got {_shown(value)}")
    if seconds <= 0:
        raise ConfigurationError(f"{where}: an interval must be positive, got {_shown(value)}")
    if seconds < MIN_INTERVAL_SECONDS:
        raise ConfigurationError(f"{where}: an interval must be at least {MIN_INTERVAL_SECONDS:g} second "
                                 f"(beat would send the task in a busy loop), got {_shown(value)}")
    if seconds > MAX_INTERVAL_SECONDS:
        raise ConfigurationError(f"{where}: an interval must be at most {MAX_INTERVAL_SECONDS:.0f} seconds "
                                 f"(100 years), got {_shown(value)}")


def _shown(value: t.Any) -> str:
    if isinstance(value, schedule):  # its own repr, "<freq: now>", hides the interval
        return f"schedule(run_every={getattr(value, 'run_every', None)!r})"
    try:
        text = repr(value)
    except ValueError:  # an int past Python's int-to-text digit limit
        return f"an integer of {value.bit_length()} bits"
    return text if len(text) <= 200 else text[:200] + "..."


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
        _check_call_arguments(normalized, where, "'args'", "'kwargs'", "'options'")
        result[name] = normalized
    return result


def _check_call_arguments(entry: dict[str, t.Any], where: str, args: str, kwargs: str, options: str) -> None:
    # The labels are what the user wrote: 'args' in the INI, periodic_args in code.
    if "args" in entry and not isinstance(entry["args"], (list, tuple)):
        raise ConfigurationError(f"{where}: {args} must be a list")
    if "kwargs" in entry and not isinstance(entry["kwargs"], dict):
        raise ConfigurationError(f"{where}: {kwargs} must be a dict")
    if "options" in entry and not isinstance(entry["options"], dict):
        raise ConfigurationError(f"{where}: {options} must be a dict")


def periodic_entry(task_name: str, periodic: t.Any, args: t.Any = None, kwargs: t.Any = None,
                   options: t.Any = None, where: str = "periodic") -> dict[str, t.Any]:
    """The ``beat_schedule`` entry of ``@task(periodic=..., periodic_args=...)``.

    Validated like an INI entry; errors start with ``where`` (which names the
    task). The schedule object is a copy: a ``crontab`` caches the timezone
    of the first Celery app that evaluates it and beat assigns its app to
    it, so one object declared in a module must not be shared by the apps
    of two configurators.
    """
    value = normalize_schedule(periodic, f"{where}: periodic")
    entry: dict[str, t.Any] = {"task": task_name, "schedule": copy.copy(value)}
    for key, given in (("args", args), ("kwargs", kwargs), ("options", options)):
        if given is not None:
            entry[key] = given
    _check_call_arguments(entry, where, "periodic_args", "periodic_kwargs", "periodic_options")
    # Copies, so a caller mutating its list or dict later cannot change the schedule.
    for key in ("args", "kwargs", "options"):
        if key in entry:
            entry[key] = copy.deepcopy(entry[key])
    return entry
