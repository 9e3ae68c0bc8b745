"""PostgreSQL restarted under a running worker: the worker recovers by itself, failed runs are retried to success.

A private PostgreSQL cluster and a private Redis (tests/servers.py); the
machine's services are not touched. The worker runs idempotent
``RetryableTransactionTask``s that hold their transaction open in the
server (``pg_sleep``), so the restart catches several mid-run, and the
outbox is on, so the relay in the worker's main process must find its way
back to the database too.
"""
from __future__ import annotations

import re
import time

import pytest
import sqlalchemy as sa

from tests.apps import fault_tasks
from tests.servers import PrivatePostgres, PrivateRedis
from websauna_tasks.db import get_engine
from websauna_tasks.request import task_request
from websauna_tasks.testing import wait_for

pytestmark = [pytest.mark.fault, pytest.mark.slow]

QUEUE = "faults"


@pytest.fixture
def servers(fault_servers):
    return fault_servers


def fault_settings(broker: PrivateRedis, database: PrivatePostgres, **extra: str) -> dict[str, str]:
    celery = {"broker_url": broker.url, "task_default_queue": QUEUE, "task_ignore_result": True}
    return {"websauna.celery_config": repr(celery), "sqlalchemy.url": database.url,
            "websauna.site_url": "http://localhost", "websauna_tasks.outbox": "true",
            "websauna_tasks.outbox_poll_seconds": "0.5", **extra}


def write_fault_ini(tmp_path, settings: dict[str, str]) -> str:
    lines = ["[app:main]", "use = call:tests.apps.fault_app:main"]
    lines += [f"{key} = {value}" for key, value in settings.items()]
    path = tmp_path / "fault.ini"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def dispatch(router, keys: list[str], pause: float) -> None:
    with task_request(router.registry) as request, request.tm:
        for key in keys:
            fault_tasks.slow_effect.apply_async(args=(key,), kwargs={"pause": pause}, tm=request.tm)


def effect_counts(engine) -> dict[str, int]:
    with engine.connect() as conn:
        return dict(conn.execute(sa.text("SELECT key, count(*) FROM fault_effects GROUP BY key")).all())


def test_postgres_restart_under_a_running_worker(servers, tmp_path, built_apps, ws_celery_worker_factory,
                                                 subprocess_env):
    from tests.apps.fault_app import main

    broker, database, engine = servers
    settings = fault_settings(broker, database)
    router = main({}, **settings)
    built_apps.append(router)
    worker = ws_celery_worker_factory(write_fault_ini(tmp_path, settings), "worker", "-c", "4", "-l", "info",
                                      env=subprocess_env)
    worker_pid = worker.pid

    before = [f"before-{number}" for number in range(60)]
    dispatch(router, before, pause=0.3)
    wait_for(lambda: sum(effect_counts(engine).values()) >= 12, timeout=60, describe=worker.output)

    done_at_stop = sum(effect_counts(engine).values())
    started = time.monotonic()
    database.stop("fast")  # aborts the runs in flight and drops every connection
    time.sleep(3.0)  # long enough for runs to start, fail to connect and be sent again
    database.start()
    downtime = time.monotonic() - started
    get_engine(router.registry).dispose()  # the test's own pool; the worker gets no such help

    # After the restart: new commits go through the outbox again, and the
    # relay, whose LISTEN connection died with the server, must publish them.
    after = [f"after-{number}" for number in range(20)]
    dispatch(router, after, pause=0.0)

    keys = before + after
    wait_for(lambda: set(effect_counts(engine)) >= set(keys), timeout=120,
             describe=lambda: worker.output()[-6000:])
    drained = time.monotonic() - started
    time.sleep(1.0)  # a duplicate committed late would show now
    counts = effect_counts(engine)
    output = worker.output()
    retries = len(re.findall(r"database unavailable .*sent again in", output))
    gave_up = output.count("still unavailable after")
    assert worker.process.poll() is None and worker.pid == worker_pid, "the same worker, never restarted"
    assert {key: counts.get(key, 0) for key in keys} == {key: 1 for key in keys}, "every key exactly once"
    assert retries >= 1, "the restart failed some runs, which were sent again"
    assert gave_up == 0
    with engine.connect() as conn:
        unsent = conn.execute(sa.text("SELECT count(*) FROM websauna_tasks_outbox WHERE sent_at IS NULL")).scalar()
    assert unsent == 0
    print(f"\nFIGURE: PostgreSQL down {downtime:.1f}s under a -c 4 worker running 60 tasks of 0.3s "
          f"(+20 dispatched after the restart): {retries} run(s) failed on the outage and were sent again, "
          f"{done_at_stop} effects before the stop, {len(keys)}/{len(keys)} in the end, each exactly once, "
          f"all done {drained:.1f}s after the stop; same worker process, no restart")
