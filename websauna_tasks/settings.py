"""Every ``websauna_tasks.*`` setting, declared once and parsed once.

:data:`SETTINGS` is the table: each setting's key, type, default, range and
meaning. ``includeme`` parses the application's settings with it into one
frozen :class:`TaskSettings` (:func:`configure_settings`), kept on the
registry (:func:`get_task_settings`); every module takes its values from
there and none reads a ``websauna_tasks.*`` key itself (a test scans the
package for such reads). docs/configuration.md's settings table is written
from :data:`SETTINGS`, and a test checks that the two agree.

The rules, the same for every setting:

- an absent or empty value means the default (one exception:
  ``websauna_tasks.defer_allowed_modules`` left empty allows no module);
- booleans are ``true/false``, ``yes/no``, ``on/off`` or ``1/0``, in any
  case, surrounding whitespace ignored; anything else is refused, since a
  mistyped ``websauna_tasks.outbox = ture`` that quietly meant "off" would
  lose the guarantee it was written for;
- numbers are finite (``nan``, ``inf``, ``1e309`` are refused), whole where
  the setting counts things, and within the setting's range;
- a dotted name must resolve to the kind of object it names;
- queue names (declared queues, ``task_default_queue``, ``task_queues``) and
  the dead-letter list must not be Redis keys that kombu or this library
  already use.

Every refusal is a :class:`pyramid.exceptions.ConfigurationError` naming the
key and the value, raised when the application starts.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import os
import re
import types
import typing as t
import urllib.parse

from pyramid.exceptions import ConfigurationError
from pyramid.path import DottedNameResolver

from .config import CONFIG_KEY, celery_config_from_settings
from .declared_queues import QueueConfig, parse_queues

if t.TYPE_CHECKING:
    from pyramid.config import Configurator


# -- the keys ---------------------------------------------------------------------------------------
# The modules that use a setting re-export its key under the name they always had
# (``websauna_tasks.outbox.OUTBOX_KEY`` is :data:`OUTBOX_KEY`).

SITE_URL_KEY = "websauna.site_url"
SECRETS_FILE_KEY = "websauna.secrets_file"
CELERY_CONFIG_KEY = CONFIG_KEY
APP_NAME_KEY = "websauna_tasks.app_name"
DBSESSION_FACTORY_KEY = "websauna_tasks.dbsession_factory"
RETRY_ATTEMPTS_KEY = "websauna_tasks.retry_attempts"
DEFER_ALLOWED_MODULES_KEY = "websauna_tasks.defer_allowed_modules"
NAME_STORE_KEY = "websauna_tasks.name_store"
NAME_RETENTION_KEY = "websauna_tasks.name_retention_seconds"
NAME_PENDING_KEY = "websauna_tasks.name_pending_seconds"
CANCEL_RETENTION_KEY = "websauna_tasks.cancel_retention_seconds"
PROGRESS_INTERVAL_KEY = "websauna_tasks.progress_interval_seconds"
QUEUES_KEY = "websauna_tasks.queues"
ALLOW_UNDECLARED_KEY = "websauna_tasks.allow_undeclared_queues"
LIMITS_REDIS_URL_KEY = "websauna_tasks.limits_redis_url"
REDIS_URL_KEY = "websauna_tasks.redis_url"
QUEUE_WAIT_SECONDS_KEY = "websauna_tasks.queue_wait_seconds"
ITERATION_TIME_BUDGET_KEY = "websauna_tasks.iteration_time_budget_seconds"
ITERATION_BATCH_SIZE_KEY = "websauna_tasks.iteration_batch_size"
ITERATION_MAX_FAILURES_KEY = "websauna_tasks.iteration_max_failures"
OUTBOX_KEY = "websauna_tasks.outbox"
OUTBOX_RETENTION_KEY = "websauna_tasks.outbox_retention_seconds"
OUTBOX_POLL_KEY = "websauna_tasks.outbox_poll_seconds"
OUTBOX_BATCH_KEY = "websauna_tasks.outbox_batch_size"
OUTBOX_IN_WORKER_KEY = "websauna_tasks.outbox_relay_in_worker"
OUTBOX_ON_COMMIT_KEY = "websauna_tasks.outbox_publish_on_commit"
REDELIVER_AFTER_KEY = "websauna_tasks.outbox_redeliver_after_seconds"
REDELIVER_MAX_KEY = "websauna_tasks.outbox_redeliver_max"
HEALTH_OUTBOX_MAX_ROWS_KEY = "websauna_tasks.health_outbox_max_rows"
HEALTH_OUTBOX_MAX_AGE_KEY = "websauna_tasks.health_outbox_max_age_seconds"
MAX_PAYLOAD_KEY = "websauna_tasks.max_payload_bytes"
MAX_MESSAGE_KEY = "websauna_tasks.max_message_bytes"
PAYLOAD_STORE_THRESHOLD_KEY = "websauna_tasks.payload_store_threshold_bytes"
PAYLOAD_STORE_MAX_KEY = "websauna_tasks.payload_store_max_bytes"
PAYLOAD_STORE_RETENTION_KEY = "websauna_tasks.payload_store_retention_seconds"
DEADLETTER_QUEUE_KEY = "websauna_tasks.deadletter_queue"
IDEMPOTENCY_RETENTION_KEY = "websauna_tasks.idempotency_retention_seconds"
IDEMPOTENCY_CREATE_TABLE_KEY = "websauna_tasks.idempotency_create_table"
UNKNOWN_TASK_GRACE_KEY = "websauna_tasks.unknown_task_grace_seconds"
UNKNOWN_TASK_RETRY_KEY = "websauna_tasks.unknown_task_retry_seconds"
IDEMPOTENCY_PRUNE_INTERVAL_KEY = "websauna_tasks.idempotency_prune_interval_seconds"
DB_OUTAGE_RETRIES_KEY = "websauna_tasks.db_outage_retries"
DB_OUTAGE_BACKOFF_MAX_KEY = "websauna_tasks.db_outage_backoff_max_seconds"
CREATE_TABLES_KEY = "websauna_tasks.create_tables"
METRICS_KEY = "websauna_tasks.metrics"
METRICS_PATH_KEY = "websauna_tasks.metrics_path"
METRICS_PERMISSION_KEY = "websauna_tasks.metrics_permission"
METRICS_PORT_KEY = "websauna_tasks.metrics_port"
METRICS_ADDRESS_KEY = "websauna_tasks.metrics_address"
METRICS_BUCKETS_KEY = "websauna_tasks.metrics_duration_buckets"
TRACING_KEY = "websauna_tasks.tracing"
CONSOLE_PREFIX_KEY = "websauna_tasks.console_prefix"
CONSOLE_PERMISSION_KEY = "websauna_tasks.console_permission"
CONSOLE_INSECURE_KEY = "websauna_tasks.console_insecure"
CONSOLE_RECENT_RUNS_KEY = "websauna_tasks.console_recent_runs"

# -- defaults the modules use by name --------------------------------------------------------------

DEFAULT_APP_NAME = "websauna_tasks"
DEFAULT_SITE_URL = "http://localhost"
DEFAULT_RETRY_ATTEMPTS = 3
DEFAULT_NAME_PENDING_SECONDS = 24 * 3600.0
#: A week: longer than any message waits in a queue, short enough not to pile up marks.
DEFAULT_CANCEL_RETENTION_SECONDS = 7 * 24 * 3600.0
#: Two writes a second at most per run: a loop reporting every item costs the backend nothing noticeable.
DEFAULT_PROGRESS_INTERVAL_SECONDS = 0.5
DEFAULT_QUEUE_WAIT_SECONDS = 1.0
DEFAULT_ITERATION_TIME_BUDGET = 570.0
DEFAULT_ITERATION_BATCH_SIZE = 100
DEFAULT_ITERATION_MAX_FAILURES = 10
DEFAULT_OUTBOX_RETENTION_SECONDS = 24 * 3600.0
DEFAULT_OUTBOX_POLL_SECONDS = 5.0
DEFAULT_OUTBOX_BATCH_SIZE = 500
DEFAULT_REDELIVER_AFTER_SECONDS = 300.0
DEFAULT_REDELIVER_MAX = 3
DEFAULT_HEALTH_OUTBOX_MAX_ROWS = 10_000
DEFAULT_HEALTH_OUTBOX_MAX_AGE_SECONDS = 600.0
DEFAULT_MAX_PAYLOAD_BYTES = 512 * 1024
#: The floor of max_message_bytes' default: a chain or a group carries more than its arguments.
MIN_DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: Below this a stored payload's row and reference cost more than the bytes they keep off the broker.
MIN_PAYLOAD_STORE_THRESHOLD_BYTES = 1024
#: Largest stored payload by default: a few of them fit in a worker's memory at once.
DEFAULT_PAYLOAD_STORE_MAX_BYTES = 32 * 1024 * 1024
#: A week, as the cancellations: longer than any message waits in a queue (plus its countdown).
DEFAULT_PAYLOAD_STORE_RETENTION_SECONDS = 7 * 24 * 3600.0
DEFAULT_DEADLETTER_QUEUE = "websauna_tasks.deadletter"
DEFAULT_IDEMPOTENCY_RETENTION_SECONDS = 7 * 24 * 3600.0
DEFAULT_IDEMPOTENCY_PRUNE_INTERVAL_SECONDS = 3600.0
DEFAULT_DB_OUTAGE_RETRIES = 10
DEFAULT_DB_OUTAGE_BACKOFF_MAX_SECONDS = 60.0
DEFAULT_METRICS_PATH = "/metrics"
DEFAULT_CONSOLE_PREFIX = "/_tasks"
#: Five minutes: a rolling deploy of a few workers is over by then (docs/deploying.md).
DEFAULT_UNKNOWN_TASK_GRACE_SECONDS = 300.0
#: Each give-back of an unknown task costs a publish; every 15 s keeps that cheap and a new worker's wait short.
DEFAULT_UNKNOWN_TASK_RETRY_SECONDS = 15.0
DEFAULT_CONSOLE_PERMISSION = "websauna_tasks.console"
DEFAULT_CONSOLE_RECENT_RUNS = 1000
DEFAULT_METRICS_ADDRESS = "127.0.0.1"
#: prometheus_client's own default buckets for a histogram of seconds, without its +Inf.
DEFAULT_METRICS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)

# Ceilings of the ranges: far above any sensible value, and low enough that the
# arithmetic done with them (datetime + timedelta, ms for Redis) cannot overflow.
_TEN_YEARS = 10 * 365 * 24 * 3600
_ONE_DAY = 24 * 3600
_ONE_GIB = 1024 ** 3

_REGISTRY_KEY = "websauna_tasks.task_settings"

# -- redis keys a queue must not be named after ------------------------------------------------------

#: kombu's Redis transport keeps unacknowledged messages under these keys (names
#: changeable with the broker transport options of the same name).
KOMBU_UNACKED_KEYS = {"unacked_key": "unacked", "unacked_index_key": "unacked_index",
                      "unacked_mutex_key": "unacked_mutex"}
#: kombu's Redis transport: exchange bindings live under ``_kombu.binding.<exchange>``.
KOMBU_KEY_PREFIX = "_kombu."
#: kombu's Redis transport names a queue's priority lists ``<queue>\\x06\\x16<priority>``.
KOMBU_PRIORITY_SEPARATOR = "\x06\x16"
#: Keys of this library: task-name claims (names.py, ``websauna_tasks:name:<app>:``) and queue
#: rate and concurrency state (queues.py, ``websauna_tasks:queue:<app>:``).
LIBRARY_KEY_PREFIX = "websauna_tasks:"


def reserved_key_reason(name: str, transport_options: t.Mapping[str, t.Any] | None = None,
                        deadletter_queue: str | None = None) -> str | None:
    """Why a queue named ``name`` would share a Redis key with kombu or this library; None when it would not."""
    options = transport_options or {}
    for option, default in KOMBU_UNACKED_KEYS.items():
        if name == str(options.get(option) or default):
            return f"kombu keeps unacknowledged messages under the Redis key {name!r}"
    if name.startswith(KOMBU_KEY_PREFIX):
        return f"kombu keeps its exchange bindings under Redis keys starting with {KOMBU_KEY_PREFIX!r}"
    if KOMBU_PRIORITY_SEPARATOR in name:
        return "kombu names a queue's priority lists with \\x06\\x16"
    if name.startswith(LIBRARY_KEY_PREFIX):
        return f"websauna_tasks keeps task names and queue limits under Redis keys starting with {LIBRARY_KEY_PREFIX!r}"
    if deadletter_queue is not None and name == deadletter_queue:
        return f"it is the dead-letter list ({DEADLETTER_QUEUE_KEY})"
    return None


# -- the kinds of value ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ParseContext:
    """What a parser may need besides its own raw value."""

    settings: t.Mapping[str, t.Any]
    package: t.Any = None


class Kind:
    """How one kind of setting is parsed and described in the docs."""

    #: The "type" column of docs/configuration.md.
    type_text: str = "text"

    def parse(self, key: str, raw: t.Any, context: ParseContext) -> t.Any:
        raise NotImplementedError

    @property
    def range_text(self) -> str:
        """The "range" column of docs/configuration.md."""
        return ""


_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


class Boolean(Kind):
    type_text = "boolean"
    range_text = "true/false, yes/no, on/off, 1/0"

    def parse(self, key: str, raw: t.Any, context: ParseContext) -> bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, (str, int)):
            text = str(raw).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
        raise ConfigurationError(f"{key}: expected true or false (true/false, yes/no, on/off, 1/0), got {raw!r}")


def _number_text(value: float) -> str:
    if float(value).is_integer():
        return str(int(value))
    return f"{value:g}"


# Plain ASCII numerals: float() alone also takes "1_000", "١٢" and words.
_NUMBER_TEXT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?", re.ASCII)
_NON_FINITE_TEXT = re.compile(r"[+-]?(nan|inf|infinity)", re.ASCII | re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Number(Kind):
    """An int or float within ``minimum``..``maximum``; ``zero_means`` allows 0 below the minimum."""

    whole: bool
    minimum: float
    maximum: float
    unit: str = ""
    zero_means: str | None = None

    @property
    def type_text(self) -> str:  # type: ignore[override]
        return "integer" if self.whole else "number"

    @property
    def range_text(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        span = f"{_number_text(self.minimum)} to {_number_text(self.maximum)}{unit}"
        return f"0 ({self.zero_means}), or {span}" if self.zero_means else span

    def parse(self, key: str, raw: t.Any, context: ParseContext) -> int | float:
        kind = "a whole number" if self.whole else "a number"
        if isinstance(raw, bool):
            raise ConfigurationError(f"{key}: expected {kind} ({self.range_text}), got {raw!r}")
        if isinstance(raw, (int, float)):
            value: int | float = raw
        elif isinstance(raw, str) and _NUMBER_TEXT.fullmatch(raw.strip()):
            text = raw.strip()
            # int() first keeps whole numbers exact; a numeral too long for int() is not finite as a float.
            try:
                value = int(text)
            except ValueError:
                value = float(text)
        elif isinstance(raw, str) and _NON_FINITE_TEXT.fullmatch(raw.strip()):
            value = float(raw.strip())
        else:
            raise ConfigurationError(f"{key}: expected {kind} ({self.range_text}), got {raw!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigurationError(f"{key}: expected a finite number ({self.range_text}), got {raw!r}")
        if self.whole:
            if isinstance(value, float) and not value.is_integer():
                raise ConfigurationError(f"{key}: expected a whole number ({self.range_text}), got {raw!r}")
            value = int(value)
        else:
            value = float(value)
        if value == 0 and self.zero_means:
            return value
        if not self.minimum <= value <= self.maximum:
            raise ConfigurationError(f"{key}: must be {self.range_text}, got {raw!r}")
        return value


#: URL schemes of a Redis server: the broker, the limits store and the name store may be one.
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def _text(key: str, raw: t.Any) -> str:
    if not isinstance(raw, str):
        raise ConfigurationError(f"{key}: expected text, got {raw!r}")
    return raw.strip()


class AppName(Kind):
    range_text = "non-empty, no whitespace"

    def parse(self, key: str, raw: t.Any, context: ParseContext) -> str:
        text = _text(key, raw)
        if any(char.isspace() for char in text):
            raise ConfigurationError(f"{key}: must not contain whitespace, got {raw!r}")
        return text


class SiteURL(Kind):
    type_text = "URL"
    range_text = "http:// or https:// with a host"

    def parse(self, key: str, raw: t.Any, context: ParseContext) -> str:
        text = _text(key, raw)
        scheme, _, rest = text.partition("://")
        if scheme.lower() not in ("http", "https") or not rest or rest.startswith("/"):
            raise ConfigurationError(f"{key}: expected an http:// or https:// URL with a host, got {raw!r}")
        return text


_URL_PASSWORD = re.compile(r"(://[^:/@]*:)[^/]*@")


def mask_password(url: str) -> str:
    """``url`` (or a line holding URLs) with each password replaced by ``**``: errors go to logs."""
    return _URL_PASSWORD.sub(r"\1**@", url)


class RedisURL(Kind):
    """A URL that redis-py can connect to, read here by redis-py itself.

    A port out of range, a query argument redis-py cannot use or a database
    that is not a number would otherwise pass startup and fail at the first
    command, in a worker, long after the deploy.
    """

    type_text = "Redis URL"
    range_text = "redis://, rediss:// or unix://"

    def parse(self, key: str, raw: t.Any, context: ParseContext) -> str:
        text = _text(key, raw)
        shown = repr(mask_password(text))
        if not text.startswith(REDIS_SCHEMES):
            raise ConfigurationError(f"{key}: expected a redis:// URL, got {shown}")
        if any(char.isspace() or not char.isprintable() for char in text):
            raise ConfigurationError(f"{key}: a Redis URL has no whitespace or control characters, got {shown}")
        from redis.connection import parse_url

        try:
            parse_url(text)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"{key}: {exc}, got {shown}") from None
        if not text.startswith("unix://"):
            # redis-py quietly uses database 0 when the path is not a number.
            database = urllib.parse.urlsplit(text).path.strip("/")
            if database and not re.fullmatch(r"[0-9]+", database, re.ASCII):
                raise ConfigurationError(f"{key}: the path of a Redis URL is the database number, got {shown}")
        return text


class SecretsFile(Kind):
    """The path of Websauna's secrets INI: a path, ``file://`` path or ``resource://package/path``.

    Only where the file is gets decided here; secrets.py reads it, so that the
    values never sit in :class:`TaskSettings`, whose repr may reach a log.
    """

    type_text = "path"
    range_text = "a readable file: path, file://path or resource://package/path"

    def parse(self, key: str, raw: t.Any, context: ParseContext) -> str:
        text = _text(key, raw)
        if text.startswith("resource://"):
            package, _, inner = text[len("resource://"):].partition("/")
            if not package or not inner:
                raise ConfigurationError(f"{key}: expected resource://package/path, got {raw!r}")
            try:
                from importlib.resources import files

                path = str(files(package).joinpath(inner))
            except Exception as exc:  # ModuleNotFoundError, TypeError for a non-package
                raise ConfigurationError(f"{key}: cannot find the package of {raw!r} ({exc})") from None
        elif text.startswith("file://"):
            path = text[len("file://"):]
        else:
            path = text
        path = os.path.abspath(os.path.expanduser(path))
        if not os.path.isfile(path):
            raise ConfigurationError(f"{key}: no such file: {path}")
        return path


class NameStore(Kind):
    type_text = "Redis URL or word"
    range_text = "redis://..., sql or memory"

    def parse(self, key: str, raw: t.Any, context: ParseContext) -> str:
        text = _text(key, raw)
        if text in ("sql", "memory") or text.startswith(REDIS_SCHEMES):
            return text
        raise ConfigurationError(f"{key}: expected a redis:// URL, 'sql' or 'memory', got {raw!r}")


class RedisKey(Kind):
    type_text = "Redis key"
    range_text = "non-empty, no surrounding whitespace, not a key in use"

    def parse(self, key: str, raw: t.Any, context: ParseContext) -> str:
        # Not stripped: "name " and "name" are two Redis keys, and the operator commands would miss one.
        if not isinstance(raw, str) or not raw.strip() or raw != raw.strip():
            raise ConfigurationError(f"{key}: expected a Redis key name, got {raw!r}")
        return raw


@dataclasses.dataclass(frozen=True)
class Choice(Kind):
    """One word out of a few, in any case; anything else is refused rather than guessed."""

    words: tuple[str, ...]
    type_text = "word"

    @property
    def range_text(self) -> str:
        return " or ".join(self.words)

    def parse(self, key: str, raw: t.Any, context: ParseContext) -> str:
        text = raw.strip().lower() if isinstance(raw, str) else None
        if text not in self.words:
            raise ConfigurationError(f"{key}: expected {self.range_text}, got {raw!r}")
        return text


class ModuleList(Kind):
    type_text = "module names"
    range_text = "dotted module names, separated by spaces or commas"

    def parse(self, key: str, raw: t.Any, context: ParseContext) -> tuple[str, ...]:
        if not isinstance(raw, str):
            raise ConfigurationError(f"{key}: expected module names, got {raw!r}")
        prefixes = tuple(part for part in raw.replace(",", " ").split() if part)
        for prefix in prefixes:
            if not all(piece.isidentifier() for piece in prefix.split(".")):
                raise ConfigurationError(f"{key}: {prefix!r} is not a module name")
        return prefixes


class URLPath(Kind):
    type_text = "path"
    range_text = "starts with /, no whitespace"

    def parse(self, key: str, raw: t.Any, context: ParseContext) -> str:
        text = _text(key, raw)
        if not text.startswith("/") or any(ch.isspace() or ord(ch) < 32 for ch in text) or "?" in text \
                or "#" in text:
            raise ConfigurationError(f"{key}: expected a URL path starting with / (no whitespace, query or "
                                     f"fragment), got {raw!r}")
        return text


class Word(Kind):
    """One token: a permission name, a host name or address."""

    def __init__(self, type_text: str, range_text: str):
        self.type_text = type_text
        self._range_text = range_text

    @property
    def range_text(self) -> str:
        return self._range_text

    def parse(self, key: str, raw: t.Any, context: ParseContext) -> str:
        text = _text(key, raw)
        if any(ch.isspace() or ord(ch) < 32 for ch in text):
            raise ConfigurationError(f"{key}: expected {self._range_text}, got {raw!r}")
        return text


class Buckets(Kind):
    type_text = "numbers"
    range_text = "increasing, finite, above 0 (seconds), separated by spaces or commas"

    def parse(self, key: str, raw: t.Any, context: ParseContext) -> tuple[float, ...]:
        parts = raw.replace(",", " ").split() if isinstance(raw, str) else raw
        try:
            values = tuple(float(part) for part in parts)
        except (TypeError, ValueError):
            raise ConfigurationError(f"{key}: expected numbers ({self.range_text}), got {raw!r}") from None
        if not values or any(not math.isfinite(value) or value <= 0 for value in values) \
                or any(later <= earlier for earlier, later in zip(values, values[1:])):
            raise ConfigurationError(f"{key}: expected numbers ({self.range_text}), got {raw!r}")
        return values


class Queues(Kind):
    type_text = "Python literal"
    range_text = "a list of dicts; see queues.md"

    def parse(self, key: str, raw: t.Any, context: ParseContext) -> tuple[QueueConfig, ...]:
        return parse_queues(raw)


class CeleryConfig(Kind):
    type_text = "Python literal"
    range_text = "a dict; parsed, never evaluated"

    def parse(self, key: str, raw: t.Any, context: ParseContext) -> t.Mapping[str, t.Any]:
        # The flat celery.* keys belong to the same configuration, so the whole mapping is read.
        config = celery_config_from_settings(context.settings)
        for name, kind in CELERY_NUMBERS.items():
            if config.get(name) is not None:
                config[name] = kind.parse(f"Celery setting {name}", config[name], context)
        for name in VISIBILITY_TIMEOUT_OPTIONS:
            options = config.get(name)
            if isinstance(options, dict) and options.get("visibility_timeout") is not None:
                where = f"Celery setting {name}['visibility_timeout']"
                options = {**options, "visibility_timeout": _VISIBILITY.parse(where, options["visibility_timeout"],
                                                                              context)}
                config[name] = options
        if config.get("visibility_timeout") is not None:
            config["visibility_timeout"] = _VISIBILITY.parse("Celery setting visibility_timeout",
                                                             config["visibility_timeout"], context)
        return config


class SessionFactory(Kind):
    """A dotted name resolving to what ``request.dbsession`` can be made with.

    Accepted: a ``sqlalchemy.orm.sessionmaker`` (its sessions are joined to
    ``request.tm`` as ours are), or a Python function or callable object that
    can be called with one argument, the request, and whose return
    annotation, when it has one, is a ``Session``. Refused: anything not
    callable, classes (a ``Session`` class would take the request for its
    bind), built-in functions (``os:getcwd``), a ``scoped_session`` (called
    without arguments, it would not see the request).
    """

    type_text = "dotted name"
    range_text = "a sessionmaker, or a function(request) -> Session"

    def parse(self, key: str, raw: t.Any, context: ParseContext) -> t.Any:
        from sqlalchemy.orm import Session, scoped_session, sessionmaker

        try:
            found = DottedNameResolver(context.package).maybe_resolve(raw)
        except Exception as exc:  # ImportError, AttributeError, ValueError, or the module's own error
            raise ConfigurationError(f"{key}: cannot import {raw!r} ({type(exc).__name__}: {exc})") from None

        def refuse(why: str) -> t.NoReturn:
            raise ConfigurationError(f"{key}: {raw!r} {why}; name a sessionmaker or a function(request) -> Session")

        if isinstance(found, sessionmaker):
            return found
        if isinstance(found, scoped_session):
            refuse("is a scoped_session, which is called without the request")
        if isinstance(found, type):
            refuse("is a class")
        if not callable(found):
            refuse(f"is not callable (a {type(found).__name__})")
        if isinstance(found, (types.BuiltinFunctionType, types.BuiltinMethodType)):
            refuse("is a built-in function")
        try:
            signature = inspect.signature(found)
        except (TypeError, ValueError):
            refuse("has no signature to check")
        try:
            signature.bind(object())
        except TypeError:
            refuse(f"cannot be called with the request alone (its signature is {signature})")
        returned = signature.return_annotation
        if isinstance(returned, str):
            try:
                returned = t.get_type_hints(found).get("return", returned)
            except Exception:  # an annotation that does not resolve says nothing either way
                pass
        if returned is not inspect.Signature.empty and isinstance(returned, type) \
                and not issubclass(returned, Session):
            refuse(f"returns {returned.__name__}, not a Session")
        return found


# -- the table --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting: key, kind, default, doc line; ``field`` is its :class:`TaskSettings` attribute."""

    key: str
    kind: Kind
    default: t.Any
    doc: str
    #: The "default" column of docs/configuration.md when the value alone would not say it.
    default_text: str | None = None

    @property
    def field(self) -> str:
        return self.key.partition(".")[2]

    @property
    def default_shown(self) -> str:
        if self.default_text is not None:
            return self.default_text
        if isinstance(self.default, bool):
            return "true" if self.default else "false"
        if isinstance(self.default, (int, float)):
            return _number_text(self.default)
        return str(self.default)


def _seconds(minimum: float, maximum: float, zero_means: str | None = None) -> Number:
    return Number(whole=False, minimum=minimum, maximum=maximum, unit="seconds", zero_means=zero_means)


def _count(minimum: int, maximum: int, unit: str = "", zero_means: str | None = None) -> Number:
    return Number(whole=True, minimum=minimum, maximum=maximum, unit=unit, zero_means=zero_means)


#: Celery settings that Celery takes without a word and fails on later: a negative prefetch makes a
#: worker that never consumes, a word a traceback at start, a NaN visibility timeout a worker that
#: stops on Redis' reply. Checked at start like ours (None keeps Celery's default).
CELERY_NUMBERS: dict[str, Number] = {
    "worker_prefetch_multiplier": _count(1, 100_000, zero_means="no limit"),
    "worker_concurrency": _count(1, 100_000, zero_means="one per CPU"),
    "worker_max_tasks_per_child": _count(1, 10**12, zero_means="no limit"),
    "worker_max_memory_per_child": _count(1, 10**12, unit="KiB", zero_means="no limit"),
    "task_time_limit": _seconds(0.001, _TEN_YEARS, zero_means="no limit"),
    "task_soft_time_limit": _seconds(0.001, _TEN_YEARS, zero_means="no limit"),
}
#: Where a Redis visibility timeout may be set (reliability.py compares them).
VISIBILITY_TIMEOUT_OPTIONS = ("broker_transport_options", "result_backend_transport_options")
_VISIBILITY = _seconds(1, _TEN_YEARS)


SETTINGS: tuple[Setting, ...] = (
    Setting(SITE_URL_KEY, SiteURL(), DEFAULT_SITE_URL,
            "base URL for request.route_url() inside tasks"),
    Setting(SECRETS_FILE_KEY, SecretsFile(), "",
            "Websauna's secrets INI, read by get_secrets(registry)", default_text="none"),
    Setting(CELERY_CONFIG_KEY, CeleryConfig(), None,
            "the Celery settings (with the flat celery.* keys)", default_text="Celery's, plus ours"),
    Setting(APP_NAME_KEY, AppName(), DEFAULT_APP_NAME, "the Celery app's main name"),
    Setting(DBSESSION_FACTORY_KEY, SessionFactory(), None,
            "what request.dbsession is made with, replacing ours", default_text="ours, from sqlalchemy.*"),
    Setting(RETRY_ATTEMPTS_KEY, _count(1, 1000), DEFAULT_RETRY_ATTEMPTS,
            "attempts in all of a RetryableTransactionTask without its own retry_attempts, and of retryable(tm=...)"),
    Setting(DEFER_ALLOWED_MODULES_KEY, ModuleList(), None,
            "module prefixes whose functions defer() may run (empty: only @deferrable ones)",
            default_text="the app's package"),
    Setting(NAME_STORE_KEY, NameStore(), "",
            "where task-name claims live", default_text="the Redis broker, else sql, else memory"),
    Setting(NAME_RETENTION_KEY, _seconds(0, _TEN_YEARS), 0.0,
            "how long a name stays taken after its task ran"),
    Setting(NAME_PENDING_KEY, _seconds(0, _TEN_YEARS), DEFAULT_NAME_PENDING_SECONDS,
            "how long a claim of a task that never runs is kept, plus any countdown"),
    Setting(CANCEL_RETENTION_KEY, _seconds(1, _TEN_YEARS), DEFAULT_CANCEL_RETENTION_SECONDS,
            "how long cancel() keeps a task id marked cancelled"),
    Setting(PROGRESS_INTERVAL_KEY, _seconds(0, 3600), DEFAULT_PROGRESS_INTERVAL_SECONDS,
            "least time between two progress writes of one run (the last one is always written)"),
    Setting(QUEUES_KEY, Queues(), None, "the declared queues", default_text="none declared"),
    Setting(ALLOW_UNDECLARED_KEY, Boolean(), False, "let tasks go to queues that are not declared"),
    Setting(LIMITS_REDIS_URL_KEY, RedisURL(), "",
            "Redis for queue rate and concurrency limits", default_text="the broker, when it is Redis"),
    Setting(REDIS_URL_KEY, RedisURL(), "",
            "the Redis of get_redis(request)", default_text="the broker, when it is Redis"),
    Setting(QUEUE_WAIT_SECONDS_KEY, _seconds(0, 3600), DEFAULT_QUEUE_WAIT_SECONDS,
            "how long a worker waits for a queue slot before re-queueing the task"),
    Setting(ITERATION_TIME_BUDGET_KEY, _seconds(0, _ONE_DAY), DEFAULT_ITERATION_TIME_BUDGET,
            "a shard re-defers itself after working this long"),
    Setting(ITERATION_BATCH_SIZE_KEY, _count(1, 1_000_000, "rows"), DEFAULT_ITERATION_BATCH_SIZE,
            "rows per transaction in a shard"),
    Setting(ITERATION_MAX_FAILURES_KEY, _count(1, 10_000), DEFAULT_ITERATION_MAX_FAILURES,
            "failures in a row without progress before a shard is marked failed"),
    Setting(OUTBOX_KEY, Boolean(), False,
            "write on-commit messages to the outbox table in the request's transaction"),
    Setting(OUTBOX_RETENTION_KEY, _seconds(0, _TEN_YEARS), DEFAULT_OUTBOX_RETENTION_SECONDS,
            "how long a sent outbox row is kept"),
    Setting(OUTBOX_POLL_KEY, _seconds(0.01, 3600), DEFAULT_OUTBOX_POLL_SECONDS,
            "how often the relay looks at the table when nothing wakes it"),
    Setting(OUTBOX_BATCH_KEY, _count(1, 100_000, "rows"), DEFAULT_OUTBOX_BATCH_SIZE,
            "rows claimed and published per relay transaction"),
    Setting(OUTBOX_IN_WORKER_KEY, Boolean(), True, "run a relay thread in each worker's main process"),
    Setting(OUTBOX_ON_COMMIT_KEY, Boolean(), True, "publish a transaction's rows right after its commit"),
    Setting(REDELIVER_AFTER_KEY, _seconds(0, _TEN_YEARS), DEFAULT_REDELIVER_AFTER_SECONDS,
            "a sent row of an idempotent task without its done-row this long after publication is sent again "
            "(0: never)"),
    Setting(REDELIVER_MAX_KEY, _count(0, 1000), DEFAULT_REDELIVER_MAX, "times one row may be sent again"),
    Setting(HEALTH_OUTBOX_MAX_ROWS_KEY, _count(1, 1_000_000_000, "rows", zero_means="no limit"),
            DEFAULT_HEALTH_OUTBOX_MAX_ROWS, "healthcheck's readiness fails with more unsent outbox rows than this"),
    Setting(HEALTH_OUTBOX_MAX_AGE_KEY, _seconds(1, _TEN_YEARS, zero_means="no limit"),
            DEFAULT_HEALTH_OUTBOX_MAX_AGE_SECONDS,
            "healthcheck's readiness fails when the oldest unsent outbox row is older than this"),
    Setting(MAX_PAYLOAD_KEY, _count(1, _ONE_GIB, "bytes", zero_means="no limit"), DEFAULT_MAX_PAYLOAD_BYTES,
            "largest JSON payload (args and kwargs) accepted at dispatch"),
    Setting(MAX_MESSAGE_KEY, _count(1, _ONE_GIB, "bytes", zero_means="no limit"), None,
            "largest message body a worker takes in (decoded and inflated)",
            default_text="twice max_payload_bytes, at least 4194304 (67108864 when max_payload_bytes is 0)"),
    Setting(PAYLOAD_STORE_THRESHOLD_KEY,
            _count(MIN_PAYLOAD_STORE_THRESHOLD_BYTES, _ONE_GIB, "bytes", zero_means="off: nothing is stored"), 0,
            "arguments encoding to more JSON than this are stored as a row of the app's database and only a "
            "reference is sent (at most max_payload_bytes)"),
    Setting(PAYLOAD_STORE_MAX_KEY, _count(MIN_PAYLOAD_STORE_THRESHOLD_BYTES, _ONE_GIB, "bytes"),
            DEFAULT_PAYLOAD_STORE_MAX_BYTES,
            "largest payload stored (refused at the call above it) and loaded by a worker"),
    Setting(PAYLOAD_STORE_RETENTION_KEY, _seconds(60, _TEN_YEARS), DEFAULT_PAYLOAD_STORE_RETENTION_SECONDS,
            "how long a stored payload is kept after its message's countdown when its task never succeeds"),
    Setting(DEADLETTER_QUEUE_KEY, RedisKey(), DEFAULT_DEADLETTER_QUEUE,
            "where messages a worker cannot run are kept: this Redis list on a Redis broker, else the rows of this "
            "list name in the table websauna_tasks_dead_letters"),
    Setting(IDEMPOTENCY_RETENTION_KEY, _seconds(0, _TEN_YEARS), DEFAULT_IDEMPOTENCY_RETENTION_SECONDS,
            "age after which done-rows are deleted"),
    Setting(IDEMPOTENCY_CREATE_TABLE_KEY, Boolean(), True, "create websauna_tasks_done on first use"),
    Setting(IDEMPOTENCY_PRUNE_INTERVAL_KEY, _seconds(0.1, _TEN_YEARS, zero_means="never"),
            DEFAULT_IDEMPOTENCY_PRUNE_INTERVAL_SECONDS,
            "how often each worker deletes done-rows past the retention"),
    Setting(DB_OUTAGE_RETRIES_KEY, _count(0, 1000), DEFAULT_DB_OUTAGE_RETRIES,
            "times a transactional run that lost its database is sent again (0: never)"),
    Setting(DB_OUTAGE_BACKOFF_MAX_KEY, _seconds(0.01, _ONE_DAY), DEFAULT_DB_OUTAGE_BACKOFF_MAX_SECONDS,
            "longest countdown between those runs"),
    Setting(UNKNOWN_TASK_GRACE_KEY, _seconds(1, _ONE_DAY, zero_means="dead letter at once"),
            DEFAULT_UNKNOWN_TASK_GRACE_SECONDS,
            "how long a message for a task this worker does not know is given back to the broker before it is a "
            "dead letter"),
    Setting(UNKNOWN_TASK_RETRY_KEY, _seconds(0.1, 3600), DEFAULT_UNKNOWN_TASK_RETRY_SECONDS,
            "the delay of each give-back of a message for an unknown task (a value set by hand must be shorter "
            "than the Redis visibility timeout)",
            default_text="15, or half the Redis visibility timeout when that is shorter"),
    Setting(CREATE_TABLES_KEY, Choice(("auto", "never")), "auto",
            "auto: create the library's tables on first use; never: startup checks they exist"),
    Setting(METRICS_KEY, Boolean(), False, "count dispatches, runs, the outbox and dead letters for Prometheus"),
    Setting(METRICS_PATH_KEY, URLPath(), DEFAULT_METRICS_PATH, "the web app's route serving the metrics"),
    Setting(METRICS_PERMISSION_KEY, Word("text", "a permission name"), "",
            "the permission that route requires, checked by the app's security policy", default_text="none"),
    Setting(METRICS_PORT_KEY, _count(1, 65535, zero_means="no endpoint"), 0,
            "port of the worker's own metrics endpoint, in its main process"),
    Setting(METRICS_ADDRESS_KEY, Word("host", "an IP address or host name"), DEFAULT_METRICS_ADDRESS,
            "address that endpoint listens on"),
    Setting(METRICS_BUCKETS_KEY, Buckets(), DEFAULT_METRICS_BUCKETS,
            "bucket bounds of the run duration histogram", default_text="prometheus_client's, 0.005 to 10"),
    Setting(TRACING_KEY, Boolean(), True,
            "carry the trace context through dispatch, the outbox and the run when opentelemetry-api is installed"),
    Setting(CONSOLE_PREFIX_KEY, URLPath(), DEFAULT_CONSOLE_PREFIX, "where config.include('websauna_tasks.console') "
            "mounts the operator console"),
    Setting(CONSOLE_PERMISSION_KEY, Word("text", "a permission name"), DEFAULT_CONSOLE_PERMISSION,
            "the permission every console page and action requires, checked by the app's security policy"),
    Setting(CONSOLE_INSECURE_KEY, Boolean(), False,
            "development only: mount the console without a security policy, open to anyone, with a banner"),
    Setting(CONSOLE_RECENT_RUNS_KEY, _count(1, 100_000, "runs", zero_means="none kept"), DEFAULT_CONSOLE_RECENT_RUNS,
            "task runs the console keeps in Redis for its Tasks page (the newest)"),
)

SETTINGS_BY_KEY: t.Mapping[str, Setting] = types.MappingProxyType({setting.key: setting for setting in SETTINGS})


@dataclasses.dataclass(frozen=True, eq=False)
class TaskSettings:
    """The parsed settings of one application; attribute names are the keys without their prefix."""

    site_url: str
    #: "": no secrets file; else its absolute path (secrets.py reads it).
    secrets_file: str
    celery_config: t.Mapping[str, t.Any]
    app_name: str
    #: A sessionmaker or a function(request), or None for ours.
    dbsession_factory: t.Any
    retry_attempts: int
    #: None: the application's own package.
    defer_allowed_modules: tuple[str, ...] | None
    #: "": chosen from the broker and sqlalchemy.url.
    name_store: str
    name_retention_seconds: float
    name_pending_seconds: float
    cancel_retention_seconds: float
    progress_interval_seconds: float
    #: None: no queue declared, so none is enforced.
    queues: tuple[QueueConfig, ...] | None
    allow_undeclared_queues: bool
    #: "": the broker, when it is Redis.
    limits_redis_url: str
    #: "": the broker, when it is Redis (redis_client.py).
    redis_url: str
    queue_wait_seconds: float
    iteration_time_budget_seconds: float
    iteration_batch_size: int
    iteration_max_failures: int
    outbox: bool
    outbox_retention_seconds: float
    outbox_poll_seconds: float
    outbox_batch_size: int
    outbox_relay_in_worker: bool
    outbox_publish_on_commit: bool
    outbox_redeliver_after_seconds: float
    outbox_redeliver_max: int
    #: 0: no limit (health.py).
    health_outbox_max_rows: int
    #: 0: no limit (health.py).
    health_outbox_max_age_seconds: float
    max_payload_bytes: int
    max_message_bytes: int
    #: 0: payloads are never stored (claim_check.py).
    payload_store_threshold_bytes: int
    payload_store_max_bytes: int
    payload_store_retention_seconds: float
    deadletter_queue: str
    idempotency_retention_seconds: float
    idempotency_create_table: bool
    idempotency_prune_interval_seconds: float
    db_outage_retries: int
    db_outage_backoff_max_seconds: float
    #: "auto" or "never" (schema.py).
    create_tables: str
    metrics: bool
    metrics_path: str
    #: "": the route needs no permission.
    metrics_permission: str
    #: 0: no worker endpoint.
    #: 0: an unknown task is a dead letter at once.
    unknown_task_grace_seconds: float
    unknown_task_retry_seconds: float
    metrics_port: int
    metrics_address: str
    metrics_duration_buckets: tuple[float, ...]
    tracing: bool
    console_prefix: str
    #: Never empty: the console is always guarded, unless console_insecure.
    console_permission: str
    console_insecure: bool
    #: 0: the console records no runs.
    console_recent_runs: int


def _is_blank(raw: t.Any) -> bool:
    return raw is None or (isinstance(raw, str) and not raw.strip())


def parse_setting(settings: t.Mapping[str, t.Any], key: str, package: t.Any = None) -> t.Any:
    """One declared setting from ``settings``: its default when absent or empty, else its parsed value."""
    setting = SETTINGS_BY_KEY[key]
    context = ParseContext(settings, package)
    if isinstance(setting.kind, CeleryConfig):
        return setting.kind.parse(key, None, context)
    raw = settings.get(key)
    if key == DEFER_ALLOWED_MODULES_KEY and isinstance(raw, str):
        return setting.kind.parse(key, raw, context)  # empty: no module at all
    if _is_blank(raw):
        return setting.default
    return setting.kind.parse(key, raw, context)


def parse_settings(settings: t.Mapping[str, t.Any] | None, package: t.Any = None) -> TaskSettings:
    """Parse and check every declared setting; ConfigurationError naming the first bad one.

    ``package`` anchors relative dotted names (``.db:make_session``), as the
    Configurator's package does.
    """
    settings = settings or {}
    values = {setting.field: parse_setting(settings, setting.key, package) for setting in SETTINGS}
    values["celery_config"] = types.MappingProxyType(dict(values["celery_config"]))
    if values["max_message_bytes"] is None:
        values["max_message_bytes"] = default_max_message_bytes(values["max_payload_bytes"])
    parsed = TaskSettings(**values)
    check_queue_names(parsed)
    check_payload_store(parsed)
    return parsed


def default_max_message_bytes(max_payload_bytes: int) -> int:
    """``websauna_tasks.max_message_bytes`` when it is not set: room for the arguments and what wraps them."""
    if not max_payload_bytes:
        return 16 * MIN_DEFAULT_MAX_MESSAGE_BYTES
    return max(MIN_DEFAULT_MAX_MESSAGE_BYTES, 2 * max_payload_bytes)


def check_payload_store(parsed: TaskSettings) -> None:
    """Refuse a storage threshold that would leave payloads neither sent nor stored."""
    threshold = parsed.payload_store_threshold_bytes
    if not threshold:
        return
    if parsed.max_payload_bytes and threshold > parsed.max_payload_bytes:
        # A payload between the two would be over the refusal limit of what is sent, yet not stored.
        raise ConfigurationError(
            f"{PAYLOAD_STORE_THRESHOLD_KEY}: {threshold} is more than {MAX_PAYLOAD_KEY} = {parsed.max_payload_bytes}; "
            "payloads between the two could be neither sent nor stored")
    if threshold > parsed.payload_store_max_bytes:
        raise ConfigurationError(
            f"{PAYLOAD_STORE_THRESHOLD_KEY}: {threshold} is more than {PAYLOAD_STORE_MAX_KEY} = "
            f"{parsed.payload_store_max_bytes}; every payload above it would be refused, none stored")


def check_queue_names(parsed: TaskSettings) -> None:
    """Refuse queues and a dead-letter list that would share Redis keys with kombu, us, or each other."""
    conf = parsed.celery_config
    options = conf.get("broker_transport_options") or {}
    if not isinstance(options, t.Mapping):
        options = {}
    dead = parsed.deadletter_queue
    reason = reserved_key_reason(dead, options)
    if reason:
        raise ConfigurationError(f"{DEADLETTER_QUEUE_KEY}: {dead!r} cannot be used: {reason}")
    for queue in parsed.queues or ():
        reason = reserved_key_reason(queue.name, options, dead)
        if reason:
            raise ConfigurationError(f"{QUEUES_KEY}: queue {queue.name!r}: name: cannot be used: {reason}")
    default_queue = conf.get("task_default_queue")
    if isinstance(default_queue, str):
        reason = reserved_key_reason(default_queue, options, dead)
        if reason:
            raise ConfigurationError(f"{CELERY_CONFIG_KEY}: task_default_queue {default_queue!r} cannot be used: "
                                     f"{reason}")
    for name in _task_queue_names(conf.get("task_queues")):
        reason = reserved_key_reason(name, options, dead)
        if reason:
            raise ConfigurationError(f"{CELERY_CONFIG_KEY}: task_queues: queue {name!r} cannot be used: {reason}")


def _task_queue_names(task_queues: t.Any) -> list[str]:
    if isinstance(task_queues, t.Mapping):
        return [name for name in task_queues if isinstance(name, str)]
    names = []
    for queue in task_queues or ():
        name = queue.get("name") if isinstance(queue, t.Mapping) else getattr(queue, "name", None)
        if isinstance(name, str):
            names.append(name)
    return names


# -- the parsed settings of an application ---------------------------------------------------------

def configure_settings(config: Configurator) -> TaskSettings:
    """Parse the application's settings once and keep them on the registry (called first by includeme)."""
    parsed = parse_settings(config.get_settings(), package=config.package)
    config.registry[_REGISTRY_KEY] = parsed
    return parsed


def get_task_settings(registry: t.Any) -> TaskSettings:
    """The :class:`TaskSettings` of ``registry``; parsed from its settings when includeme has not run."""
    getter = getattr(registry, "get", None)
    parsed = getter(_REGISTRY_KEY) if getter is not None else None
    if parsed is None:
        parsed = parse_settings(getattr(registry, "settings", None) or {})
    return parsed


def current_site_url(settings: t.Mapping[str, t.Any] | None) -> str:
    """``websauna.site_url`` as it is now: an application may change it after includeme checked it."""
    return (settings or {}).get(SITE_URL_KEY) or DEFAULT_SITE_URL
