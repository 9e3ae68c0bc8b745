"""Leak check: thousands of task runs must not leak database connections or memory.

Runs a database-touching task (``tests.transactional_insert``: a fresh
request, a session, an INSERT, a COMMIT, the request closed; every tenth run
raises instead, so the abort path and a stored traceback are exercised too)
in-process with ``task.apply()`` and, after a warm-up, samples every
``block`` runs:

- PostgreSQL connections of this app (``pg_stat_activity`` filtered by an
  ``application_name`` private to the check) and the pool's checked-out count;
- after ``gc.collect()``: memory blocks the interpreter holds
  (``sys.getallocatedblocks()``, free to keep on), live objects tracked by
  the gc, RSS and, with ``trace=True``, the tracemalloc heap (which halves
  the run rate, so the test leaves it off).

Growth is the least-squares slope of those samples, per ``block`` runs.
``tests/test_leaks.py`` asserts bounds on the same figures. Standalone::

    .venv/bin/python -m bench.leak_check [--runs 10000] [--block 1000]

It creates (and drops) a private database in ``BENCH_DATABASE_URL``.
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import statistics
import sys
import time
import tracemalloc
import uuid
from dataclasses import dataclass, field

import sqlalchemy
from sqlalchemy import text
from sqlalchemy.pool import NullPool

#: Pool size the check configures: connections must never exceed it.
POOL_SIZE = 5


@dataclass
class Sample:
    runs: int
    connections: int
    checked_out: int
    blocks: int
    objects: int
    rss_bytes: int
    traced_bytes: int | None


@dataclass
class LeakFigures:
    runs: int
    block: int
    warmup: int
    seconds: float
    traced: bool
    samples: list[Sample] = field(default_factory=list)

    @property
    def runs_per_second(self) -> float:
        return (self.runs - self.warmup) / self.seconds

    @property
    def max_connections(self) -> int:
        return max(s.connections for s in self.samples)

    @property
    def max_checked_out(self) -> int:
        return max(s.checked_out for s in self.samples)

    def growth_per_block(self, attribute: str) -> float:
        """Slope of ``attribute`` over the samples, per ``block`` runs."""
        xs = [s.runs for s in self.samples]
        ys = [getattr(s, attribute) for s in self.samples]
        return statistics.linear_regression(xs, ys).slope * self.block

    def report(self) -> str:
        traced = (f", tracemalloc {self.growth_per_block('traced_bytes') / 1024:+.1f} KiB" if self.traced else "")
        return "\n".join([
            f"{self.runs - self.warmup} runs after {self.warmup} warm-up runs in {self.seconds:.1f}s "
            f"({self.runs_per_second:.0f} runs/s, tracemalloc {'on' if self.traced else 'off'})",
            f"connections of the app: max {self.max_connections} (pool size {POOL_SIZE}), "
            f"max checked out between runs {self.max_checked_out}",
            f"growth per {self.block} runs: blocks {self.growth_per_block('blocks'):+.1f}, "
            f"objects {self.growth_per_block('objects'):+.1f}, RSS {self.growth_per_block('rss_bytes') / 1024:+.1f} KiB"
            + traced,
            "samples (runs, connections, blocks, objects, RSS KiB): " + ", ".join(
                f"({s.runs}, {s.connections}, {s.blocks}, {s.objects}, {s.rss_bytes // 1024})" for s in self.samples),
        ])


def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def count_connections(monitor: sqlalchemy.Engine, application_name: str) -> int:
    with monitor.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :name"),
                            {"name": application_name}).scalar_one()


def tagged_url(database_url: str, application_name: str) -> str:
    """The URL with an ``application_name`` that makes the app's connections countable."""
    url = sqlalchemy.engine.make_url(database_url).update_query_dict({
        "application_name": application_name,
        # The check is about leaks, not durability: do not wait for the WAL flush at each COMMIT.
        "options": "-c synchronous_commit=off",
    })
    return url.render_as_string(hide_password=False)


def measure_in_process(database_url: str, runs: int = 10_000, block: int = 1_000, warmup: int = 1_000,
                       trace: bool = False) -> LeakFigures:
    """Run ``tests.transactional_insert`` ``runs`` times with ``apply()`` and sample every ``block`` runs.

    The database must have the ``ws_test_effects`` table.
    """
    from tests.apps import sample_tasks
    from tests.apps.testapp import main
    from websauna_tasks.db import get_engine

    application_name = f"ws-leak-{uuid.uuid4().hex[:8]}"
    router = main({}, **{
        # apply() never talks to the broker; memory:// keeps the check self-contained.
        "websauna.celery_config": repr({"broker_url": "memory://"}),
        "sqlalchemy.url": tagged_url(database_url, application_name),
        "sqlalchemy.pool_size": str(POOL_SIZE),
    })
    engine = get_engine(router.registry)
    monitor = sqlalchemy.create_engine(database_url, poolclass=NullPool)
    task = sample_tasks.transactional_insert

    def run_block(count: int) -> None:
        for index in range(count):
            result = task.apply(args=(index,), kwargs={"fail": index % 10 == 0})
            if result.failed() != (index % 10 == 0):
                raise AssertionError(f"run {index}: unexpected outcome {result.state}: {result.result!r}")

    figures = LeakFigures(runs=runs, block=block, warmup=warmup, seconds=0.0, traced=trace)

    def sample(done: int) -> Sample:
        gc.collect()
        # Each earlier Sample is a live object and a few blocks itself: not a leak of the runs.
        return Sample(runs=done, connections=count_connections(monitor, application_name),
                      checked_out=engine.pool.checkedout(),
                      blocks=sys.getallocatedblocks() - 2 * len(figures.samples),
                      objects=len(gc.get_objects()) - len(figures.samples), rss_bytes=rss_bytes(),
                      traced_bytes=tracemalloc.get_traced_memory()[0] if trace else None)

    # Celery logs each failed run with its traceback: keep the output readable.
    trace_logger = logging.getLogger("celery.app.trace")
    logger_was_disabled, trace_logger.disabled = trace_logger.disabled, True
    try:
        if trace:
            # Started before the warm-up, so that its own bookkeeping has settled too.
            tracemalloc.start()
        run_block(warmup)
        done = warmup
        figures.samples.append(sample(done))
        while done < runs:
            count = min(block, runs - done)
            started = time.perf_counter()
            run_block(count)
            # Only the runs count towards the rate, not the sampling.
            figures.seconds += time.perf_counter() - started
            done += count
            figures.samples.append(sample(done))
        return figures
    finally:
        trace_logger.disabled = logger_was_disabled
        tracemalloc.stop()
        engine.dispose()
        monitor.dispose()


def main() -> None:
    from bench.services import private_database
    from bench.settings import DATABASE_URL

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--block", type=int, default=1_000)
    parser.add_argument("--warmup", type=int, default=1_000)
    parser.add_argument("--no-tracemalloc", dest="trace", action="store_false")
    options = parser.parse_args()
    with private_database(DATABASE_URL) as database_url:
        engine = sqlalchemy.create_engine(database_url, poolclass=NullPool)
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE ws_test_effects (id serial PRIMARY KEY, task_id text, value text)"))
        engine.dispose()
        print(measure_in_process(database_url, options.runs, options.block, options.warmup,
                                 options.trace).report())


if __name__ == "__main__":
    main()
