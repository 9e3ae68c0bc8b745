"""Health checks for probes: the broker, the database, the outbox backlog, a worker answering.

``ws-celery INI -- healthcheck`` (operator_commands.py) and the JSON view
(:func:`health_view`, mounted by :func:`add_health_views`; the console mounts
it under ``/_tasks/health``) both call :func:`check_health`, so a probe of
either kind runs the same checks against the same thresholds.

- liveness: the broker and the database. A process that cannot reach them
  cannot do anything useful, and the checks are cheap. A worker named by
  node (a worker pod's own probe) is pinged too.
- readiness: those, the outbox backlog (``websauna_tasks.health_outbox_max_rows``
  and ``..._max_age_seconds``) and a worker answering a ping, where the
  transport has remote control (kombu's SQLAlchemy transport has none: that
  check is then "not checkable", which is not a failure).

Each check runs in a daemon thread of its own with the same deadline, so
the report takes about ``timeout`` seconds at most however many checks
hang. A server behind a firewall that drops packets, rather than refusing
them, would otherwise hold the probe until the kernel gives up on the TCP
connect, long after the kubelet has. Daemon threads rather than a
ThreadPoolExecutor: the executor's threads are joined at interpreter exit,
so a hung check would hold the command's exit as well.

No check writes a row: the outbox's figures are those of ``outbox-status``.
"""
from __future__ import annotations

import dataclasses
import math
import threading
import time
import typing as t
import urllib.parse

from pyramid.exceptions import ConfigurationError

from .db import get_engine
from .outbox import find_outbox
from .registry import get_celery
from .settings import (
    HEALTH_OUTBOX_MAX_AGE_KEY,
    HEALTH_OUTBOX_MAX_ROWS_KEY,
    TaskSettings,
    get_task_settings,
    mask_password,
)
from .state import find_state

if t.TYPE_CHECKING:
    from celery import Celery
    from pyramid.config import Configurator
    from pyramid.registry import Registry
    from pyramid.request import Request
    from pyramid.response import Response

#: A check passed.
OK = "ok"
#: A check failed: the report is unhealthy.
FAILED = "failed"
#: Nothing to check (no database, the outbox off, eager mode, a broker already failed).
SKIPPED = "skipped"
#: The check cannot be made with this configuration (no remote control): not a failure.
NOT_CHECKABLE = "not checkable"

LIVENESS = "liveness"
READINESS = "readiness"
#: Seconds each check is given unless the caller says otherwise.
DEFAULT_TIMEOUT = 5.0
#: The longest timeout accepted: a probe that waits longer than this has lost its purpose.
MAX_TIMEOUT = 300.0
DEFAULT_PREFIX = "/_tasks"
ROUTE_NAME = "websauna_tasks.health"
_TIMEOUT_KEY = "websauna_tasks.health_timeout"
# A share of what is left kept out of the wait for the answers, for the
# reply queue's setup and the publish, so that the check returns
# its own answer before the deadline rather than being cut off there.
_PING_MARGIN = 0.4
# How long past the deadline a finished check is still waited for: a check
# that ended on time must not lose a race with the join.
_GRACE = 0.25


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """One check's outcome: ``status`` is one of OK, FAILED, SKIPPED, NOT_CHECKABLE; ``detail`` is one line."""

    name: str
    status: str
    detail: str
    seconds: float
    #: Figures behind the detail (unsent rows, the workers that answered...), JSON-serializable.
    data: t.Mapping[str, t.Any] = dataclasses.field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.status == FAILED

    def as_dict(self) -> dict[str, t.Any]:
        return {"status": self.status, "detail": self.detail, "seconds": round(self.seconds, 3), **self.data}


@dataclasses.dataclass(frozen=True)
class HealthReport:
    """What :func:`check_health` found: ``healthy`` unless a check failed."""

    probe: str
    app: str
    checks: tuple[CheckResult, ...]
    seconds: float

    @property
    def healthy(self) -> bool:
        return not self.failed

    @property
    def failed(self) -> tuple[CheckResult, ...]:
        return tuple(check for check in self.checks if check.failed)

    def check(self, name: str) -> CheckResult | None:
        return next((check for check in self.checks if check.name == name), None)

    def as_dict(self) -> dict[str, t.Any]:
        return {"healthy": self.healthy, "probe": self.probe, "app": self.app, "seconds": round(self.seconds, 3),
                "checks": {check.name: check.as_dict() for check in self.checks}}


def parse_timeout(raw: t.Any) -> float:
    """``raw`` as a timeout in seconds: finite, above 0, at most :data:`MAX_TIMEOUT`; else ValueError."""
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number of seconds, got {raw!r}") from None
    if not math.isfinite(value) or not 0 < value <= MAX_TIMEOUT:
        raise ValueError(f"expected a number of seconds above 0 and at most {MAX_TIMEOUT:g}, got {raw!r}")
    return value


@dataclasses.dataclass(frozen=True)
class _Context:
    app: Celery
    registry: Registry
    settings: TaskSettings
    deadline: float
    timeout: float
    worker: str | None

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


_Outcome = tuple[str, str, dict[str, t.Any]]


def check_health(registry_or_app: t.Any, *, readiness: bool, timeout: float = DEFAULT_TIMEOUT,
                 worker: str | None = None) -> HealthReport:
    """Run the liveness checks (broker, database), and with ``readiness`` the outbox and worker ones too.

    ``registry_or_app``: the Pyramid registry (or a router or request that
    has one) of an app that included websauna_tasks, or its Celery app.
    Each check gets at most ``timeout`` seconds and they run side by side.
    ``worker`` (a node name, ``celery@host``) pings that worker only, in
    liveness too; otherwise readiness takes any worker answering on the
    broker. Never raises for a server that is down: that is a failed
    check. ValueError for a bad ``timeout``, ConfigurationError for
    something that is not such an app.
    """
    timeout = parse_timeout(timeout)
    app, registry = _resolve(registry_or_app)
    started = time.monotonic()
    context = _Context(app=app, registry=registry, settings=get_task_settings(registry),
                       deadline=started + timeout, timeout=timeout, worker=worker)
    checks: list[tuple[str, t.Callable[[_Context], _Outcome]]] = [("broker", _broker), ("database", _database)]
    if readiness:
        checks.append(("outbox", _outbox))
    if readiness or worker:
        # A worker named is one to check even in liveness: a worker pod's own probe.
        checks.append(("worker", _worker))
    running = [_Running(name, check, context) for name, check in checks]
    results = {run.name: run.result() for run in running}
    if "worker" in results and results["broker"].failed:
        # The ping went through that broker: its failure says nothing about the workers.
        results["worker"] = dataclasses.replace(results["worker"], status=SKIPPED,
                                                detail="not checked: the broker cannot be reached", data={})
    return HealthReport(probe=READINESS if readiness else LIVENESS, app=str(app.main or ""),
                        checks=tuple(results.values()), seconds=time.monotonic() - started)


def _resolve(target: t.Any) -> tuple[Celery, Registry]:
    state = find_state(target)
    if state is not None:
        return target, state.registry
    # A router and a request carry the registry; a registry is its own.
    registry = getattr(target, "registry", target)
    if not hasattr(registry, "queryUtility"):
        raise ConfigurationError(f"check_health() takes a Pyramid registry or a Celery app, got {target!r}")
    return get_celery(registry), registry


class _Running:
    """One check in a daemon thread; :meth:`result` waits for it until the shared deadline."""

    def __init__(self, name: str, check: t.Callable[[_Context], _Outcome], context: _Context):
        self.name = name
        self.context = context
        self.started = time.monotonic()
        self.outcome: CheckResult | None = None
        self.thread = threading.Thread(target=self._run, args=(check,), name=f"healthcheck-{name}", daemon=True)
        self.thread.start()

    def _run(self, check: t.Callable[[_Context], _Outcome]) -> None:
        try:
            status, detail, data = check(self.context)
        except Exception as exc:
            status, detail, data = FAILED, _reason(exc), {}
        self.outcome = CheckResult(self.name, status, _clean(detail, self.context), time.monotonic() - self.started,
                                   data)

    def result(self) -> CheckResult:
        self.thread.join(self.context.remaining() + _GRACE)
        if self.outcome is not None:
            return self.outcome
        return CheckResult(self.name, FAILED, _clean(_cut_off(self.name, self.context), self.context),
                           time.monotonic() - self.started)


def _cut_off(name: str, context: _Context) -> str:
    """What a check still running at the deadline failed to do, in the words its own failure would use."""
    within = f"within {context.timeout:g} s"
    if name == "broker":
        return f"the broker {mask_password(str(context.app.conf.broker_url))} did not answer {within}"
    if name == "database":
        engine = get_engine(context.registry)
        shown = mask_password(engine.url.render_as_string(hide_password=False)) if engine is not None else "?"
        return f"the database {shown} did not answer {within}"
    if name == "worker":
        return _no_pong(context)
    return f"the {name} check did not finish {within}"


def _no_pong(context: _Context) -> str:
    silent = f"worker {context.worker} did not answer" if context.worker else "no worker answered"
    return f"{silent} a ping within {context.timeout:g} s"


# -- the checks ---------------------------------------------------------------------------------------------------

def _broker(context: _Context) -> _Outcome:
    shown = mask_password(str(context.app.conf.broker_url))
    connection = context.app.connection_for_write(connect_timeout=context.timeout)
    try:
        # No retry: a probe is retried by its caller, and kombu's default
        # would wait 2 s before the second attempt.
        connection.ensure_connection(max_retries=0, timeout=context.timeout)
    except Exception as exc:
        return FAILED, f"cannot reach the broker {shown}: {_reason(exc)}", {"url": shown}
    finally:
        connection.release()
    return OK, f"{shown} reachable", {"url": shown}


def _database(context: _Context) -> _Outcome:
    import sqlalchemy as sa

    engine = get_engine(context.registry)
    if engine is None:
        return SKIPPED, "no database: sqlalchemy.url is not set (nor a sessionmaker bound to an engine)", {}
    shown = mask_password(engine.url.render_as_string(hide_password=False))
    try:
        with engine.connect() as connection:
            if engine.dialect.name == "postgresql":
                # SET LOCAL: gone with this transaction, so the pooled connection keeps the app's own limit.
                milliseconds = max(1, int(context.remaining() * 1000))
                connection.execute(sa.text(f"SET LOCAL statement_timeout = {milliseconds}"))
            value = connection.execute(sa.text("SELECT 1")).scalar()
    except Exception as exc:
        return FAILED, f"cannot use the database {shown}: {_reason(exc)}", {"url": shown}
    if value != 1:
        return FAILED, f"the database {shown} answered SELECT 1 with {value!r}", {"url": shown}
    return OK, f"{shown} answers", {"url": shown}


def _outbox(context: _Context) -> _Outcome:
    outbox = find_outbox(context.app)
    if outbox is None:
        return SKIPPED, "the outbox is off", {}
    max_rows = context.settings.health_outbox_max_rows
    max_age = context.settings.health_outbox_max_age_seconds
    try:
        status = outbox.status()
    except Exception as exc:
        return FAILED, f"cannot read the outbox table: {_reason(exc)}", {}
    age = status.oldest_unsent_age
    data = {"unsent": status.unsent, "oldest_unsent_age_seconds": age, "max_rows": max_rows,
            "max_age_seconds": max_age}
    over = []
    if max_rows and status.unsent > max_rows:
        over.append(f"{status.unsent} unsent rows, more than {max_rows} ({HEALTH_OUTBOX_MAX_ROWS_KEY})")
    if max_age and age is not None and age > max_age:
        over.append(f"the oldest unsent row is {age:.0f} s old, more than {max_age:g} s ({HEALTH_OUTBOX_MAX_AGE_KEY})")
    if over:
        return FAILED, "backlog: " + "; ".join(over) + " -- is a relay running (a worker, or outbox-relay)?", data
    oldest = "none" if age is None else f"{age:.1f} s"
    return OK, f"{status.unsent} unsent rows, oldest {oldest}", data


def _worker(context: _Context) -> _Outcome:
    app = context.app
    if app.conf.task_always_eager:
        return SKIPPED, "tasks run eagerly (task_always_eager): there is no worker to ask", {}
    connection = app.connection_for_read()
    try:
        exchange_types = connection.transport.implements.exchange_type
    finally:
        connection.release()
    if "fanout" not in exchange_types:
        # Celery's ping is a broadcast on a fanout exchange, which this transport
        # would deliver to no worker: silence would say nothing about them.
        return NOT_CHECKABLE, (f"the broker's transport ({urllib.parse.urlsplit(str(app.conf.broker_url)).scheme}) "
                               f"has no remote control, so no worker can be pinged"), {}
    destination = [context.worker] if context.worker else None
    control = app.control
    # Connected first, so that the wait for answers is measured from what is
    # left after the connect rather than guessed before it.
    connection = app.connection_for_write(connect_timeout=context.timeout)
    try:
        connection.ensure_connection(max_retries=0, timeout=context.remaining())
        wait = max(0.01, context.remaining() * (1 - _PING_MARGIN))
        replies = control.ping(destination=destination, timeout=wait, limit=1, connection=connection)
    finally:
        connection.release()
    workers = sorted(name for reply in replies or () for name in reply)
    if not workers:
        return FAILED, _no_pong(context), {"workers": []}
    return OK, f"{', '.join(workers)} answered a ping", {"workers": workers}


def _reason(exc: BaseException) -> str:
    # SQLAlchemy wraps the driver's error and appends a background link; the driver's text is what helps.
    original = getattr(exc, "orig", None)
    text = str(original if original is not None else exc) or type(exc).__name__
    return f"{type(original or exc).__name__}: {text}"


def _clean(detail: str, context: _Context) -> str:
    """One line, passwords masked: a driver may quote the URL it was given."""
    line = mask_password(" ".join(str(detail).split()))
    for password in _passwords(context):
        line = line.replace(password, "**")
    return line[:1000]


def _passwords(context: _Context) -> list[str]:
    found = []
    try:
        password = urllib.parse.urlsplit(str(context.app.conf.broker_url)).password
    except ValueError:
        password = None
    if password:
        found.append(urllib.parse.unquote(password))
        found.append(password)
    engine = get_engine(context.registry)
    if engine is not None and engine.url.password:
        found.append(str(engine.url.password))
    # Longest first, so that a password holding another is not left half shown.
    return sorted({password for password in found if len(password) > 1}, key=len, reverse=True)


# -- the JSON view ------------------------------------------------------------------------------------------------

def health_view(request: Request) -> Response:
    """The report as JSON: 200 when healthy, 503 when not; ``?probe=liveness`` for the cheap checks.

    The timeout is the one given to :func:`add_health_views`, not a query
    parameter: a caller could otherwise keep threads waiting at will.
    """
    from pyramid.response import Response

    probe = request.params.get("probe", READINESS)
    if probe not in (LIVENESS, READINESS):
        response = Response(json_body={"error": f"probe must be {LIVENESS} or {READINESS}, got {probe[:50]!r}"},
                            status=400)
    else:
        timeout = request.registry.get(_TIMEOUT_KEY, DEFAULT_TIMEOUT)
        report = check_health(request.registry, readiness=probe == READINESS, timeout=timeout)
        response = Response(json_body=report.as_dict(), status=200 if report.healthy else 503)
    # A cached "healthy" is exactly what a probe must never see.
    response.cache_control.no_store = True
    return response


def add_health_views(config: Configurator, prefix: str = DEFAULT_PREFIX, *, permission: str | None = None,
                     timeout: float = DEFAULT_TIMEOUT, route_name: str = ROUTE_NAME) -> str:
    """Mount :func:`health_view` at ``<prefix>/health`` (GET and HEAD); the path it is mounted at.

    ``permission`` guards it like any view (None: the application's default
    permission, if any); a kubelet has no credentials, so an unauthenticated
    probe needs ``pyramid.security.NO_PERMISSION_REQUIRED``, or the
    ``healthcheck`` command as an exec probe (docs/running.md).
    """
    try:
        timeout = parse_timeout(timeout)
    except ValueError as exc:
        raise ConfigurationError(f"add_health_views: timeout: {exc}") from None
    path = "/" + "/".join(part for part in (prefix.strip("/"), "health") if part)
    config.registry[_TIMEOUT_KEY] = timeout
    config.add_route(route_name, path)
    config.add_view(health_view, route_name=route_name, request_method=("GET", "HEAD"), permission=permission)
    return path


def includeme(config: Configurator) -> None:
    """``config.include("websauna_tasks.health")``: the view at /_tasks/health, or /health under a route_prefix."""
    add_health_views(config, "" if config.route_prefix else DEFAULT_PREFIX)
