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
  and the setting; unless the app stores large payloads
  (``websauna_tasks.payload_store_threshold_bytes``, claim_check.py), whose
  own limit the send pipeline applies then;
- a non-finite number (``NaN``, ``Infinity``) is a :class:`ValueError`
  naming the argument: Python's JSON writes them, but they are not JSON,
  and a worker in another language, PostgreSQL's ``json`` type or a
  dashboard reading the message would choke on them;
- an argument nested more than :data:`MAX_NESTING_DEPTH` lists or dicts deep
  is a :class:`TypeError` naming it. The bound sits far below what the
  JSON encoder, the worker's decoder and a prefork pool's pickling can
  carry: a payload a few hundred levels deep passes JSON but makes the pool
  raise ``RecursionError`` while it hands the message to a child. The
  worker's intake (intake.py) refuses deeper message bodies with the same
  bound.

Both are raised before a ``unique_name`` is claimed or a message scheduled,
so nothing is sent and nothing is left behind. Messages with a serializer
other than JSON (set on purpose, in code) are not checked.
"""
from __future__ import annotations

import json
import typing as t

from kombu.utils.json import dumps as kombu_dumps

from .state import find_state

if t.TYPE_CHECKING:
    from celery import Celery

#: Setting: largest JSON payload (args and kwargs) a task message may carry, in bytes.
MAX_PAYLOAD_KEY = "websauna_tasks.max_payload_bytes"
DEFAULT_MAX_PAYLOAD_BYTES = 512 * 1024
# The C encoder with default arguments: the common small message of plain
# types costs about 1 us; kombu's encoder (about 2 us) only when it is needed.
_plain_dumps = json.JSONEncoder(ensure_ascii=True, check_circular=True, allow_nan=False).encode


# What the json module says of NaN and infinities when allow_nan is off.
_NON_FINITE_MESSAGE = "Out of range float values are not JSON compliant"

#: Deepest nesting of lists and dicts an argument may have (``[[1]]`` is 2).
MAX_NESTING_DEPTH = 64


class PayloadTooLarge(ValueError):
    """A task's arguments encode to more than ``websauna_tasks.max_payload_bytes``."""


def configure_payload_limit(registry: t.Any, app: Celery) -> int:
    """``websauna_tasks.max_payload_bytes`` (0: no limit) of ``app``, as the settings layer parsed it."""
    return payload_limit(app)


def payload_limit(app: t.Any) -> int:
    """The app's ``max_payload_bytes``; the default for a Celery app that ``includeme`` did not build."""
    state = find_state(app)
    return state.settings.max_payload_bytes if state is not None else DEFAULT_MAX_PAYLOAD_BYTES


def check_task_payload(task: t.Any, args: t.Any, kwargs: t.Any, options: t.Mapping[str, t.Any]) -> int:
    """``apply_async``'s check: JSON-encodable arguments within the app's size limit; their size (0: not JSON)."""
    serializer = options.get("serializer") or task.serializer
    if serializer != "json":
        return 0
    dump = getattr(task, "_dump_pydantic_arguments", None)
    if dump is not None:  # Celery dumps pydantic models itself before encoding
        args, kwargs = dump(tuple(args or ()), dict(kwargs or {}))
    return check_payload(task.app, task.name, args, kwargs)


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
            text = kombu_dumps(value, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            _raise_naming_argument(label, args, kwargs, exc)
    except RecursionError as exc:
        _raise_naming_argument(label, args, kwargs, exc)
    if kwargs and not all(type(key) is str for key in kwargs):
        # JSON would quietly turn them into strings; the worker's call would fail.
        _raise_naming_argument(label, args, kwargs, TypeError("keywords must be strings"))
    # Fewer brackets than the bound cannot nest deeper than it: the count is
    # C-fast, and only a payload that could be too deep is walked.
    if text.count("[") + text.count("{") > MAX_NESTING_DEPTH:
        _check_depth(label, args, kwargs)
    size = len(text)  # ensure_ascii: characters are bytes
    limit = payload_limit(app)
    if limit and size > limit and not stores_payloads(app):
        raise PayloadTooLarge(
            f"{label}: the arguments encode to {size} bytes of JSON, more than {MAX_PAYLOAD_KEY} = {limit}; "
            "store large data elsewhere (a database row, object storage) and pass its id")
    return size


def plain_json(value: t.Any) -> str | None:
    """``value`` as kombu's JSON writes it, when the C encoder alone can write it (plain types); else None.

    kombu's encoder is the json module's with a ``default`` for other types
    (datetime, Decimal, UUID...): for a value that needs none, both write
    the same text. NaN and infinities give None (kombu writes them).
    """
    try:
        return _plain_dumps(value)
    except (TypeError, ValueError, RecursionError):
        return None


def stores_payloads(app: t.Any) -> bool:
    """True when ``app`` stores payloads over its threshold (claim_check.py) instead of refusing them here."""
    state = find_state(app)
    claim_check = state.claim_check if state is not None else None
    return claim_check is not None and bool(claim_check.threshold)


def nesting_exceeds(value: t.Any, limit: int) -> bool:
    """True when ``value`` nests lists, tuples or dicts more than ``limit`` deep; never recurses."""
    stack: list[tuple[t.Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: t.Iterable[t.Any] = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        depth += 1
        if depth > limit:
            return True
        stack.extend((child, depth) for child in children if isinstance(child, (dict, list, tuple)))
    return False


def _check_depth(label: str, args: t.Any, kwargs: t.Any) -> None:
    named = [(f"argument {index + 1}", value) for index, value in enumerate(args)]
    named += [(f"keyword argument {key!r}", value) for key, value in kwargs.items()]
    for where, value in named:
        if nesting_exceeds(value, MAX_NESTING_DEPTH):
            raise TypeError(f"{label}: {where} ({type(value).__name__}) is nested more than {MAX_NESTING_DEPTH} "
                            "levels deep; a worker refuses such a message")


def _raise_naming_argument(label: str, args: t.Any, kwargs: t.Any, exc: BaseException) -> t.NoReturn:
    if not isinstance(args, (list, tuple)):
        raise TypeError(f"{label}: args must be a list or tuple, got {type(args).__name__}") from None
    if not isinstance(kwargs, dict):
        raise TypeError(f"{label}: kwargs must be a dict, got {type(kwargs).__name__}") from None
    if isinstance(exc, RecursionError):
        _check_depth(label, args, kwargs)
    for index, value in enumerate(args):
        check_json_value(value, f"{label}: argument {index + 1}")
    for key, value in kwargs.items():
        if not isinstance(key, str):
            raise TypeError(f"{label}: keyword {key!r} ({type(key).__name__}) is not a string") from None
        check_json_value(value, f"{label}: keyword argument {key!r}")
    raise TypeError(f"{label}: the arguments cannot travel as JSON: {exc}") from None


def check_json_value(value: t.Any, where: str) -> None:
    """TypeError ``"<where> (<type>) cannot travel as JSON: ..."`` unless kombu's JSON encodes ``value``.

    A value holding NaN or an infinity is a ValueError instead: its type travels, its number does not.
    """
    try:
        kombu_dumps(value, allow_nan=False)
    except ValueError as exc:
        if str(exc).startswith(_NON_FINITE_MESSAGE):
            raise ValueError(f"{where} ({type(value).__name__}) holds a non-finite number (NaN or Infinity), "
                             "which JSON cannot carry; send None or a string instead") from None
        raise TypeError(f"{where} ({type(value).__name__}) cannot travel as JSON: {exc}") from None
    except (TypeError, RecursionError) as exc:
        raise TypeError(f"{where} ({type(value).__name__}) cannot travel as JSON: {exc}") from None
