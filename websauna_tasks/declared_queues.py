"""Declared queues as the settings give them: :class:`QueueConfig` and their parser.

Apart from queues.py, which applies them, so that the settings layer can
parse ``websauna_tasks.queues`` without importing the code that runs them:
nothing here imports the rest of the package but the literal parser.
"""
from __future__ import annotations

import difflib
import math
import typing as t
from dataclasses import dataclass

from pyramid.exceptions import ConfigurationError

from .config import parse_literal

#: The setting these come from (declared with the others in settings.py), for the error messages.
QUEUES_KEY = "websauna_tasks.queues"

_INT_OPTIONS = ("max_concurrent", "max_attempts", "max_doublings")
_NUMBER_OPTIONS = ("rate_per_second", "min_backoff_seconds", "max_backoff_seconds", "max_retry_duration_seconds")
_KNOWN_KEYS = ("name",) + _INT_OPTIONS + _NUMBER_OPTIONS
# Names people bring from djangae's CLOUD_TASKS_QUEUES and queue.yaml.
_SYNONYMS = {
    "rate_max_concurrent": "max_concurrent",
    "max_concurrent_dispatches": "max_concurrent",
    "retry_max_attempts": "max_attempts",
    "max_dispatches_per_second": "rate_per_second",
    "rate": "rate_per_second",
}


def backoff_seconds(attempt: int, min_seconds: float, max_seconds: float, max_doublings: int) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1 is the first run).

    Cloud Tasks' rule: the interval starts at ``min_seconds``, doubles
    ``max_doublings`` times, then grows linearly by the last doubled
    interval, and never exceeds ``max_seconds``. With 10, 300 and 3 doublings:
    10, 20, 40, 80, 160, 240, 300, 300...
    """
    if attempt < 1:
        raise ValueError(f"attempt numbers start at 1, got {attempt}")
    retry = attempt - 1
    # 2.0 ** 1023 is the largest finite power: a huge doubling count then
    # gives inf, which the cap turns into max_seconds, instead of an OverflowError.
    doubled = min_seconds * 2.0 ** min(retry, max_doublings, 1023)
    if retry > max_doublings:
        doubled *= retry - max_doublings + 1
    return min(doubled, max_seconds)


@dataclass(frozen=True)
class QueueConfig:
    """One declared queue. ``None`` means: no such limit."""

    name: str
    rate_per_second: float | None = None
    max_concurrent: int | None = None
    #: Runs in all: -1 unlimited, 0 and 1 never re-run, None leaves failures to the task.
    max_attempts: int | None = None
    min_backoff_seconds: float = 1.0
    # Below the Redis transport's default visibility timeout (an hour): a
    # countdown longer than that is delivered twice.
    max_backoff_seconds: float = 600.0
    max_doublings: int = 16
    #: 0: no time limit.
    max_retry_duration_seconds: float = 0.0

    @property
    def has_limits(self) -> bool:
        return self.rate_per_second is not None or self.max_concurrent is not None

    @property
    def retries(self) -> bool:
        return self.max_attempts is not None and (self.max_attempts == -1 or self.max_attempts > 1)

    def backoff(self, attempt: int) -> float:
        return backoff_seconds(attempt, self.min_backoff_seconds, self.max_backoff_seconds, self.max_doublings)

    def next_attempt_in(self, failed_attempt: int, seconds_since_first: float) -> float | None:
        """Countdown before the next attempt, or None when this queue gives up."""
        if not self.retries:
            return None
        if self.max_attempts != -1 and failed_attempt >= t.cast(int, self.max_attempts):
            return None
        delay = self.backoff(failed_attempt)
        # "Not after max_retry_duration": an attempt that would start past
        # the deadline is not sent at all.
        if self.max_retry_duration_seconds and seconds_since_first + delay > self.max_retry_duration_seconds:
            return None
        return delay


# -- parsing ---------------------------------------------------------------------------------

def _is_int(value: t.Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: t.Any) -> bool:
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


def _where(index: int, entry: t.Mapping[str, t.Any]) -> str:
    name = entry.get("name")
    return f"queue {name!r}" if isinstance(name, str) and name else f"queue #{index + 1}"


def _unknown_key_hint(key: t.Any) -> str:
    if key in _SYNONYMS:
        return f" (did you mean {_SYNONYMS[key]!r}?)"
    close = difflib.get_close_matches(str(key), _KNOWN_KEYS, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(_KNOWN_KEYS)})"


def _check_name(where: str, entry: t.Mapping[str, t.Any]) -> str:
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigurationError(f"{QUEUES_KEY}: {where}: name: a non-empty string is required")
    # ``worker -Q a,b`` splits on commas, and a name with spaces cannot be typed there.
    if name != name.strip() or any(char in name for char in ", \t\n"):
        raise ConfigurationError(f"{QUEUES_KEY}: {where}: name: must not contain commas or whitespace")
    return name


def _check_value(where: str, key: str, value: t.Any) -> t.Any:
    if key in _INT_OPTIONS and not _is_int(value):
        raise ConfigurationError(f"{QUEUES_KEY}: {where}: {key}: must be an integer, got {value!r}")
    if key in _NUMBER_OPTIONS and not _is_number(value):
        raise ConfigurationError(f"{QUEUES_KEY}: {where}: {key}: must be a number, got {value!r}")
    lowest = -1 if key == "max_attempts" else 0
    if value < lowest:
        allowed = "-1 (unlimited) or more" if key == "max_attempts" else "0 or more"
        raise ConfigurationError(f"{QUEUES_KEY}: {where}: {key}: must be {allowed}, got {value!r}")
    if key == "rate_per_second" and value == 0:
        raise ConfigurationError(f"{QUEUES_KEY}: {where}: {key}: 0 would never run a task; "
                                 "leave it out for no rate limit")
    if key == "max_concurrent" and value == 0:
        raise ConfigurationError(f"{QUEUES_KEY}: {where}: {key}: 0 would never run a task; "
                                 "leave it out for no concurrency limit")
    return float(value) if key in _NUMBER_OPTIONS else value


def _parse_entry(index: int, entry: t.Any) -> QueueConfig:
    if not isinstance(entry, dict):
        raise ConfigurationError(f"{QUEUES_KEY}: queue #{index + 1}: must be a dict, got {type(entry).__name__}")
    where = _where(index, entry)
    for key in entry:
        if key not in _KNOWN_KEYS:
            raise ConfigurationError(f"{QUEUES_KEY}: {where}: unknown key {key!r}{_unknown_key_hint(key)}")
    name = _check_name(where, entry)
    options = {key: _check_value(where, key, value) for key, value in entry.items() if key != "name"}
    queue = QueueConfig(name=name, **options)
    if queue.min_backoff_seconds > queue.max_backoff_seconds:
        raise ConfigurationError(
            f"{QUEUES_KEY}: {where}: min_backoff_seconds ({queue.min_backoff_seconds:g}) is greater than "
            f"max_backoff_seconds ({queue.max_backoff_seconds:g}"
            f"{'' if 'max_backoff_seconds' in entry else ', the default'})")
    return queue


def parse_queues(raw: t.Any) -> tuple[QueueConfig, ...]:
    """Parse and check the ``websauna_tasks.queues`` value (text, or an already built list)."""
    value = parse_literal(raw, QUEUES_KEY) if isinstance(raw, str) else raw
    if not isinstance(value, (list, tuple)):
        raise ConfigurationError(f"{QUEUES_KEY}: must be a list of dicts, got {type(value).__name__}")
    queues = tuple(_parse_entry(index, entry) for index, entry in enumerate(value))
    seen: set[str] = set()
    for queue in queues:
        if queue.name in seen:
            raise ConfigurationError(f"{QUEUES_KEY}: queue {queue.name!r}: name: declared twice")
        seen.add(queue.name)
    return queues
