"""What the broker-outage fault tests share, whatever the broker (tests/test_fault_*_outage.py, test_fault_rabbitmq.py).

Four ``tests.apps.fault_producer`` processes commit transactions of
producer rows (``fault_commits``) and ``tests.fault.effect`` tasks; the
worker's runs write ``fault_effects``. A committed key with no effect is a
lost task, a key with two effects a duplicate.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import typing as t

import pytest
import sqlalchemy as sa

from websauna_tasks.testing import wait_for

ROOT = pathlib.Path(__file__).resolve().parent.parent
QUEUE = "faults"
#: The figure of docs/RELIABILITY.md and of CI is 10,000; ``WS_FAULT_TASKS`` sets another count for a quick
#: local run (the assertions hold for any multiple of PRODUCERS * PER_COMMIT).
TASKS = int(os.environ.get("WS_FAULT_TASKS", "10000"))
PRODUCERS = 4
PER_COMMIT = 5


class ProducerGroup:
    """Producer processes of one test; any still running at ``kill()`` is killed by its PID."""

    def __init__(self, tmp_path: pathlib.Path, env: dict[str, str]):
        self.tmp_path = tmp_path
        self.env = env
        self.started: list[tuple[subprocess.Popen, pathlib.Path]] = []

    def start(self, ini: str, index: int, count: int, per_commit: int = PER_COMMIT) -> tuple[subprocess.Popen,
                                                                                              pathlib.Path]:
        out = self.tmp_path / f"producer-{index}.out"
        with open(out, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "tests.apps.fault_producer", ini, str(index), str(count), str(per_commit)],
                stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT), env={**os.environ, **self.env})
        self.started.append((process, out))
        return process, out

    def kill(self) -> None:
        for process, _out in self.started:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(10)


@pytest.fixture
def producers(tmp_path, subprocess_env):
    """Start producer processes (``ProducerGroup.start``); any still running at teardown is killed by its PID."""
    group = ProducerGroup(tmp_path, subprocess_env)
    yield group.start
    group.kill()


@dataclasses.dataclass
class OutageRun:
    """A worker and producers under way, at the moment the broker is to be stopped."""

    worker: t.Any
    worker_pid: int
    running: list[tuple[subprocess.Popen, pathlib.Path]]
    began: float
    committed_at_stop: int


def start_outage(ini: str, engine, worker_factory, env: dict[str, str], producers: t.Callable[..., t.Any],
                 stop_at: float) -> OutageRun:
    """Start a ``-c 2`` worker and the producers; return once ``stop_at`` of the tasks are committed."""
    worker = worker_factory(ini, "worker", "-c", "2", env=env)
    began = time.monotonic()
    running = [producers(ini, index, TASKS // PRODUCERS) for index in range(PRODUCERS)]
    # Polled often: the stop must land mid-stream, not after the producers are done.
    wait_for(lambda: committed_count(engine) >= stop_at * TASKS, timeout=90, interval=0.02,
             describe=lambda: worker.output()[-3000:])
    return OutageRun(worker, worker.pid, running, began, committed_count(engine))


def finish_outage(run: OutageRun, engine, outbox: bool, busy: t.Callable[[], bool], timeout: float,
                  holds_messages: t.Callable[[], bool] | None = None) -> dict:
    """Wait for the producers, for the effects to settle and the broker to be drained; what both brokers report.

    ``busy()``: a message waits in the broker (polled 4 times a second by
    :func:`settle`); ``holds_messages()``: the broker still has a message of
    the queue, ready or delivered and not acknowledged (default ``busy``).
    """
    summaries = wait_for_producers(run.running)
    produced = time.monotonic()
    last_effect, settled = settle(engine, run.worker, outbox, busy, timeout=timeout, expected=TASKS)
    wait_drained(holds_messages or busy, run.worker)
    output = run.worker.output()
    result = outcome(engine)
    return {
        **result, "summaries": summaries, "produced": produced, "last_effect": last_effect, "settled": settled,
        "after_producers": last_effect - produced, "total": last_effect - run.began,
        "committed_at_stop": run.committed_at_stop,
        "unsent": unsent_rows(engine) if outbox else None,
        "redelivered": redelivered_rows(engine) if outbox else None,
        "same_worker": run.worker.process.poll() is None and run.worker.pid == run.worker_pid,
        "broker_losses": output.count("Connection to broker lost"),
        "skipped_redeliveries": output.count("already done (a previous delivery committed)"),
        "output": output,
    }


def wait_drained(holds_messages: t.Callable[[], bool], worker, timeout: float = 180.0) -> None:
    """Wait until no message of the queue waits, runs or is held by the worker (``holds_messages()`` false).

    The fault tasks acknowledge after their transaction (``acks_late``), so
    once the worker holds nothing every run that could still commit an
    effect, a late duplicate included, has committed it: the counts read
    after this are final. A worker that exited holds nothing any more. The
    bound is generous: with the outbox on, the relay's redeliveries (each
    one skipped as already done) can still be queued when every effect is.
    """
    wait_for(lambda: worker.process.poll() is not None or not holds_messages(), timeout=timeout, interval=0.1,
             describe=lambda: worker.output()[-3000:])


def wait_for_producers(running: list[tuple[subprocess.Popen, pathlib.Path]], timeout: float = 300) -> list[dict]:
    """Wait for every producer to exit with status 0; their JSON summaries."""
    for process, out in running:
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"producer {process.pid} still running:\n{out.read_text()[-3000:]}") from None
    statuses = [process.returncode for process, _out in running]
    assert statuses == [0] * len(running), "\n".join(out.read_text()[-3000:] for _p, out in running)
    return [summary_of(out) for _p, out in running]


def write_fault_ini(tmp_path, celery: dict, database_url: str, outbox: bool, name: str, **extra: str) -> str:
    settings = {"websauna.celery_config": repr(celery), "sqlalchemy.url": database_url,
                "websauna.site_url": "http://localhost", "websauna_tasks.outbox": "true" if outbox else "false",
                "websauna_tasks.outbox_poll_seconds": "0.5", **extra}
    lines = ["[app:main]", "use = call:tests.apps.fault_app:main"]
    lines += [f"{key} = {value}" for key, value in settings.items()]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def scalar(engine, sql: str) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text(sql)).scalar_one()


def committed_count(engine) -> int:
    return scalar(engine, "SELECT count(*) FROM fault_commits")


def effect_totals(engine) -> tuple[int, int]:
    with engine.connect() as conn:
        rows, distinct = conn.execute(sa.text("SELECT count(*), count(DISTINCT key) FROM fault_effects")).one()
    return rows, distinct


def unsent_rows(engine) -> int:
    return scalar(engine, "SELECT count(*) FROM websauna_tasks_outbox WHERE sent_at IS NULL")


def unfinished_rows(engine) -> int:
    """Outbox rows whose task has not committed yet and that the relay will still send again if need be."""
    return scalar(engine, "SELECT count(*) FROM websauna_tasks_outbox AS o WHERE o.redeliveries < 3 AND NOT EXISTS "
                          "(SELECT 1 FROM websauna_tasks_done AS d WHERE d.task_id = o.id)")


def redelivered_rows(engine) -> int:
    return scalar(engine, "SELECT count(*) FROM websauna_tasks_outbox WHERE redeliveries > 0")


def settle(engine, worker, outbox: bool, broker_busy: t.Callable[[], bool], timeout: float,
           quiet: float = 3.0, expected: int = TASKS) -> tuple[float, str]:
    """Wait until every key has an effect (outbox on) or nothing more will come; (time of the last effect, why).

    Nothing more comes once ``broker_busy()`` is false (no message waiting
    or held by the broker), the outbox has nothing unsent or unfinished (its
    relay would send it again) and the effects have not changed for
    ``quiet`` seconds, or once the worker has exited.
    """
    seen = effect_totals(engine)
    last_effect = quiet_since = time.monotonic()
    deadline = last_effect + timeout
    while True:
        if outbox and seen[1] >= expected:
            return last_effect, "all effects present"
        now = time.monotonic()
        if worker.process.poll() is not None:
            return last_effect, f"the worker exited with {worker.process.returncode}"
        if now - quiet_since >= quiet:
            return last_effect, "nothing left to run"
        if now >= deadline:
            return last_effect, f"still running after {timeout:.0f}s"
        time.sleep(0.25)
        totals = effect_totals(engine)
        changed = totals != seen
        if changed:
            seen, last_effect = totals, time.monotonic()
        if changed or broker_busy() or (outbox and (unsent_rows(engine) or unfinished_rows(engine))):
            quiet_since = time.monotonic()


def outcome(engine) -> dict:
    """Committed keys against effects: lost, duplicated, effects of keys never committed."""
    with engine.connect() as conn:
        committed = {row[0] for row in conn.execute(sa.text("SELECT key FROM fault_commits"))}
        commits = conn.execute(sa.text("SELECT count(*) FROM (SELECT DISTINCT producer, commit_no "
                                       "FROM fault_commits) AS c")).scalar_one()
        counts = dict(conn.execute(sa.text("SELECT key, count(*) FROM fault_effects GROUP BY key")).all())
    return {"committed": committed, "commits": commits, "counts": counts, "effects": sum(counts.values()),
            "distinct": len(counts), "duplicates": sum(count - 1 for count in counts.values()),
            "lost_keys": committed - set(counts), "strangers": len(set(counts) - committed)}


def summary_of(out: pathlib.Path) -> dict:
    lines = out.read_text(errors="replace").strip().splitlines()
    for line in reversed(lines):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError("producer wrote no summary:\n" + "\n".join(lines[-40:]))
