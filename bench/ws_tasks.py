"""websauna_tasks tasks of the benchmark (scanned by bench.ws_app)."""
from __future__ import annotations

import time

import redis
from sqlalchemy import text

from bench import settings
from websauna_tasks import RetryableTransactionTask, ScheduleOnCommitTask, task


@task(name="bench.ws.noop", base=ScheduleOnCommitTask)
def noop(index: int) -> None:
    """Nothing: what the dispatch benchmarks send."""


@task(name="bench.ws.touch", base=RetryableTransactionTask, bind=True)
def touch(self, row_id: int) -> int:
    """Read one row and write it back incremented, in the run's transaction."""
    dbsession = self.get_request().dbsession
    value = dbsession.execute(text("SELECT value FROM bench_rows WHERE id = :id"), {"id": row_id}).scalar_one()
    dbsession.execute(text("UPDATE bench_rows SET value = :v WHERE id = :id"), {"v": value + 1, "id": row_id})
    return value + 1


@task(name="bench.ws.mark", base=ScheduleOnCommitTask)
def mark(key: str) -> None:
    """Record when the worker got here (run.py times the span between two marks)."""
    client = redis.Redis.from_url(settings.broker_url())
    client.set(key, repr(time.time()), ex=3600)
    client.close()


@task(name="bench.ws.stamp", base=ScheduleOnCommitTask)
def stamp(key: str, committed_at: float) -> None:
    """bench/growth.py's latency: how long after its commit began this run started."""
    client = redis.Redis.from_url(settings.broker_url())
    client.rpush(key, repr(time.time() - committed_at))
    client.close()


@task(name="bench.ws.rss", base=ScheduleOnCommitTask)
def rss(key: str) -> None:
    """bench/growth.py's memory mark: this worker process's resident set size, in KiB."""
    client = redis.Redis.from_url(settings.broker_url())
    client.set(key, settings.own_rss_kib(), ex=3600)
    client.close()
