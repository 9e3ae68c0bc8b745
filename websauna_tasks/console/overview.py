"""The overview: queues, workers, the outbox, dead letters and the periodic entries, on one page.

Each part is read on its own and fails on its own: a broker that does not
answer leaves the outbox and the dead letters on the page, with the reason
where the queues would be. Workers are asked with one broadcast per
question (stats, active, reserved) sent side by side, each waiting
:data:`INSPECT_TIMEOUT` at most, so the page never waits longer than that
for workers that are gone.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import time
import typing as t

from ..deadletter import NoDeadLetterStore
from ..deadletters import summarize_dead_letters
from ..outbox import find_outbox, outbox_table
from ..queues import enforced_queues
from ._common import RENDERER, app_of, failure, page, route
from .periodic import periodic_entries
from .runs import recent_runs

if t.TYPE_CHECKING:
    from celery import Celery
    from pyramid.config import Configurator
    from pyramid.request import Request

    from ._common import ConsoleConfig

#: Seconds the workers are given to answer the overview's broadcasts.
INSPECT_TIMEOUT = 1.0
#: An unacked hash longer than this is counted, not read per queue.
UNACKED_READ_LIMIT = 10_000


def add_views(config: Configurator, console: ConsoleConfig) -> None:
    config.add_route(route("overview"), f"{console.prefix}/")
    config.add_view(overview_view, route_name=route("overview"), request_method=("GET", "HEAD"),
                    permission=console.permission, renderer=f"overview{RENDERER}")


def overview_view(request: Request) -> dict[str, t.Any]:
    app = app_of(request)
    runs = recent_runs(request, limit=200)
    return page(request, "overview", "Overview", queues=queue_rows(app), workers=workers(app),
                outbox=outbox_figures(app), dead=dead_letter_figures(app),
                periodic=periodic_entries(app, runs.items))


# -- queues -----------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class QueueRow:
    name: str
    depth: int | None = None
    unacked: int | None = None
    rate: float | None = None
    max_concurrent: int | None = None
    leases: int | None = None
    declared: bool = False
    error: str = ""


def queue_names(app: Celery) -> list[str]:
    """The declared queues, the default queue and the app's own task_queues, in that order, once each."""
    names: list[str] = []
    declared = enforced_queues(app)
    if declared is not None:
        names.extend(declared.queues)
    names.append(app.conf.task_default_queue)
    for queue in app.conf.task_queues or ():
        name = queue if isinstance(queue, str) else getattr(queue, "name", None)
        if isinstance(name, str):
            names.append(name)
    return list(dict.fromkeys(name for name in names if name))


def queue_rows(app: Celery) -> dict[str, t.Any]:
    declared = enforced_queues(app)
    rows = []
    for name in queue_names(app):
        row = QueueRow(name)
        policy = declared.queues.get(name) if declared is not None else None
        if policy is not None:
            row.declared, row.rate, row.max_concurrent = True, policy.rate_per_second, policy.max_concurrent
        rows.append(row)
    error = ""
    unacked_note = ""
    try:
        with app.connection_for_read() as connection:
            connection.ensure_connection(max_retries=1, timeout=3)
            for row in rows:
                row.depth = _depth(connection, row.name)
            unacked_note = _unacked(connection, app, rows)
    except Exception as exc:  # the rest of the page stands without the broker
        error = f"the broker did not answer: {failure(exc)}"
    _leases(declared, rows)
    return {"rows": rows, "error": error, "unacked_note": unacked_note}


def _depth(connection: t.Any, name: str) -> int | None:
    channel = connection.channel()
    try:
        # Passive: a queue that does not exist yet is not created by looking at it.
        return int(channel.queue_declare(queue=name, passive=True).message_count)
    except Exception:
        return None
    finally:
        try:
            channel.close()
        except Exception:
            pass


def _unacked(connection: t.Any, app: Celery, rows: list[QueueRow]) -> str:
    transport = connection.transport
    driver = getattr(transport, "driver_type", "")
    if driver == "amqp":
        # AMQP's queue.declare-ok carries the ready messages only; the delivered-but-unacked count is the
        # management plugin's, an HTTP API with credentials of its own that the console does not hold.
        return ("not reported by this transport: RabbitMQ gives only the ready messages over AMQP (the waiting "
                "column); its management UI or rabbitmqctl list_queues name messages_unacknowledged has the rest")
    if driver != "redis":
        return "not reported by this transport: it does not say which messages are unacknowledged"
    options = app.conf.broker_transport_options or {}
    key = str(options.get("unacked_key") or "unacked")
    client = connection.default_channel.client
    size = int(client.hlen(key))
    if size > UNACKED_READ_LIMIT:
        return f"{size} unacknowledged in all queues (too many to count per queue)"
    counts: dict[str, int] = {}
    # kombu keeps each unacked message as [envelope, exchange, routing key].
    for raw in client.hvals(key):
        try:
            routing_key = json.loads(raw)[2]
        except (ValueError, IndexError, TypeError):
            continue
        counts[routing_key] = counts.get(routing_key, 0) + 1
    for row in rows:
        row.unacked = counts.get(row.name, 0)
    return ""


def _leases(declared: t.Any, rows: list[QueueRow]) -> None:
    limits = getattr(declared, "limits", None)
    if limits is None:
        return
    limited = [row for row in rows if row.max_concurrent is not None]
    if not limited:
        return
    try:
        client = limits.client()
        seconds, micros = client.time()
        now_ms = seconds * 1000 + micros / 1000
        pipe = client.pipeline(transaction=False)
        for row in limited:
            # Expired leases (a killed worker's) are still in the set until the next take: not held.
            pipe.zcount(limits.key(row.name, "running"), now_ms, "+inf")
        for row, held in zip(limited, pipe.execute()):
            row.leases = int(held)
    except Exception as exc:
        for row in limited:
            row.error = f"leases unknown ({type(exc).__name__})"


# -- workers ----------------------------------------------------------------------------------------------------

def remote_control(app: Celery) -> bool:
    """Whether workers can be asked at all: Celery broadcasts on a fanout exchange, which some transports lack."""
    connection = app.connection_for_read()
    try:
        return "fanout" in connection.transport.implements.exchange_type
    finally:
        connection.release()


def workers(app: Celery, timeout: float = INSPECT_TIMEOUT) -> dict[str, t.Any]:
    if app.conf.task_always_eager:
        return {"notice": "tasks run eagerly (task_always_eager): there are no workers", "rows": []}
    try:
        if not remote_control(app):
            scheme = str(app.conf.broker_url).partition("://")[0]
            return {"notice": f"the broker's transport ({scheme}) has no remote control, so workers cannot be "
                              "asked what they do: read their logs, or use Redis or RabbitMQ", "rows": []}
        started = time.monotonic()
        inspect = app.control.inspect(timeout=timeout)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            stats, active, reserved = (pool.submit(getattr(inspect, what)) for what in ("stats", "active", "reserved"))
            stats, active, reserved = stats.result() or {}, active.result() or {}, reserved.result() or {}
    except Exception as exc:
        return {"notice": f"workers could not be asked: {failure(exc)}", "rows": []}
    rows = []
    for host in sorted(set(stats) | set(active) | set(reserved)):
        info = stats.get(host) or {}
        pool = info.get("pool") or {}
        rows.append({"host": host, "pid": info.get("pid"), "pool": str(pool.get("implementation", "")).rpartition(
            ":")[0].rpartition(".")[2] or "–", "concurrency": pool.get("max-concurrency"),
            "active": len(active.get(host) or ()), "reserved": len(reserved.get(host) or ())})
    notice = "" if rows else f"no worker answered within {timeout:g} s"
    return {"notice": notice, "rows": rows, "seconds": time.monotonic() - started}


# -- the outbox and dead letters --------------------------------------------------------------------------------

def outbox_figures(app: Celery) -> dict[str, t.Any]:
    import sqlalchemy as sa

    outbox = find_outbox(app)
    if outbox is None:
        return {"off": True}
    try:
        status = outbox.status()
        table = outbox_table
        limit = outbox.redeliverer.max_redeliveries
        # redeliver_max 0: nothing is ever sent again, so nothing gives up either.
        gave_up = table.c.redeliveries >= limit if limit > 0 else sa.false()
        query = sa.select(sa.func.count().filter(table.c.redeliveries > 0), sa.func.count().filter(gave_up)
                          ).where(table.c.app == outbox.app_name)
        with outbox.relay_engine().connect() as conn:
            redelivered, given_up = conn.execute(query).one()
    except Exception as exc:
        return {"error": f"the outbox table could not be read: {failure(exc)}"}
    return {"unsent": status.unsent, "oldest_age": status.oldest_unsent_age, "sent_kept": status.sent_kept,
            "redelivered": redelivered, "given_up": given_up}


def dead_letter_figures(app: Celery) -> dict[str, t.Any]:
    try:
        return {"summary": summarize_dead_letters(app)}
    except NoDeadLetterStore as exc:
        return {"error": str(exc)}
    except Exception as exc:
        return {"error": f"the dead letters could not be read: {failure(exc)}"}
