"""The three measurements; each returns raw and websauna_tasks figures taken in the same run."""
from __future__ import annotations

import statistics
import time
import typing as t
import uuid
from dataclasses import dataclass

import redis
import sqlalchemy
import transaction
from sqlalchemy import text

from bench import services


@dataclass
class Result:
    name: str
    raw: float
    ours: float
    unit: str
    #: ours compared with raw, oriented so that the goal reads naturally (see ``goal``).
    ratio: float
    goal: str
    #: None for rows given as context, without a goal.
    met: bool | None
    note: str = ""


def dispatch_many(raw_task: t.Any, ws_task: t.Any, client: redis.Redis, raw_queue: str, ws_queue: str,
                  count: int, rounds: int) -> Result:
    """(a) ``count`` tasks queued in one transaction then committed vs a loop of raw apply_async."""

    def raw_round() -> float:
        started = time.perf_counter()
        for index in range(count):
            raw_task.apply_async((index,))
        return time.perf_counter() - started

    def ws_round() -> float:
        tm = transaction.TransactionManager(explicit=True)
        started = time.perf_counter()
        with tm:
            for index in range(count):
                ws_task.apply_async((index,), tm=tm)
        return time.perf_counter() - started

    raw_times, ws_times = [], []
    for round_number in range(rounds + 1):
        raw_time, ws_time = raw_round(), ws_round()
        # Every message must have arrived, or the figure means nothing.
        for queue in (raw_queue, ws_queue):
            queued = client.llen(queue)
            if queued != count:
                raise AssertionError(f"{queue}: {queued} messages queued, expected {count}")
            client.delete(queue)
        if round_number:  # the first round warms up connections and caches
            raw_times.append(raw_time)
            ws_times.append(ws_time)
    raw_ms, ws_ms = statistics.median(raw_times) * 1000, statistics.median(ws_times) * 1000
    ratio = raw_ms / ws_ms
    return Result(f"(a) {count:,} tasks: one commit vs raw loop", raw_ms, ws_ms, "ms", ratio,
                  ">= 3x faster", ratio >= 3.0, f"median of {rounds} rounds")


def dispatch_one(raw_task: t.Any, ws_task: t.Any, client: redis.Redis, raw_queue: str, ws_queue: str,
                 repetitions: int) -> Result:
    """(b) one task on commit (begin, apply_async(tm=tm), commit) vs one raw apply_async."""
    tm = transaction.TransactionManager(explicit=True)
    raw_times, ws_times = [], []
    clock = time.perf_counter
    for repetition in range(repetitions + 200):
        # Interleaved, so both sides see the same machine load.
        started = clock()
        raw_task.apply_async((repetition,))
        raw_time = clock() - started
        started = clock()
        tm.begin()
        ws_task.apply_async((repetition,), tm=tm)
        tm.commit()
        ws_time = clock() - started
        if repetition >= 200:  # warm-up
            raw_times.append(raw_time)
            ws_times.append(ws_time)
        if repetition % 500 == 499:
            client.delete(raw_queue, ws_queue)
    client.delete(raw_queue, ws_queue)
    raw_us, ws_us = statistics.median(raw_times) * 1e6, statistics.median(ws_times) * 1e6
    ratio = ws_us / raw_us
    return Result("(b) one task on commit vs raw, per op", raw_us, ws_us, "us", ratio,
                  "<= 1.1x the time", ratio <= 1.1, f"median of {repetitions:,} interleaved")


@dataclass
class WorkerRun:
    seconds: float
    tasks: int

    @property
    def rate(self) -> float:
        return self.tasks / self.seconds


def reset_rows(engine: sqlalchemy.Engine, count: int) -> None:
    """``count`` rows with value 0, one per task, so that tasks never wait on each other's locks."""
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS bench_rows"))
        conn.execute(text("CREATE TABLE bench_rows (id int PRIMARY KEY, value int NOT NULL)"))
        conn.execute(text("INSERT INTO bench_rows (id, value) SELECT g, 0 FROM generate_series(1, :n) g"),
                     {"n": count})


def check_rows(engine: sqlalchemy.Engine, count: int) -> None:
    with engine.connect() as conn:
        done = conn.execute(text("SELECT count(*) FROM bench_rows WHERE value = 1")).scalar_one()
    if done != count:
        raise AssertionError(f"{done} of {count} rows were read and written exactly once")


def worker_run(client: redis.Redis, queue: str, count: int, prefill: t.Callable[[str, str], None],
               start_worker: t.Callable[[], services.Worker], timeout: float) -> WorkerRun:
    """Pre-fill the queue (a mark, ``count`` tasks, a mark), then start the worker and time mark to mark.

    The marks are tasks that store ``time.time()`` in Redis when they run:
    the window excludes the worker's start-up and covers exactly the
    ``count`` tasks between them (the queue is FIFO).
    """
    start_key = f"{queue}-start-{uuid.uuid4().hex[:6]}"
    end_key = f"{queue}-end-{uuid.uuid4().hex[:6]}"
    try:
        prefill(start_key, end_key)
        worker = start_worker()
        try:
            end = services.wait_for_key(client, end_key, worker, timeout)
            start = float(client.get(start_key))
        finally:
            worker.stop()
    finally:
        client.delete(start_key, end_key)
        services.delete_queue_keys(client, queue)
    return WorkerRun(end - start, count)


def raw_prefill(raw_app: t.Any, task_name: str, count: int, first: int = 0) -> t.Callable[[str, str], None]:
    def prefill(start_key: str, end_key: str) -> None:
        mark, work = raw_app.tasks["bench.raw.mark"], raw_app.tasks[task_name]
        with raw_app.producer_or_acquire() as producer:
            mark.apply_async((start_key,), producer=producer)
            for index in range(first, first + count):
                work.apply_async((index,), producer=producer)
            mark.apply_async((end_key,), producer=producer)
    return prefill


def ws_prefill(ws_tasks: t.Any, task: t.Any, count: int, first: int = 0) -> t.Callable[[str, str], None]:
    def prefill(start_key: str, end_key: str) -> None:
        tm = transaction.TransactionManager(explicit=True)
        with tm:  # all of it in one commit: the dispatch path of (a)
            ws_tasks.mark.apply_async((start_key,), tm=tm)
            for index in range(first, first + count):
                task.apply_async((index,), tm=tm)
            ws_tasks.mark.apply_async((end_key,), tm=tm)
    return prefill


def throughput(name: str, raw_runs: list[WorkerRun], ws_runs: list[WorkerRun], goal: float | None,
               note: str) -> Result:
    """Medians of both sides; the ratio's range over the interleaved runs goes into the note.

    ``goal``: the least ours/raw ratio that meets it, or None for a row given as context.
    """
    raw_rate = statistics.median(run.rate for run in raw_runs)
    ws_rate = statistics.median(run.rate for run in ws_runs)
    ratio = ws_rate / raw_rate
    # Each pair ran back to back in one round, so its ratio is the steadier figure on a shared machine.
    pairs = [ws.rate / raw.rate for raw, ws in zip(raw_runs, ws_runs)]
    spread = f"per-round ratios {min(pairs):.2f}x-{max(pairs):.2f}x"
    return Result(name, raw_rate, ws_rate, "/s", ratio,
                  f">= {goal:.2f}x (ours/raw)" if goal is not None else "context",
                  ratio >= goal if goal is not None else None, f"{note}; {spread}" if note else spread)
