"""A stored payload against an inline one, and the cost to small messages (``python -m bench.claim_check``).

Against the real Redis (``BENCH_REDIS_URL``, default db 15, private queues
deleted afterwards) and a private PostgreSQL database (``BENCH_DATABASE_URL``,
created and dropped by the run), with two apps built from the same settings
but for ``websauna_tasks.payload_store_threshold_bytes`` (off, and 64 KiB):

- **large payload, per message**: one transaction per message (a request
  sending one task), ``apply_async(tm=...)`` then the commit that writes the
  row (stored) and publishes the message; then the worker's intake taking
  the same messages from Redis (``Intake.problem``: the checks, and for a
  stored payload the SELECT that loads it). Inline payloads that large need
  ``max_payload_bytes`` raised, which the inline app has.
- **small message, dispatch cost**: ``apply_async(tm=...)`` of small
  messages inside one transaction, the send pipeline's own work before the
  commit, with the feature off and on; the two alternate round by round
  (each going first in every other round) and the median of the rounds'
  ratios is printed. Both run the same code: a small payload meets one
  comparison and a flag more than before the feature existed.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time
import typing as t
import uuid

import redis
import transaction

from bench import settings
from bench.services import delete_queue_keys, private_database
from bench.ws_app import main
from websauna_tasks import get_celery
from websauna_tasks.request import task_request
from websauna_tasks.state import app_state

TASK = "bench.ws.mark"
THRESHOLD = 64 * 1024


def build(queue: str, database_url: str, store: bool) -> t.Any:
    extra = {"websauna_tasks.payload_store_threshold_bytes": str(THRESHOLD)} if store else {
        # Inline payloads this large are refused by default: the inline side lifts the limit instead.
        "websauna_tasks.max_payload_bytes": str(64 * 1024 * 1024),
        "websauna_tasks.max_message_bytes": str(128 * 1024 * 1024)}
    return main({}, **{"websauna.celery_config": repr(settings.celery_config(queue)), "sqlalchemy.url": database_url,
                       "websauna_tasks.name_store": "memory", **extra})


def send_one_per_transaction(router: t.Any, task: t.Any, payload: str, count: int) -> list[float]:
    """Seconds per message: a transaction that sends it and commits (the row, then the publish)."""
    times = []
    for _ in range(count):
        start = time.perf_counter()
        with task_request(router.registry) as request:
            with request.tm:
                task.apply_async(args=(payload,), tm=request.tm)
        times.append(time.perf_counter() - start)
    return times


def intake_times(router: t.Any, queue: str, count: int) -> list[float]:
    """Seconds per message for the worker's intake to take a message from the queue in (load included)."""
    app = get_celery(router.registry)
    intake = app_state(app).intake
    times = []
    with app.connection_for_read() as connection:
        simple = connection.SimpleQueue(queue)
        try:
            for _ in range(count):
                message = simple.get(timeout=10)
                start = time.perf_counter()
                problem = intake.problem(message)
                times.append(time.perf_counter() - start)
                assert problem is None, problem
                assert len(message.decode()[0][0]) > THRESHOLD
                message.ack()
        finally:
            simple.close()
    return times


def small_dispatch(router: t.Any, task: t.Any, count: int) -> float:
    """Seconds per small message spent in apply_async(tm=...) (no broker: the commit is not timed)."""
    tm = transaction.TransactionManager(explicit=True)
    tm.begin()
    try:
        start = time.perf_counter()
        for index in range(count):
            task.apply_async(args=(f"k{index}",), tm=tm)
        elapsed = time.perf_counter() - start
    finally:
        tm.abort()  # nothing sent: the broker stays out of the figure
    return elapsed / count


def run(sizes: list[int], count: int, small_count: int, rounds: int) -> None:
    client = redis.Redis.from_url(settings.broker_url())
    with private_database(settings.DATABASE_URL) as database_url:
        queues = {store: f"bench-claim-{'stored' if store else 'inline'}-{uuid.uuid4().hex[:8]}"
                  for store in (False, True)}
        routers = {store: build(queues[store], database_url, store) for store in (False, True)}
        try:
            print(f"large payloads: {count} messages per size and mode, one transaction each; medians")
            print(f"{'payload':>10} {'mode':>7} {'send+commit':>12} {'intake':>10} {'total':>10} {'x inline':>9}")
            for size in sizes:
                payload = "p" * size
                figures = {}
                for store in (False, True):
                    router = routers[store]
                    task = get_celery(router.registry).tasks[TASK]
                    send_one_per_transaction(router, task, payload, 2)  # connections and the table made first
                    client.delete(queues[store])
                    sent = statistics.median(send_one_per_transaction(router, task, payload, count))
                    taken = statistics.median(intake_times(router, queues[store], count))
                    figures[store] = (sent, taken)
                for store in (False, True):
                    sent, taken = figures[store]
                    ratio = (sent + taken) / sum(figures[False])
                    print(f"{size:>10} {'stored' if store else 'inline':>7} {sent * 1000:10.2f}ms "
                          f"{taken * 1000:8.2f}ms {(sent + taken) * 1000:8.2f}ms {ratio:8.2f}x")

            print(f"\nsmall messages: apply_async(tm=...) of {small_count} in one transaction, {rounds} rounds "
                  "alternating, medians")
            per: dict[bool, list[float]] = {False: [], True: []}
            ratios = []
            tasks = {store: get_celery(routers[store].registry).tasks[TASK] for store in (False, True)}
            for store in (False, True):
                small_dispatch(routers[store], tasks[store], 200)  # warm
            for index in range(rounds):
                # Each side goes first in every other round: the second of a pair would pay for the
                # first one's garbage.
                for store in ((False, True) if index % 2 else (True, False)):
                    gc.collect()
                    per[store].append(small_dispatch(routers[store], tasks[store], small_count))
                ratios.append(per[True][-1] / per[False][-1])
            off, on = statistics.median(per[False]), statistics.median(per[True])
            print(f"  feature off: {off * 1e6:7.2f} us/message (best {min(per[False]) * 1e6:.2f})")
            print(f"  feature on:  {on * 1e6:7.2f} us/message (best {min(per[True]) * 1e6:.2f})")
            print(f"  on / off:    {statistics.median(ratios):7.3f} (median of the rounds' ratios; "
                  f"best/best {min(per[True]) / min(per[False]):.3f})")
        finally:
            for queue in queues.values():
                delete_queue_keys(client, queue)
            for router in routers.values():
                from websauna_tasks.db import get_engine

                get_engine(router.registry).dispose()


def main_cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000,5000000", help="payload sizes in bytes, comma-separated")
    parser.add_argument("--count", type=int, default=20, help="large messages per size and mode")
    parser.add_argument("--small-count", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=41)
    arguments = parser.parse_args()
    print(f"Redis {settings.broker_url()}, PostgreSQL {settings.DATABASE_URL} (a private database)")
    run([int(size) for size in arguments.sizes.split(",")], arguments.count, arguments.small_count, arguments.rounds)


if __name__ == "__main__":
    main_cli()
