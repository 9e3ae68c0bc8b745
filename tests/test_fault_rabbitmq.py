"""Fault figures on RabbitMQ: the broker stopped under 4 producers, and a worker SIGKILLed mid-run.

A private RabbitMQ node (tests/servers.py: its own node name, ports, epmd
and data directory, stopped and started by PID) and a private PostgreSQL;
the machine's RabbitMQ on 5672 is never contacted.

1. Four ``tests.apps.fault_producer`` processes commit ``WS_FAULT_TASKS``
   (10,000) idempotent tasks, as in tests/test_fault_redis_outage.py. Once
   30% are committed the node gets SIGTERM (a clean stop: durable queues
   and persistent messages are kept) and is started again; a boot takes
   5-15 s here, so the broker is away for longer than Redis was. With the
   outbox every committed key must have exactly one effect; without it the
   lost tasks are counted.
2. A ``-c 4`` worker's process group is SIGKILLed among 100 idempotent
   ``TransactionalTask``s (acks_late). RabbitMQ returns a consumer's
   unacknowledged messages to the queue as soon as its connection drops (no
   visibility timeout), so a new worker started at once runs them; every
   effect must be there exactly once.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import sqlalchemy as sa

from tests import fault_outage
from tests.apps import fault_tasks
from tests.apps.fault_producer import COMMITS_DDL
from tests.fault_outage import (
    PRODUCERS,
    QUEUE,
    TASKS,
    committed_count,
    effect_totals,
)
from tests.servers import PrivatePostgres, PrivateRabbitMQ
from websauna_tasks.testing import wait_for

pytestmark = [pytest.mark.fault, pytest.mark.slow]

STOP_AT = 0.30
#: Seconds the node stays stopped before it is started again (its boot comes on top).
DOWN_SECONDS = 2.0
#: Above the longest wait of a message in the queue here (the backlog after the restart), so that
#: the outbox sends again only what the broker really lost.
REDELIVER_AFTER = 90
KILL_TASKS = 100


@pytest.fixture
def rabbit_servers(tmp_path):
    """A private RabbitMQ node and a private PostgreSQL with the fault tables; (broker, database, engine).

    Both are stopped and deleted whatever the test did, and no process of
    the node (beam.smp, its epmd) may be left behind.
    """
    broker = PrivateRabbitMQ()
    database = PrivatePostgres()
    engine = None
    try:
        broker.start()
        database.start()
        engine = sa.create_engine(database.url, poolclass=sa.pool.NullPool)
        with engine.begin() as conn:
            for ddl in (fault_tasks.EFFECTS_DDL, fault_tasks.STARTS_DDL, COMMITS_DDL):
                conn.execute(sa.text(ddl))
        yield broker, database, engine
    finally:
        if engine is not None:
            engine.dispose()
        broker.cleanup()
        database.cleanup()
    stray = broker.leftovers()
    for line in stray:
        os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)
    assert stray == [], "processes of the private RabbitMQ node outlived it"


producers = fault_outage.producers  # the fixture


def write_ini(tmp_path, broker: PrivateRabbitMQ, database: PrivatePostgres, outbox: bool) -> str:
    celery = {"broker_url": broker.url, "task_default_queue": QUEUE, "task_ignore_result": True}
    return fault_outage.write_fault_ini(
        tmp_path, celery, database.url, outbox, "fault-rabbitmq.ini",
        **{"websauna_tasks.outbox_redeliver_after_seconds": str(REDELIVER_AFTER)})


def broker_busy(broker: PrivateRabbitMQ) -> bool:
    """Messages wait in the queue (or the node cannot say: busy until it can)."""
    try:
        return broker.queue_depth(QUEUE) > 0
    except Exception:
        return True


def holds_messages(broker: PrivateRabbitMQ) -> bool:
    """A message of the queue is ready or delivered and not acknowledged (asked with rabbitmqctl: AMQP counts
    only the ready ones); busy when the node cannot say."""
    ctl = os.path.join(os.path.dirname(broker.script), "rabbitmqctl")
    try:
        listed = subprocess.run([ctl, "-n", broker.nodename, "list_queues", "-q", "--no-table-headers", "name",
                                 "messages_ready", "messages_unacknowledged"], env=broker._environment(),
                                capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return True
    if listed.returncode != 0:
        return True
    rows = [line.split("\t") for line in listed.stdout.splitlines()]
    return any(fields[0] == QUEUE and (int(fields[1]) or int(fields[2])) for fields in rows if len(fields) == 3)


def run_outage(outbox: bool, servers, tmp_path, worker_factory, env, producers) -> dict:
    broker, database, engine = servers
    ini = write_ini(tmp_path, broker, database, outbox)
    run = fault_outage.start_outage(ini, engine, worker_factory, env, producers, STOP_AT)
    stopped = time.monotonic()
    broker.stop()
    down_until = stopped + DOWN_SECONDS
    while time.monotonic() < down_until:
        time.sleep(0.05)
    committed_at_start = committed_count(engine)
    broker.start()  # same node name, ports and data directory
    back = time.monotonic()
    committed_when_back = committed_count(engine)

    # Past the outbox's redelivery delay, for a message the broker lost to be sent again and run.
    result = fault_outage.finish_outage(run, engine, outbox, lambda: broker_busy(broker),
                                        timeout=REDELIVER_AFTER + 120.0, holds_messages=lambda: holds_messages(broker))
    queued = broker.queue_depth(QUEUE)
    lost = result.pop("lost_keys")
    return {
        **result, "lost": len(lost), "lost_sample": sorted(lost)[:10], "queued": queued,
        "committed_at_start": committed_at_start, "committed_when_back": committed_when_back,
        "outage": back - stopped, "drain": result["last_effect"] - back, "log_tail": result["output"][-4000:],
    }


def figures(result: dict) -> str:
    slowest = max(summary["slowest_commit_seconds"] for summary in result["summaries"])
    worker = (f"the same worker process throughout ({result['broker_losses']} connection loss(es))"
              if result["same_worker"] else "the worker is gone")
    return (f"{TASKS} tasks by {PRODUCERS} producer processes in {result['commits']} commits "
            f"({len(result['committed'])} keys committed); RabbitMQ stopped at {result['committed_at_stop']} keys, "
            f"started again at {result['committed_at_start']}, taking connections again at "
            f"{result['committed_when_back']} ({result['committed_when_back'] - result['committed_at_stop']} "
            f"committed while it was away, {result['outage']:.1f}s); effects {result['effects']}, distinct keys "
            f"{result['distinct']}, duplicates {result['duplicates']}, lost {result['lost']} "
            f"({result['queued']} message(s) still queued); {result['skipped_redeliveries']} redelivered run(s) "
            f"skipped as already done; last effect {result['drain']:.1f}s after the node was back "
            f"({result['after_producers']:.1f}s after the producers exited, {result['total']:.1f}s after they "
            f"started; {result['settled']}); slowest commit {slowest:.2f}s; {worker}")


def test_rabbitmq_outage_with_the_outbox_loses_nothing(rabbit_servers, tmp_path, ws_celery_worker_factory,
                                                       subprocess_env, producers):
    result = run_outage(True, rabbit_servers, tmp_path, ws_celery_worker_factory, subprocess_env, producers)
    fast_path = sum(summary["fast_path_published"] for summary in result["summaries"])
    print(f"\nFIGURE: RabbitMQ, outbox on: {figures(result)}; of the {TASKS} outbox rows the producers' fast path "
          f"published {fast_path} and the worker's relay the other {TASKS - fast_path - result['unsent']}, "
          f"{result['unsent']} left unsent; {result['redelivered']} sent again by the relay because their task "
          f"had not finished {REDELIVER_AFTER}s after their publication")
    committed, counts = result["committed"], result["counts"]
    assert len(committed) == TASKS and result["commits"] == TASKS // fault_outage.PER_COMMIT
    assert result["committed_when_back"] > result["committed_at_stop"], "the producers committed while it was away"
    assert result["same_worker"], "the worker survives the restart by itself\n" + result["log_tail"]
    wrong = {key: counts.get(key, 0) for key in committed if counts.get(key, 0) != 1}
    assert not wrong, f"every committed key exactly once; effects per key: {dict(list(wrong.items())[:20])}\n" \
        + result["log_tail"]
    assert result["strangers"] == 0
    assert result["unsent"] == 0
    assert result["queued"] == 0


def test_rabbitmq_outage_without_the_outbox_loses_committed_tasks(rabbit_servers, tmp_path, ws_celery_worker_factory,
                                                                  subprocess_env, producers):
    result = run_outage(False, rabbit_servers, tmp_path, ws_celery_worker_factory, subprocess_env, producers)
    print(f"\nFIGURE: RabbitMQ, outbox off: {figures(result)}; the lost tasks belong to transactions that "
          f"committed (their producer rows are there); first lost keys {result['lost_sample']}")
    assert len(result["committed"]) == TASKS and result["commits"] == TASKS // fault_outage.PER_COMMIT
    assert result["committed_when_back"] > result["committed_at_stop"], "the producers committed while it was away"
    assert result["same_worker"], "the worker survives the restart by itself\n" + result["log_tail"]
    assert result["queued"] == 0
    assert result["duplicates"] == 0, "idempotent: no key ran twice"
    assert result["strangers"] == 0
    assert result["lost"] >= 1, "an outage under producers without the outbox costs tasks"


def test_worker_sigkilled_among_idempotent_tasks_every_effect_exactly_once(
        rabbit_servers, tmp_path, ws_celery_worker_factory, subprocess_env):
    from pyramid.paster import get_app

    from websauna_tasks.db import get_engine
    from websauna_tasks.registry import get_celery

    broker, database, engine = rabbit_servers
    ini = write_ini(tmp_path, broker, database, outbox=False)
    worker = ws_celery_worker_factory(ini, "worker", "-c", "4", env=subprocess_env)
    registry = get_app(ini).registry
    try:
        keys = [f"kill-{index:03d}" for index in range(KILL_TASKS)]
        app = get_celery(registry)
        for key in keys:
            # 0.2 s before the effect, 0.2 s between its commit and the acknowledgement.
            app.send_task("tests.fault.paced_effect", args=(key, 0.2, 0.2))
    finally:
        get_engine(registry).dispose()

    def tally() -> tuple[dict[str, int], dict[str, int]]:
        with engine.connect() as conn:
            starts = dict(conn.execute(sa.text("SELECT key, count(*) FROM fault_starts GROUP BY key")).all())
            effects = dict(conn.execute(sa.text("SELECT key, count(*) FROM fault_effects GROUP BY key")).all())
        return starts, effects

    wait_for(lambda: effect_totals(engine)[1] >= 30, timeout=60, describe=worker.output)
    os.killpg(worker.pid, signal.SIGKILL)  # main process and pool at once: nothing acknowledged or rejected
    killed = time.monotonic()
    worker.process.wait(10)
    at_kill = effect_totals(engine)[1]
    waiting_at_kill = broker.queue_depth(QUEUE)
    # No wait for a timeout: RabbitMQ already put the dead consumer's messages back.
    replacement = ws_celery_worker_factory(ini, "worker", "-c", "4", env=subprocess_env)
    replaced = time.monotonic() - killed
    wait_for(lambda: effect_totals(engine)[1] >= KILL_TASKS, timeout=90, describe=replacement.output)
    recovered = time.monotonic() - killed
    # Acknowledged after their commit: with nothing unacknowledged, a duplicate committed late is counted below.
    fault_outage.wait_drained(lambda: holds_messages(broker), replacement)
    starts, effects = tally()
    output = replacement.output()
    skipped = output.count("already done (a previous delivery committed)")
    twice = sum(1 for key in keys if starts.get(key, 0) > 1)
    print(f"\nFIGURE: RabbitMQ, worker group SIGKILLed among {KILL_TASKS} idempotent tasks (-c 4, 0.2 s before and "
          f"after each commit): killed after {at_kill} effects with {waiting_at_kill} message(s) ready in the queue "
          f"right after; new worker ready {replaced:.1f}s after the kill; bodies started twice: {twice}; "
          f"redeliveries skipped as already done: {skipped}; effects {sum(effects.values())}, distinct "
          f"{len(effects)}; all {KILL_TASKS} effects present {recovered:.1f}s after the kill")
    assert {key: effects.get(key, 0) for key in keys} == {key: 1 for key in keys}, "every effect exactly once"
    assert at_kill < KILL_TASKS, "the kill landed mid-batch"
    assert twice + skipped >= 1, "the kill cut off runs that RabbitMQ delivered again"
    with engine.connect() as conn:
        done = conn.execute(sa.text("SELECT count(*) FROM websauna_tasks_done")).scalar_one()
    assert done == KILL_TASKS
