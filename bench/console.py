"""Page times of the operator console (docs/console.md): figures to read, not timed tests.

    .venv/bin/python bench/console.py [--letters 100000] [--queues 10] [--rounds 20]

Needs Redis (WS_TEST_REDIS_URL, default redis://127.0.0.1:6379/15) and
PostgreSQL (WS_TEST_DATABASE_URL) for the outbox figures. Keys of its own,
deleted at the end. Each page is requested through WebTest (the WSGI app,
no HTTP), ``--rounds`` times; the median and the slowest are printed.

- dead letters: the first page, a middle page and the last page of a list
  of ``--letters`` entries (real entries, as a worker writes them) in the
  Redis list (page numbers); in the table of a non-Redis broker's app
  (PostgreSQL) the first page, a keyset page halfway down and the oldest
  page, with the offset query the pages used before for comparison;
- the overview with ``--queues`` declared queues (each with a rate and a
  concurrency limit, so every part of a queue row is read), with and without
  the broadcast to workers (which waits its full timeout, 1 s, when no
  worker is running: Celery cannot know how many would answer).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time
import uuid

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

REDIS_URL = os.environ.get("WS_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
DATABASE_URL = os.environ.get("WS_TEST_DATABASE_URL", "postgresql+psycopg://root@127.0.0.1:5432/test")
OPERATOR = {"X-Test-User": "operator"}


def timed(app, path: str, rounds: int) -> tuple[float, float]:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        response = app.get(path, headers=OPERATOR)
        times.append(time.perf_counter() - start)
        assert response.status_int == 200, path
    return statistics.median(times), max(times)


def timed_drops(app, task_ids: list[str]) -> tuple[float, float]:
    """A confirmed drop of each letter through the console: the action, not the page, at this many letters."""
    import re

    page = app.get("/_tasks/dead-letters", headers=OPERATOR)
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    times = []
    for task_id in task_ids:
        start = time.perf_counter()
        response = app.post("/_tasks/dead-letters/act", {"csrf_token": token, "action": "drop", "ids": task_id,
                                                         "confirmed": "yes"}, headers=OPERATOR)
        times.append(time.perf_counter() - start)
        assert "dropped=1" in response.location, task_id
    return statistics.median(times), max(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--letters", type=int, default=100_000)
    parser.add_argument("--queues", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=20)
    options = parser.parse_args()

    import kombu
    import redis
    from webtest import TestApp

    from tests.apps.console_app import main as console_main
    from websauna_tasks import get_celery
    from websauna_tasks.console import overview
    from websauna_tasks.deadletter import dead_letter, get_dead_letters

    run = uuid.uuid4().hex[:8]
    queues = [f"bench-{run}-q{n}" for n in range(options.queues)]
    dead_key = f"bench-{run}.dead"
    celery_config = {"broker_url": REDIS_URL, "task_default_queue": queues[0]}
    settings = {"websauna.celery_config": repr(celery_config), "sqlalchemy.url": DATABASE_URL,
                "websauna_tasks.deadletter_queue": dead_key, "websauna_tasks.outbox": "true",
                "websauna_tasks.queues": repr([{"name": name, "rate_per_second": 10, "max_concurrent": 4}
                                               for name in queues])}
    router = console_main({}, **settings)
    app, celery = TestApp(router), get_celery(router.registry)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        # One real entry, as a worker writes it; the others are copies under ids of their own.
        task_id = celery.send_task("bench.no_such_task", args=("x" * 40,), queue=queues[0]).id
        with celery.connection_for_read() as connection:
            message = kombu.Queue(queues[0])(connection.default_channel).get(no_ack=True)
        entry = dead_letter(get_dead_letters(celery), message, "unknown_task", KeyError("bench.no_such_task"))
        client.delete(dead_key)
        started = time.perf_counter()
        pipe = client.pipeline(transaction=False)
        for number in range(options.letters):
            pipe.rpush(dead_key, json.dumps(dict(entry, id=f"{task_id}-{number}")))
            if number % 5000 == 4999:
                pipe.execute()
        pipe.execute()
        print(f"{options.letters} dead letters written in {time.perf_counter() - started:.1f} s "
              f"(Redis list {dead_key})")
        pages = -(-options.letters // 50)
        for label, path in (("first page", "/_tasks/dead-letters"),
                            ("middle page", f"/_tasks/dead-letters?page={pages // 2}"),
                            ("last page", f"/_tasks/dead-letters?page={pages}")):
            median, slowest = timed(app, path, options.rounds)
            print(f"dead letters, {label} of {pages}: median {median * 1000:.1f} ms, slowest {slowest * 1000:.1f} ms")
        # Drops of letters halfway down the list: finding one by id reads the whole list (a list has no index).
        median, slowest = timed_drops(app, [f"{task_id}-{options.letters // 2 + n}" for n in range(3)])
        print(f"dead letters, drop one by id ({options.letters} letters): median {median * 1000:.1f} ms, "
              f"slowest {slowest * 1000:.1f} ms")
        for queue in queues:
            for _ in range(3):
                celery.send_task("bench.no_such_task", queue=queue)
        median, slowest = timed(app, "/_tasks/", max(3, options.rounds // 4))
        print(f"overview, {options.queues} queues, {options.letters} dead letters, workers asked "
              f"(no worker running: the broadcast waits its {overview.INSPECT_TIMEOUT:g} s): "
              f"median {median * 1000:.1f} ms, slowest {slowest * 1000:.1f} ms")
        original = overview.workers
        overview.workers = lambda app, timeout=0.0: {"notice": "not asked", "rows": []}
        try:
            median, slowest = timed(app, "/_tasks/", options.rounds)
        finally:
            overview.workers = original
        print(f"overview, {options.queues} queues, without the broadcast (queues, leases, outbox, dead letters "
              f"by kind over the newest 500, periodic): median {median * 1000:.1f} ms, slowest {slowest * 1000:.1f} ms")
        sql_pages(options, entry, task_id, run)
    finally:
        client.delete(dead_key, *queues, *(f"_kombu.binding.{queue}" for queue in queues))
        for key in client.scan_iter(match=f"websauna_tasks:queue:{celery.main}:bench-{run}-*"):
            client.delete(key)


def sql_pages(options: argparse.Namespace, entry: dict, task_id: str, run: str) -> None:
    """The same pages over the table websauna_tasks_dead_letters (a broker that is not Redis), on PostgreSQL."""
    import sqlalchemy as sa
    from webtest import TestApp

    from tests.apps.console_app import main as console_main
    from websauna_tasks.db import get_engine
    from websauna_tasks.schema import dead_letters_table

    list_name = f"bench-{run}-sql.dead"
    settings = {"websauna.celery_config": repr({"broker_url": "memory://", "task_always_eager": True}),
                "sqlalchemy.url": DATABASE_URL, "websauna_tasks.deadletter_queue": list_name}
    router = console_main({}, **settings)
    app, engine = TestApp(router), get_engine(router.registry)
    app.get("/_tasks/dead-letters", headers=OPERATOR)  # the store creates its table on first use
    try:
        started = time.perf_counter()
        rows = []
        with engine.begin() as conn:
            for number in range(options.letters):
                letter = dict(entry, id=f"{task_id}-{number}")
                # The columns say what the entry says, or the store would list the row as unreadable.
                rows.append({"list_name": list_name, "task_id": letter["id"], "kind": letter["kind"],
                             "recorded_at": letter["timestamp"], "entry": json.dumps(letter)})
                if len(rows) == 5000:
                    conn.execute(dead_letters_table.insert(), rows)
                    rows = []
            if rows:
                conn.execute(dead_letters_table.insert(), rows)
        print(f"{options.letters} dead letters written in {time.perf_counter() - started:.1f} s "
              f"(table websauna_tasks_dead_letters, PostgreSQL)")
        if engine.dialect.name == "postgresql":
            with engine.begin() as conn:
                conn.execute(sa.text("ANALYZE websauna_tasks_dead_letters"))
        table = dead_letters_table
        with engine.connect() as conn:
            # The seq an "older ›" link carries halfway down the list, as an operator clicking through would reach.
            middle = conn.execute(sa.select(table.c.seq).where(table.c.list_name == list_name).order_by(
                table.c.seq.desc()).offset(options.letters // 2).limit(1)).scalar_one()
        # Keyset pages (deadletters/_pages.py): older than a row, and the oldest (after=0).
        for label, path in (("first page", "/_tasks/dead-letters"),
                            (f"keyset page {options.letters // 2:,} letters deep",
                             f"/_tasks/dead-letters?before={middle}"),
                            ("oldest page", "/_tasks/dead-letters?after=0")):
            median, slowest = timed(app, path, options.rounds)
            print(f"dead letters in SQL, {label}: median {median * 1000:.1f} ms, slowest {slowest * 1000:.1f} ms")
        median, slowest = timed_drops(app, [f"{task_id}-{options.letters // 2 + n}" for n in range(3)])
        print(f"dead letters in SQL, drop one by id (task_id index): median {median * 1000:.1f} ms, "
              f"slowest {slowest * 1000:.1f} ms")
        # What the offset pages cost before (the same query as SQLStore.read with a start and a stop).
        for label, offset in (("middle", options.letters // 2), ("last", options.letters - 50)):
            times = []
            for _ in range(options.rounds):
                started = time.perf_counter()
                with engine.connect() as conn:
                    conn.execute(sa.select(table.c.entry).where(table.c.list_name == list_name).order_by(
                        table.c.seq.desc()).offset(offset).limit(50)).all()
                times.append(time.perf_counter() - started)
            print(f"  for comparison, the {label} page by OFFSET (the query alone): median "
                  f"{statistics.median(times) * 1000:.1f} ms, slowest {max(times) * 1000:.1f} ms")
    finally:
        with engine.begin() as conn:
            conn.execute(sa.delete(dead_letters_table).where(dead_letters_table.c.list_name == list_name))
        engine.dispose()


if __name__ == "__main__":
    main()
