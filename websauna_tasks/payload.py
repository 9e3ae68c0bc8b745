"""Bad input refused in the caller: arguments that are not JSON, payloads that are too large.

A task message is written long after ``apply_async()`` returned when it
waits for a commit, and by then nobody can be told that an argument was a
``User`` object or a 40 MB string: the after-commit hook can only log. So
the arguments are encoded once, at dispatch, with the encoder that writes
them on the wire (kombu's JSON, which also carries ``datetime``,
``Decimal`` and ``UUID``), and:

- an argument that cannot be encoded is a :class:`TypeError` naming it (its
  position or keyword) and its type;
- a payload whose JSON text is longer than ``websauna_tasks.max_payload_bytes``
  (default 512 KiB) is a :class:`PayloadTooLarge` naming the task, the size
  and the setting.

Both are raised before a ``unique_name`` is claimed or a message scheduled,
so nothing is sent and nothing is left behind. Messages with a serializer
other than JSON (set on purpose, in code) are not checked.
"""
from __future__ import annotations

import json
import typing as t

from kombu.utils.json import dumps as kombu_dumps
from pyramid.exceptions import ConfigurationError

if t.TYPE_CHECKING:
    from celery import Celery

#: Setting: largest JSON payload (args and kwargs) a task message may carry, in bytes.
MAX_PAYLOAD_KEY = "websauna_tasks.max_payload_bytes"
DEFAULT_MAX_PAYLOAD_BYTES = 512 * 1024
#: Attribute of the Celery app holding its limit (set by includeme).
_LIMIT_ATTRIBUTE = "websauna_tasks_max_payload_bytes"

# The C encoder with default arguments: the common small message of plain
# types costs about 1 us; kombu's encoder (about 2 us) only when it is needed.
_plain_dumps = json.JSONEncoder(ensure_ascii=True, check_circular=True, allow_nan=True).encode


class PayloadTooLarge(ValueError):
    """A task's arguments encode to more than ``websauna_tasks.max_payload_bytes``."""


def configure_payload_limit(registry: t.Any, app: Celery) -> int:
    """Read ``websauna_tasks.max_payload_bytes`` (0: no limit) and keep it on the app."""
    raw = (getattr(registry, "settings", None) or {}).get(MAX_PAYLOAD_KEY)
    if raw in (None, ""):
        limit = DEFAULT_MAX_PAYLOAD_BYTES
    else:
        try:
            limit = int(str(raw).strip())
        except ValueError:
            raise ConfigurationError(f"{MAX_PAYLOAD_KEY}: expected a number of bytes, got {raw!r}") from None
        if limit < 0:
            raise ConfigurationError(f"{MAX_PAYLOAD_KEY}: must be 0 (no limit) or more, got {raw!r}")
    setattr(app, _LIMIT_ATTRIBUTE, limit)
    return limit


def payload_limit(app: t.Any) -> int:
    return getattr(app, _LIMIT_ATTRIBUTE, DEFAULT_MAX_PAYLOAD_BYTES)


def check_task_payload(task: t.Any, args: t.Any, kwargs: t.Any, options: t.Mapping[str, t.Any]) -> None:
    """``apply_async``'s check: JSON-encodable arguments within the app's size limit."""
    serializer = options.get("serializer") or task.serializer
    if serializer != "json":
        return
    dump = getattr(task, "_dump_pydantic_arguments", None)
    if dump is not None:  # Celery dumps pydantic models itself before encoding
        args, kwargs = dump(tuple(args or ()), dict(kwargs or {}))
    check_payload(task.app, task.name, args, kwargs)


def check_payload(app: t.Any, label: str, args: t.Any, kwargs: t.Any) -> int:
    """Encode ``(args, kwargs)`` once; return the size or raise TypeError / :class:`PayloadTooLarge`.

    ``label`` starts the error messages (a task name, ``defer(module:function)``).
    """
    args = () if args is None else args
    kwargs = {} if kwargs is None else kwargs
    value = (args, kwargs)
    try:
        text = _plain_dumps(value)
    except (TypeError, ValueError):
        try:
            text = kombu_dumps(value)
        except (TypeError, ValueError, RecursionError) as exc:
            _raise_naming_argument(label, args, kwargs, exc)
    except RecursionError as exc:
        _raise_naming_argument(label, args, kwargs, exc)
    if kwargs and not all(type(key) is str for key in kwargs):
        # JSON would quietly turn them into strings; the worker's call would fail.
        _raise_naming_argument(label, args, kwargs, TypeError("keywords must be strings"))
    size = len(text)  # ensure_ascii: characters are bytes
    limit = payload_limit(app)
    if limit and size > limit:
        raise PayloadTooLarge(
            f"{label}: the arguments encode to {size} bytes of JSON, more than {MAX_PAYLOAD_KEY} = {limit}; "
            "store large data elsewhere (a database row, object storage) and pass its id")
    return size


def _raise_naming_argument(label: str, args: t.Any, kwargs: t.Any, exc: BaseException) -> t.NoReturn:
    if not isinstance(args, (list, tuple)):
        raise TypeError(f"{label}: args must be a list or tuple, got {type(args).__name__}") from None
    if not isinstance(kwargs, dict):
        raise TypeError(f"{label}: kwargs must be a dict, got {type(kwargs).__name__}") from None
    for index, value in enumerate(args):
        check_json_value(value, f"{label}: argument {index + 1}")
    for key, value in kwargs.items():
        if not isinstance(key, str):
            raise TypeError(f"{label}: keyword {key!r} ({type(key).__name__}) is not a string") from None
        check_json_value(value, f"{label}: keyword argument {key!r}")
    raise TypeError(f"{label}: the arguments cannot travel as JSON: {exc}") from None


def check_json_value(value: t.Any, where: str) -> None:
    """TypeError ``"<where> (<type>) cannot travel as JSON: ..."`` unless kombu's JSON encodes ``value``."""
    try:
        kombu_dumps(value)
    except (TypeError, ValueError, RecursionError) as exc:
        raise TypeError(f"{where} ({type(value).__name__}) cannot travel as JSON: {exc}") from None
