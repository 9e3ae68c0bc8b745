"""Event-loop lag while a coroutine dispatches 1,000 tasks to the real Redis (``python -m bench.async_dispatch``).

A probe coroutine sleeps 1 ms in a loop and records by how much each sleep
overshot: a loop blocked by a broker write shows as lag. Compared, each
against the same Redis (``BENCH_REDIS_URL``, default db 15, a private queue
deleted afterwards):

- ``sync in loop``: ``task.defer()`` called from the coroutine (what an async
  app does without ``defer_async``);
- ``defer_async``: ``await task.defer_async()`` one after the other, and all
  at once with ``asyncio.gather``, through the library's publisher thread;
- ``to_thread``: the same, with each send in ``asyncio.to_thread`` instead
  (the alternative the publisher thread was measured against).
"""
from __future__ import annotations

import argparse
import asyncio
import contextvars
import statistics
import time
import typing as t
import uuid

import redis

from bench import settings
from bench.services import delete_queue_keys
from bench.ws_app import main
from websauna_tasks import async_dispatch, get_celery

TASK = "bench.ws.noop"


class Probe:
    """Sleeps ``interval`` seconds again and again; ``lags`` are the overshoots, in seconds."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.lags: list[float] = []
        self.running = True

    async def run(self) -> None:
        while self.running:
            start = time.perf_counter()
            await asyncio.sleep(self.interval)
            self.lags.append(max(0.0, time.perf_counter() - start - self.interval))

    def figures(self) -> dict[str, float]:
        lags = sorted(self.lags) or [0.0]
        return {"iterations": len(self.lags), "max_ms": lags[-1] * 1000,
                "p99_ms": lags[int(len(lags) * 0.99) - 1 if len(lags) > 1 else 0] * 1000,
                "median_ms": statistics.median(lags) * 1000}


async def measure(dispatch: t.Callable[[t.Any, int], t.Awaitable[None]], task: t.Any, count: int) -> dict[str, float]:
    probe = Probe()
    probing = asyncio.ensure_future(probe.run())
    await asyncio.sleep(0.01)  # the probe is in its loop before the batch starts
    probe.lags.clear()
    start = time.perf_counter()
    await dispatch(task, count)
    elapsed = time.perf_counter() - start
    probe.running = False
    await probing
    return {"seconds": elapsed, "per_second": count / elapsed, **probe.figures()}


async def sync_in_loop(task: t.Any, count: int) -> None:
    for index in range(count):
        task.defer(index)


async def async_sequential(task: t.Any, count: int) -> None:
    for index in range(count):
        await task.defer_async(index)


async def async_gathered(task: t.Any, count: int) -> None:
    await asyncio.gather(*(task.defer_async(index) for index in range(count)))


def to_thread_off_loop(loop: asyncio.AbstractEventLoop, fn: t.Callable[..., t.Any], *args: t.Any,
                       **kwargs: t.Any) -> asyncio.Future:
    context = contextvars.copy_context()
    return loop.run_in_executor(None, lambda: context.run(fn, *args, **kwargs))


SCENARIOS: list[tuple[str, t.Callable[[t.Any, int], t.Awaitable[None]], bool]] = [
    ("sync defer() in the loop", sync_in_loop, False),
    ("defer_async, awaited one by one (publisher thread)", async_sequential, False),
    ("defer_async, gathered (publisher thread)", async_gathered, False),
    ("defer_async, awaited one by one (to_thread)", async_sequential, True),
    ("defer_async, gathered (to_thread)", async_gathered, True),
]


def run(count: int, rounds: int) -> list[tuple[str, dict[str, float]]]:
    queue = f"bench-async-{uuid.uuid4().hex[:8]}"
    router = main({}, **{"websauna.celery_config": repr(settings.celery_config(queue))})
    task = get_celery(router.registry).tasks[TASK]
    client = redis.Redis.from_url(settings.broker_url())
    library_off_loop = async_dispatch.off_loop
    results: dict[str, list[dict[str, float]]] = {}
    try:
        task.defer(-1)  # connections and the queue's binding made before any timing
        for _ in range(rounds):
            for name, dispatch, use_to_thread in SCENARIOS:
                async_dispatch.off_loop = to_thread_off_loop if use_to_thread else library_off_loop
                try:
                    figures = asyncio.run(measure(dispatch, task, count))
                finally:
                    async_dispatch.off_loop = library_off_loop
                sent = client.llen(queue)
                assert sent >= count, f"{name}: {sent} messages in the queue, expected {count}"
                client.delete(queue)
                results.setdefault(name, []).append(figures)
    finally:
        delete_queue_keys(client, queue)
    # The median round of each scenario, by its max lag.
    return [(name, sorted(runs, key=lambda f: f["max_ms"])[len(runs) // 2]) for name, runs in results.items()]


def main_cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    arguments = parser.parse_args()
    print(f"{arguments.count} tasks per batch, {arguments.rounds} rounds (median round), Redis {settings.broker_url()}")
    print(f"{'':52} {'seconds':>8} {'tasks/s':>8} {'probe n':>8} {'max lag':>9} {'p99 lag':>9} {'median':>8}")
    for name, f in run(arguments.count, arguments.rounds):
        print(f"{name:52} {f['seconds']:8.3f} {f['per_second']:8.0f} {f['iterations']:8.0f} "
              f"{f['max_ms']:7.1f}ms {f['p99_ms']:7.2f}ms {f['median_ms']:6.2f}ms")


if __name__ == "__main__":
    main_cli()
