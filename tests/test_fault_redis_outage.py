"""Redis stopped and started again while 4 producer processes dispatch 10,000 tasks on commit.

A private Redis (append-only, fsync always: what it acknowledged survives
the stop) and a private PostgreSQL (tests/servers.py); the machine's
services are not touched. Four ``tests.fault_producer`` processes each
commit 500 transactions of 5 producer rows and 5 ``tests.fault.effect``
tasks; one ws-celery worker (``-c 2``) runs them. When about 30% are
committed, Redis gets SIGTERM, stays down a few seconds and is started
again on the same port; neither the producers nor the worker are helped.

- Outbox on: every committed key has exactly one effect.
- Outbox off: messages published while Redis was down are gone although
  their transactions committed; that count is the figure (and the reason
  for the outbox).
"""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import sqlalchemy as sa

from tests import fault_tasks
from tests.fault_producer import COMMITS_DDL
from tests.servers import PrivatePostgres, PrivateRedis
from websauna_tasks.testing import wait_for

pytestmark = [pytest.mark.fault, pytest.mark.slow]

ROOT = pathlib.Path(__file__).resolve().parent.parent
QUEUE = "faults"
TASKS = 10_000
PRODUCERS = 4
PER_COMMIT = 5
#: Share of the tasks committed when Redis is stopped.
STOP_AT = 0.30
OUTAGE_SECONDS = 5.0


@pytest.fixture
def servers(tmp_path):
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    broker = PrivateRedis(str(redis_dir), persistent=True)
    database = PrivatePostgres()
    engine = None
    try:
        broker.start()
        database.start()
        engine = sa.create_engine(database.url, poolclass=sa.pool.NullPool)
        with engine.begin() as conn:
            conn.execute(sa.text(fault_tasks.EFFECTS_DDL))
            conn.execute(sa.text(COMMITS_DDL))
        yield broker, database, engine
    finally:
        if engine is not None:
            engine.dispose()
        broker.stop()
        database.cleanup()


@pytest.fixture
def producers(tmp_path, subprocess_env):
    """Start producer processes; any still running at teardown is killed by its PID."""
    started: list[tuple[subprocess.Popen, pathlib.Path]] = []

    def start(ini: str, index: int, count: int) -> tuple[subprocess.Popen, pathlib.Path]:
        out = tmp_path / f"producer-{index}.out"
        with open(out, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "tests.fault_producer", ini, str(index), str(count), str(PER_COMMIT)],
                stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT), env={**os.environ, **subprocess_env})
        started.append((process, out))
        return process, out

    yield start
    for process, _out in started:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)


def write_fault_ini(tmp_path, broker: PrivateRedis, database: PrivatePostgres, outbox: bool) -> str:
    celery = {"broker_url": broker.url, "task_default_queue": QUEUE, "task_ignore_result": True}
    settings = {"websauna.celery_config": repr(celery), "sqlalchemy.url": database.url,
                "websauna.site_url": "http://localhost", "websauna_tasks.outbox": "true" if outbox else "false",
                "websauna_tasks.outbox_poll_seconds": "0.5"}
    lines = ["[app:main]", "use = call:tests.fault_app:main"] + [f"{key} = {value}" for key, value in settings.items()]
    path = tmp_path / "fault-redis.ini"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def scalar(engine, sql: str) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text(sql)).scalar_one()


def effect_totals(engine) -> tuple[int, int]:
    with engine.connect() as conn:
        rows, distinct = conn.execute(sa.text("SELECT count(*), count(DISTINCT key) FROM fault_effects")).one()
    return rows, distinct


def missing_report(engine, client, worker_log: str) -> str:
    """Where the committed keys without an effect are stuck: outbox row, Redis, worker log."""
    with engine.connect() as conn:
        missing = [row[0] for row in conn.execute(sa.text(
            "SELECT c.key FROM fault_commits c LEFT JOIN fault_effects e ON e.key = c.key "
            "WHERE e.key IS NULL ORDER BY c.key LIMIT 10"))]
        lines = [f"effects {effect_totals(engine)}; queue {client.llen(QUEUE)}, unacked {client.hlen('unacked')}; "
                 f"first keys without an effect: {missing}"]
        for key in missing:
            for task_id, sent_at in conn.execute(sa.text(
                    "SELECT id, sent_at FROM websauna_tasks_outbox WHERE args = :args"), {"args": json.dumps([key])}):
                seen = [line for line in worker_log.splitlines() if task_id in line]
                lines.append(f"{key}: outbox row {task_id} sent_at={sent_at}, in unacked: "
                             f"{client.hexists('unacked', task_id)}, worker log: {seen}")
    return "\n".join(lines + ["worker log tail:", worker_log[-4000:]])


def summary_of(out: pathlib.Path) -> dict:
    lines = out.read_text(errors="replace").strip().splitlines()
    for line in reversed(lines):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"producer wrote no summary:\n{''.join(lines[-40:])}")


def run_outage(outbox: bool, servers, tmp_path, ws_celery_worker_factory, subprocess_env, producers) -> dict:
    broker, database, engine = servers
    ini = write_fault_ini(tmp_path, broker, database, outbox)
    worker = ws_celery_worker_factory(ini, "worker", "-c", "2", env=subprocess_env)
    worker_pid = worker.pid

    began = time.monotonic()
    running = [producers(ini, index, TASKS // PRODUCERS) for index in range(PRODUCERS)]

    # Poll often: the stop must land mid-stream, not after the producers are done.
    wait_for(lambda: scalar(engine, "SELECT count(*) FROM fault_commits") >= STOP_AT * TASKS, timeout=90,
             interval=0.02, describe=lambda: worker.output()[-3000:])
    committed_at_stop = scalar(engine, "SELECT count(*) FROM fault_commits")
    stopped = time.monotonic()
    broker.stop()
    time.sleep(OUTAGE_SECONDS)
    committed_during = scalar(engine, "SELECT count(*) FROM fault_commits") - committed_at_stop
    broker.start()  # same port, same append-only file
    restarted = time.monotonic()
    outage = restarted - stopped
    committed_at_restart = committed_at_stop + committed_during

    for process, out in running:
        try:
            process.wait(120)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"producer {process.pid} still running:\n{out.read_text()[-3000:]}") from None
    statuses = [process.returncode for process, _out in running]
    assert statuses == [0] * PRODUCERS, "\n".join(out.read_text()[-3000:] for _p, out in running)
    summaries = [summary_of(out) for _p, out in running]
    produced = time.monotonic()

    client = broker.client()
    try:
        if outbox:
            wait_for(lambda: effect_totals(engine)[1] >= TASKS, timeout=120, interval=0.25,
                     describe=lambda: missing_report(engine, client, worker.output()))
            last_change = time.monotonic()
            time.sleep(1.0)  # a duplicate committed late would show now
        else:
            # What was lost never comes: wait until the queue is empty and the
            # effects have stopped growing.
            seen = effect_totals(engine)
            last_change = time.monotonic()
            deadline = last_change + 120
            while time.monotonic() - last_change < 3.0:
                assert time.monotonic() < deadline, f"effects still growing: {seen}\n{worker.output()[-6000:]}"
                time.sleep(0.25)
                now = effect_totals(engine)
                if now != seen or client.llen(QUEUE):
                    seen, last_change = now, time.monotonic()
        queued_after = client.llen(QUEUE)
        unacked_after = client.hlen("unacked")
    finally:
        client.close()

    with engine.connect() as conn:
        committed = dict(conn.execute(sa.text("SELECT key, commit_no FROM fault_commits")).all())
        commits = conn.execute(sa.text("SELECT count(*) FROM (SELECT DISTINCT producer, commit_no "
                                       "FROM fault_commits) AS c")).scalar_one()
        counts = dict(conn.execute(sa.text("SELECT key, count(*) FROM fault_effects GROUP BY key")).all())
        unsent = conn.execute(sa.text("SELECT count(*) FROM websauna_tasks_outbox WHERE sent_at IS NULL")
                              ).scalar_one() if outbox else None
    output = worker.output()
    assert worker.process.poll() is None and worker.pid == worker_pid, "the same worker, never restarted"
    return {
        "worker_log": output,
        "committed": committed,
        "commits": commits,
        "counts": counts,
        "effects": sum(counts.values()),
        "distinct": len(counts),
        "duplicates": sum(count - 1 for count in counts.values()),
        "lost": len(set(committed) - set(counts)),
        "strangers": len(set(counts) - set(committed)),
        "committed_at_stop": committed_at_stop,
        "committed_during": committed_during,
        "committed_at_restart": committed_at_restart,
        "outage": outage,
        "drain": last_change - restarted,
        "after_producers": last_change - produced,
        "total": last_change - began,
        "summaries": summaries,
        "unsent": unsent,
        "queued_after": queued_after,
        "unacked_after": unacked_after,
    }


def common_figures(result: dict) -> str:
    slowest = max(summary["slowest_commit_seconds"] for summary in result["summaries"])
    return (f"{TASKS} tasks dispatched by {PRODUCERS} producer processes in {result['commits']} commits "
            f"({len(result['committed'])} keys committed); Redis down {result['outage']:.1f}s, stopped after "
            f"{result['committed_at_stop']} and started after {result['committed_at_restart']} committed "
            f"({result['committed_during']} committed while it was down); effects present {result['effects']}, "
            f"distinct keys {result['distinct']}, duplicates {result['duplicates']}, lost {result['lost']}; "
            f"last effect {result['drain']:.1f}s after the restart ({result['after_producers']:.1f}s after the "
            f"producers exited, {result['total']:.1f}s after they started); slowest commit {slowest:.1f}s")


def test_redis_outage_with_the_outbox_loses_nothing(servers, tmp_path, ws_celery_worker_factory, subprocess_env,
                                                    producers):
    result = run_outage(True, servers, tmp_path, ws_celery_worker_factory, subprocess_env, producers)
    committed, counts = result["committed"], result["counts"]
    fast_path = sum(summary["fast_path_published"] for summary in result["summaries"])
    print(f"\nFIGURE: outbox on: {common_figures(result)}; of the {TASKS} outbox rows the producers' fast path "
          f"published {fast_path} and the worker's relay {TASKS - fast_path}, {result['unsent']} left unsent; "
          "same worker process throughout, no restart")
    assert len(committed) == TASKS and result["commits"] == TASKS // PER_COMMIT
    assert result["committed_during"] >= 1, "the producers committed while Redis was down"
    assert result["committed_at_restart"] < TASKS, "Redis came back mid-stream"
    assert {key: counts.get(key, 0) for key in committed} == {key: 1 for key in committed}, \
        "every committed key exactly once"
    assert result["strangers"] == 0
    assert result["unsent"] == 0


def test_redis_outage_without_the_outbox_loses_committed_tasks(servers, tmp_path, ws_celery_worker_factory,
                                                               subprocess_env, producers):
    result = run_outage(False, servers, tmp_path, ws_celery_worker_factory, subprocess_env, producers)
    print(f"\nFIGURE: outbox off: {common_figures(result)}; the {result['lost']} lost tasks belong to "
          "transactions that committed (their producer rows are there) while their messages never reached Redis; "
          f"{result['queued_after']} left queued; same worker process throughout, no restart")
    assert len(result["committed"]) == TASKS and result["commits"] == TASKS // PER_COMMIT
    assert result["committed_during"] >= 1, "the producers committed while Redis was down"
    assert result["committed_at_restart"] < TASKS, "Redis came back mid-stream"
    assert result["duplicates"] == 0, "idempotent: no key ran twice"
    assert result["strangers"] == 0
    assert result["lost"] >= 1, "an outage under producers without the outbox costs tasks"
