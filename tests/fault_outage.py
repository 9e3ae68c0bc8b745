"""What the broker-outage fault tests share, whatever the broker (tests/test_fault_*_outage.py, test_fault_rabbitmq.py).

Four ``tests.apps.fault_producer`` processes commit transactions of
producer rows (``fault_commits``) and ``tests.fault.effect`` tasks; the
worker's runs write ``fault_effects``. A committed key with no effect is a
lost task, a key with two effects a duplicate.
"""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import typing as t

import sqlalchemy as sa

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


def wait_for_producers(running: list[tuple[subprocess.Popen, pathlib.Path]], timeout: float = 120) -> list[dict]:
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
