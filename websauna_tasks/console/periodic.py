"""The periodic schedule: INI entries and ``@task(periodic=...)`` entries, in words, with their next run.

The next run of a cron entry is the schedule's next instant after now in
the app's timezone (``celery timezone``), which is beat's answer too. An
interval counts from the entry's last run, which beat keeps in its own
file: the console knows it only from the runs it saw (runs.py), and says
"unknown" otherwise rather than guess.
"""
from __future__ import annotations

import datetime
import typing as t

from celery.schedules import crontab, schedule

from ..state import find_state
from ._common import RENDERER, app_of, as_timestamp, duration, page, route
from .runs import recent_runs

if t.TYPE_CHECKING:
    from celery import Celery
    from pyramid.config import Configurator
    from pyramid.request import Request

    from ._common import ConsoleConfig


def add_views(config: Configurator, console: ConsoleConfig) -> None:
    config.add_route(route("periodic"), f"{console.prefix}/periodic")
    config.add_view(periodic_view, route_name=route("periodic"), request_method=("GET", "HEAD"),
                    permission=console.permission, renderer=f"periodic{RENDERER}")


def periodic_view(request: Request) -> dict[str, t.Any]:
    app = app_of(request)
    runs = recent_runs(request, limit=1000)
    return page(request, "periodic", "Periodic schedule", entries=periodic_entries(app, runs.items),
                timezone=str(app.timezone), runs_source=runs.source)


def periodic_entries(app: Celery, runs: t.Sequence[dict[str, t.Any]] = ()) -> list[dict[str, t.Any]]:
    state = find_state(app)
    owners = state.periodic_owners if state is not None else {}
    last_by_task: dict[str, float] = {}
    for run in runs:
        stamp = as_timestamp(run.get("finished"))
        name = run.get("task")
        if stamp is not None and isinstance(name, str) and stamp > last_by_task.get(name, 0):
            last_by_task[name] = stamp
    entries = []
    for name, entry in sorted((app.conf.beat_schedule or {}).items()):
        when = entry.get("schedule")
        last = last_by_task.get(str(entry.get("task")))
        entries.append({"name": name, "task": entry.get("task"), "source": "code" if name in owners else "INI",
                        "words": in_words(when), "next": next_run(app, when, last), "last": last,
                        "args": entry.get("args"), "kwargs": entry.get("kwargs")})
    return entries


def _interval(value: t.Any) -> float | None:
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, schedule) and not isinstance(value, crontab):
        return value.run_every.total_seconds()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def next_run(app: Celery, value: t.Any, last: float | None) -> float | None:
    """Epoch seconds of the next run, or None when it depends on a last run nobody saw."""
    now = app.now()
    if isinstance(value, crontab):
        cron = crontab(minute=value._orig_minute, hour=value._orig_hour, day_of_week=value._orig_day_of_week,
                       day_of_month=value._orig_day_of_month, month_of_year=value._orig_month_of_year, app=app)
        return (now + cron.remaining_estimate(now)).timestamp()
    seconds = _interval(value)
    if seconds is None or last is None:
        return None
    return max(last + seconds, now.timestamp())


_DAYS = {"0": "Sunday", "1": "Monday", "2": "Tuesday", "3": "Wednesday", "4": "Thursday", "5": "Friday",
         "6": "Saturday", "7": "Sunday"}
_DAYS.update({day[:3].lower(): day for day in _DAYS.values()})


def in_words(value: t.Any) -> str:
    """``every 5 seconds``, ``every 5 minutes``, ``daily at 03:30``; the cron fields when no shorter words fit."""
    seconds = _interval(value)
    if seconds is not None:
        return "every " + _every(seconds)
    if not isinstance(value, crontab):
        return str(value)
    minute, hour, dom, month, dow = (str(part) for part in (
        value._orig_minute, value._orig_hour, value._orig_day_of_month, value._orig_month_of_year,
        value._orig_day_of_week))
    cron = f"{minute} {hour} {dom} {month} {dow}"
    rest_any = dom == "*" and month == "*"
    if rest_any and dow == "*" and hour == "*":
        if minute == "*":
            return "every minute"
        if minute.startswith("*/") and minute[2:].isdigit():
            return f"every {minute[2:]} minutes"
        if minute.isdigit():
            return f"every hour at minute {int(minute)}"
    if rest_any and minute.isdigit() and hour.isdigit():
        at = f"{int(hour):02d}:{int(minute):02d}"
        if dow == "*":
            return f"daily at {at}"
        if dow.lower() in _DAYS:
            return f"every {_DAYS[dow.lower()]} at {at}"
    return f"cron {cron} (minute hour day-of-month month day-of-week)"


def _every(seconds: float) -> str:
    for size, unit in ((86400, "day"), (3600, "hour"), (60, "minute"), (1, "second")):
        if seconds >= size and (seconds / size).is_integer():
            amount = int(seconds / size)
            return f"{unit}" if amount == 1 else f"{amount} {unit}s"
    return duration(seconds)
