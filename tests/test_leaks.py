"""Thousands of task runs leak neither database connections nor memory.

The in-process check is ``bench/leak_check.py`` (run it alone for the
figures with tracemalloc); here its figures must stay within bounds. The
worker variant runs fewer tasks through a real prefork worker and watches
the pool children from outside.
"""
from __future__ import annotations

import pathlib

import pytest
from sqlalchemy import text

from bench.leak_check import (
    POOL_SIZE,
    count_connections,
    measure_in_process,
    rss_bytes,
    tagged_url,
)
from tests.apps import sample_tasks
from tests.test_worker_request import worker_settings
from websauna_tasks.testing import wait_for

RUNS = 10_000
BLOCK = 1_000

# A leak of one object or one small string per run grows by about 1,000 per 1,000 runs.
MAX_BLOCKS_GROWTH = 100
MAX_OBJECTS_GROWTH = 10
# RSS moves with the allocator in steps of pages; 256 KiB per 1,000 runs is 256 bytes per run.
MAX_RSS_GROWTH = 256 * 1024


@pytest.mark.slow
def test_ten_thousand_runs_in_process_leak_nothing(database_url, db):
    figures = measure_in_process(database_url, runs=RUNS, block=BLOCK, warmup=2_000)
    print("\n" + figures.report())
    assert 1 <= figures.max_connections <= POOL_SIZE  # >= 1: the counting itself sees the app
    assert figures.max_checked_out == 0, "a run left its connection checked out"
    assert figures.growth_per_block("blocks") < MAX_BLOCKS_GROWTH
    assert figures.growth_per_block("objects") < MAX_OBJECTS_GROWTH
    assert figures.growth_per_block("rss_bytes") < MAX_RSS_GROWTH
    with db.connect() as conn:
        # Every run did touch the database: nine in ten committed their row.
        assert conn.execute(text("SELECT count(*) FROM ws_test_effects")).scalar_one() == RUNS - RUNS // 10


def pool_children(pid: int) -> list[int]:
    children = pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return sorted(int(child) for child in children)


WORKER_WARMUP = 500
WORKER_RUNS = 2_000


@pytest.mark.slow
def test_worker_children_keep_their_connections_and_memory(redis_url, database_url, queue_name, db, make_app,
                                                           write_ini, ws_celery_worker_factory, subprocess_env):
    application_name = f"ws-leak-{queue_name}"
    settings = worker_settings(redis_url, tagged_url(database_url, application_name), queue_name,
                               results=False, **{"sqlalchemy.pool_size": str(POOL_SIZE)})
    # An INI value goes through ConfigParser interpolation: the URL's percent-escapes must be doubled.
    ini = write_ini({key: value.replace("%", "%%") for key, value in settings.items()})
    worker = ws_celery_worker_factory(ini, "worker", "-c", "2", "-l", "info", env=subprocess_env)
    children = pool_children(worker.pid)
    assert len(children) == 2
    make_app(**settings)

    def rows() -> int:
        with db.connect() as conn:
            return conn.execute(text("SELECT count(*) FROM ws_test_effects")).scalar_one()

    def run(count: int, total: int) -> None:
        for index in range(count):
            sample_tasks.transactional_insert.apply_async(args=(index,), tm=None)
        wait_for(lambda: rows() == total, timeout=60,
                 describe=lambda: f"{rows()} of {total} rows\n{worker.output()[-3000:]}")

    run(WORKER_WARMUP, WORKER_WARMUP)
    before = {child: rss_bytes(child) for child in children}
    connections = [count_connections(db, application_name)]
    run(WORKER_RUNS, WORKER_WARMUP + WORKER_RUNS)
    connections.append(count_connections(db, application_name))
    after = {child: rss_bytes(child) for child in children}

    assert pool_children(worker.pid) == children, "a pool child was replaced during the runs"
    growth = {child: (after[child] - before[child]) * BLOCK / WORKER_RUNS for child in children}
    print(f"\nworker: {WORKER_RUNS} runs after {WORKER_WARMUP}; app connections {connections}; "
          f"RSS growth per {BLOCK} runs by child: " + ", ".join(f"{g / 1024:+.0f} KiB" for g in growth.values()))
    # One task at a time per child: one pooled connection each, kept, never more; the parent opened none.
    assert 1 <= connections[0] == connections[1] <= len(children)
    assert all(g < 4 * MAX_RSS_GROWTH for g in growth.values())
