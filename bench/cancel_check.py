"""The intake's cancellation check, per message: the store's lookup against the worker's watch (cancel.py).

Redis: EXISTS against the pub/sub watch; PostgreSQL (the SQL store, without Redis): a SELECT against the
LISTEN/NOTIFY watch.

    .venv/bin/python bench/cancel_check.py [--messages 5000] [--database postgresql+psycopg://...]

Needs the local Redis (WS_TEST_REDIS_URL, default redis://127.0.0.1:6379/15) and, for the SQL store's line,
PostgreSQL (WS_TEST_DATABASE_URL). Ids that are not cancelled, as almost every message's is; one cancelled
id is checked at the end of each run so that a check answering False for everything cannot pass.
"""
from __future__ import annotations

import argparse
import os
import time
import uuid

from tests.apps.testapp import main as app_main
from websauna_tasks import cancel
from websauna_tasks.cancel import RedisCancelStore, SQLCancelStore, cancelled_message, get_cancel_store


def per_message(registry, ids: list[str], watched: bool) -> float:
    cancelled_message(registry, ids[0], watched=watched)  # connect (and subscribe) first
    started = time.perf_counter()
    hits = sum(cancelled_message(registry, task_id, watched=watched) for task_id in ids)
    elapsed = (time.perf_counter() - started) / len(ids)
    assert hits == 0
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--redis", default=os.environ.get("WS_TEST_REDIS_URL", "redis://127.0.0.1:6379/15"))
    parser.add_argument("--database", default=os.environ.get(
        "WS_TEST_DATABASE_URL", "postgresql+psycopg://root@127.0.0.1:5432/test"))
    options = parser.parse_args()
    ids = [str(uuid.uuid4()) for _ in range(options.messages)]

    router = app_main({}, **{"websauna.celery_config": repr({"broker_url": options.redis}),
                             "sqlalchemy.url": options.database})
    registry = router.registry
    assert isinstance(get_cancel_store(registry), RedisCancelStore)
    marked = str(uuid.uuid4())
    cancel(marked, registry)
    before = per_message(registry, ids, watched=False)
    after = per_message(registry, ids, watched=True)
    assert cancelled_message(registry, marked, watched=True) and cancelled_message(registry, marked)
    print(f"Redis, EXISTS per message (before):     {before * 1e6:8.1f} us")
    print(f"Redis, the pub/sub watch (after):       {after * 1e6:8.1f} us   ({before / after:.0f}x less)")

    router = app_main({}, **{"websauna.celery_config": repr({"broker_url": "sqla+sqlite:////tmp/ws-bench-broker.db"}),
                             "sqlalchemy.url": options.database})
    registry = router.registry
    assert isinstance(get_cancel_store(registry), SQLCancelStore)
    cancel(marked, registry)
    sql_before = per_message(registry, ids[: max(1, options.messages // 5)], watched=False)
    sql_after = per_message(registry, ids, watched=True)
    assert cancelled_message(registry, marked, watched=True) and cancelled_message(registry, marked)
    print(f"SQL store, SELECT per message (before): {sql_before * 1e6:8.1f} us")
    print(f"SQL store, the LISTEN watch (after):    {sql_after * 1e6:8.1f} us   ({sql_before / sql_after:.0f}x less)")


if __name__ == "__main__":
    main()
