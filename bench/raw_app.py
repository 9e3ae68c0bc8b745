"""The baseline: a plain Celery app, no Pyramid, no transaction.

Worker: ``celery -A bench.raw_app worker -c 2`` (run.py starts it with the
environment of the run).
"""
from __future__ import annotations

import importlib
import os
import time

import redis
from celery import Celery

from bench import settings

# bench/growth.py --rss-raw-preload: modules a real app's worker would hold (sqlalchemy.orm, psycopg),
# imported at start so that the memory comparison is not against a worker without a database layer.
for _module in filter(None, os.environ.get("BENCH_RAW_PRELOAD", "").split(",")):
    importlib.import_module(_module)

app = Celery("bench_raw", set_as_current=False)
app.conf.update(settings.celery_config())


@app.task(name="bench.raw.noop")
def noop(index: int) -> None:
    """Nothing: the cheapest task Celery can run."""


@app.task(name="bench.raw.mark")
def mark(key: str) -> None:
    """Record when the worker got here (run.py times the span between two marks)."""
    client = redis.Redis.from_url(settings.broker_url())
    client.set(key, repr(time.time()), ex=3600)
    client.close()


# The same database work as bench.ws.touch, with plain SQLAlchemy and no
# Pyramid: what the work itself costs. The engine is made on first use, in
# the pool child, so no connection crosses a fork.
_engine = None


@app.task(name="bench.raw.touch")
def touch(row_id: int) -> int:
    global _engine
    if _engine is None:
        import sqlalchemy

        _engine = sqlalchemy.create_engine(os.environ[settings.DATABASE_ENV])
    from sqlalchemy import text

    with _engine.begin() as conn:
        value = conn.execute(text("SELECT value FROM bench_rows WHERE id = :id"), {"id": row_id}).scalar_one()
        conn.execute(text("UPDATE bench_rows SET value = :v WHERE id = :id"), {"v": value + 1, "id": row_id})
    return value + 1


_sessions = None


@app.task(name="bench.raw.touch_session")
def touch_session(row_id: int) -> int:
    """bench.raw.touch through an ORM Session, as request.dbsession is: what the Session costs (run.py --context)."""
    global _sessions
    if _sessions is None:
        import sqlalchemy
        from sqlalchemy.orm import sessionmaker

        _sessions = sessionmaker(sqlalchemy.create_engine(os.environ[settings.DATABASE_ENV]))
    from sqlalchemy import text

    with _sessions() as session:
        value = session.execute(text("SELECT value FROM bench_rows WHERE id = :id"), {"id": row_id}).scalar_one()
        session.execute(text("UPDATE bench_rows SET value = :v WHERE id = :id"), {"v": value + 1, "id": row_id})
        session.commit()
    return value + 1


@app.task(name="bench.raw.touch_session_late", acks_late=True)
def touch_session_late(row_id: int) -> int:
    """bench.raw.touch_session delivered as ours is: acknowledged after the run (run.py --context, with prefetch 1)."""
    return touch_session.run(row_id)


@app.task(name="bench.raw.rss")
def rss(key: str) -> None:
    """bench/growth.py's memory mark, as bench.ws.rss."""
    client = redis.Redis.from_url(settings.broker_url())
    client.set(key, settings.own_rss_kib(), ex=3600)
    client.close()


@app.task(name="bench.raw.stamp")
def stamp(key: str, sent_at: float) -> None:
    """bench/growth.py's latency, as bench.ws.stamp: how long after apply_async began this run started."""
    client = redis.Redis.from_url(settings.broker_url())
    client.rpush(key, repr(time.time() - sent_at))
    client.close()
