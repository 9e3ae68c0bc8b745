"""websauna_tasks, raw Celery, Huey and Dramatiq on one Redis, in one sitting, interleaved.

    .venv/bin/python -m pip install -e ".[bench]"     # Huey and Dramatiq (the bench extra)
    .venv/bin/python bench/peers.py                   # both parts, about four minutes
    .venv/bin/python bench/peers.py --skip-process    # the enqueue rates only, seconds

Enqueue rate (tasks/s, one producer, no worker running): our batched on-commit
dispatch (``--enqueue-tasks`` in one commit), our single on-commit dispatch
(one begin/apply_async/commit per task), raw Celery ``apply_async``, Huey's
enqueue (calling the task) and Dramatiq's ``send``. Every round runs all five,
in an order that rotates with the round, and checks that each message arrived.

Processing rate (tasks/s) of ``--process-tasks`` no-op tasks pre-filled
between two timing marks (bench/measure.py's worker_run): raw Celery prefork
``-c 2``, our worker with the same options (the default pool and settings),
our fast profile (docs/fast_profile.md: ``--fast-workers`` processes of
``-P solo``) and Huey's consumer with 2 processes. Every round runs all four.

Each ratio is taken within one round (the machine is shared: absolute figures
move, ratios much less) and given as the median over rounds with its range.
Private names everywhere: Celery queues ``bench-<id>-*`` in BENCH_REDIS_URL's
database (default 15), Huey's queue ``wsbench-<id>`` in database 14,
Dramatiq's namespace ``wsbench-<id>`` in database 13; all deleted at the end.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import signal
import statistics
import sys
import tempfile
import time
import typing as t
import uuid
from dataclasses import dataclass, field

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make ``bench`` and the project importable
    sys.path.insert(0, str(ROOT))

from bench import services, settings  # noqa: E402

WORKER_FLAGS = ["-l", "warning", "--without-mingle", "--without-gossip", "--without-heartbeat"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--enqueue-tasks", type=int, default=1000, help="tasks per enqueue round")
    parser.add_argument("--enqueue-rounds", type=int, default=7, help="enqueue rounds (after one warm-up)")
    parser.add_argument("--process-tasks", type=int, default=10000, help="no-op tasks per worker run")
    parser.add_argument("--process-rounds", type=int, default=3, help="worker rounds (each runs every system)")
    parser.add_argument("--fast-workers", type=int, default=2, help="-P solo processes in the fast profile")
    parser.add_argument("--fast-prefetch", type=int, default=16,
                        help="--prefetch-multiplier of each fast-profile worker")
    parser.add_argument("--skip-enqueue", action="store_true")
    parser.add_argument("--skip-process", action="store_true")
    return parser.parse_args(argv)


@dataclass
class Series:
    """One system's figures, one per round, in tasks per second."""

    name: str
    rates: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.rates)


def ratio_text(ours: Series, ref: Series) -> tuple[float, str]:
    """The median of the per-round ratios, and their range: both sides of a ratio ran in the same round."""
    ratios = [a / b for a, b in zip(ours.rates, ref.rates)]
    return statistics.median(ratios), f"{min(ratios):.2f}-{max(ratios):.2f}"


def delete_prefixed(client, pattern: str) -> int:
    """Delete keys matching ``pattern`` (always a run's private prefix) with SCAN, never KEYS or FLUSHDB."""
    names = list(client.scan_iter(match=pattern, count=1000))
    for start in range(0, len(names), 500):
        client.delete(*names[start:start + 500])
    return len(names)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM as SystemExit: the finally blocks still stop the workers and delete the private keys.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    run_id = uuid.uuid4().hex[:8]
    raw_queue, ws_queue = f"bench-{run_id}-raw", f"bench-{run_id}-ws"
    peer = f"wsbench-{run_id}"
    try:
        import dramatiq
        import huey as huey_package
    except ImportError as error:
        print(f"{error}: install the bench extra: .venv/bin/python -m pip install -e '.[bench]'", file=sys.stderr)
        return 2
    huey_url = settings.redis_url_with_db(settings.REDIS_URL, 14)
    dramatiq_url = settings.redis_url_with_db(settings.REDIS_URL, 13)
    # Set before bench.peer_apps is imported: its Huey app takes the run's name at import.
    env = {settings.BROKER_ENV: settings.REDIS_URL, settings.QUEUE_ENV: raw_queue,
           settings.PEER_NAME_ENV: peer, settings.HUEY_URL_ENV: huey_url, settings.DRAMATIQ_URL_ENV: dramatiq_url,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    os.environ.update(env)
    import redis

    from bench import peer_apps, raw_app, ws_tasks
    from bench.run import machine
    from bench.ws_app import main as ws_main

    client = redis.Redis.from_url(settings.REDIS_URL)
    huey_client = redis.Redis.from_url(huey_url)
    dramatiq_client = redis.Redis.from_url(dramatiq_url)
    client.ping()
    print(f"machine: {machine()}, huey {huey_package.__version__}, dramatiq {dramatiq.__version__}")
    print(f"celery queues {raw_queue} / {ws_queue} in {settings.REDIS_URL}; huey {peer} in {huey_url}; "
          f"dramatiq namespace {peer} in {dramatiq_url}\n", flush=True)
    ws_settings = {"websauna.celery_config": repr(settings.celery_config(ws_queue))}
    ws_main({}, **ws_settings)
    broker, actor = peer_apps.make_dramatiq_actor()
    tables: list[str] = []
    try:
        if not args.skip_enqueue:
            tables.append(enqueue_rates(args, client, huey_client, dramatiq_client, raw_queue, ws_queue, peer,
                                        raw_app, ws_tasks, peer_apps, actor))
        if not args.skip_process:
            tables.append(process_rates(args, client, raw_queue, ws_queue, env, ws_settings, raw_app,
                                        ws_tasks, peer_apps))
    finally:
        for queue in (raw_queue, ws_queue):
            services.delete_queue_keys(client, queue)
        delete_prefixed(huey_client, f"huey.*{peer}*")
        delete_prefixed(dramatiq_client, f"{peer}*")
        broker.close()
        for c in (client, huey_client, dramatiq_client):
            c.close()
    print("\n" + "\n\n".join(tables))
    return 0


def enqueue_rates(args, client, huey_client, dramatiq_client, raw_queue, ws_queue, peer, raw_app, ws_tasks,
                  peer_apps, actor) -> str:
    import transaction

    count = args.enqueue_tasks
    huey_app = peer_apps.huey
    dramatiq_hash = f"{peer}:bench.msgs"

    def ours_batched() -> float:
        tm = transaction.TransactionManager(explicit=True)
        started = time.perf_counter()
        with tm:
            for index in range(count):
                ws_tasks.noop.apply_async((index,), tm=tm)
        return time.perf_counter() - started

    def ours_single() -> float:
        tm = transaction.TransactionManager(explicit=True)
        started = time.perf_counter()
        for index in range(count):
            tm.begin()
            ws_tasks.noop.apply_async((index,), tm=tm)
            tm.commit()
        return time.perf_counter() - started

    def raw() -> float:
        started = time.perf_counter()
        for index in range(count):
            raw_app.noop.apply_async((index,))
        return time.perf_counter() - started

    def huey() -> float:
        started = time.perf_counter()
        for index in range(count):
            peer_apps.huey_noop(index)
        return time.perf_counter() - started

    def dramatiq() -> float:
        started = time.perf_counter()
        for index in range(count):
            actor.send(index)
        return time.perf_counter() - started

    # Each system with the way to count what it wrote, and to empty it again.
    systems: list[tuple[str, t.Callable[[], float], t.Callable[[], int], t.Callable[[], object]]] = [
        ("ours, batched on commit", ours_batched, lambda: client.llen(ws_queue), lambda: client.delete(ws_queue)),
        ("ours, one task per commit", ours_single, lambda: client.llen(ws_queue), lambda: client.delete(ws_queue)),
        ("raw Celery apply_async", raw, lambda: client.llen(raw_queue), lambda: client.delete(raw_queue)),
        ("Huey enqueue", huey, huey_app.pending_count, huey_app.flush),
        ("Dramatiq send", dramatiq, lambda: dramatiq_client.hlen(dramatiq_hash),
         lambda: delete_prefixed(dramatiq_client, f"{peer}*")),
    ]
    series = {name: Series(name) for name, *_ in systems}
    for round_number in range(args.enqueue_rounds + 1):
        shift = round_number % len(systems)
        for name, run, queued, empty in systems[shift:] + systems[:shift]:
            seconds = run()
            arrived = queued()
            if arrived != count:
                raise AssertionError(f"{name}: {arrived} messages queued, expected {count}")
            empty()
            if round_number:  # the first round warms up connections, imports and caches
                series[name].rates.append(count / seconds)
        if round_number:
            print(f"enqueue round {round_number}: " + ", ".join(
                f"{name} {s.rates[-1]:,.0f}/s" for name, s in series.items()), flush=True)
    huey_series, raw_series = series["Huey enqueue"], series["raw Celery apply_async"]
    lines = [f"Enqueue rate, {count:,} tasks a round, median of {args.enqueue_rounds} interleaved rounds",
             f"{'system':<28} {'tasks/s':>9} {'range':>15} {'vs Huey':>8} {'range':>10} {'vs raw':>7}  goal"]
    goals = {"ours, batched on commit": ("huey", 1.0)}
    for name, s in series.items():
        vs_huey, huey_range = ratio_text(s, huey_series)
        vs_raw, _ = ratio_text(s, raw_series)
        goal = goals.get(name)
        goal_text = f">= {goal[1]:.1f}x Huey: {'met' if vs_huey >= goal[1] else 'NOT met'}" if goal else ""
        lines.append(f"{name:<28} {s.median:>9,.0f} {min(s.rates):>7,.0f}-{max(s.rates):<7,.0f} "
                     f"{vs_huey:>7.2f}x {huey_range:>10} {vs_raw:>6.2f}x  {goal_text}")
    return "\n".join(lines)


def process_rates(args, client, raw_queue, ws_queue, env, ws_settings, raw_app, ws_tasks, peer_apps) -> str:
    from bench.measure import raw_prefill, worker_run, ws_prefill

    count = args.process_tasks
    timeout = 120.0 + count / 50

    def huey_prefill(start_key: str, end_key: str) -> None:
        peer_apps.huey_mark(start_key)
        for index in range(count):
            peer_apps.huey_noop(index)
        peer_apps.huey_mark(end_key)

    with tempfile.TemporaryDirectory(prefix="wsbench-peers-") as tmp:
        tmp_path = pathlib.Path(tmp)
        ini = tmp_path / "bench.ini"
        ini.write_text("[app:main]\nuse = call:bench.ws_app:main\n"
                       + "".join(f"{key} = {value}\n" for key, value in ws_settings.items()))

        def fast_workers(log: str) -> services.WorkerGroup:
            return services.WorkerGroup([
                services.Worker([sys.executable, "-m", "websauna_tasks.cli", str(ini), "--", "worker",
                                 "-P", "solo", "--prefetch-multiplier", str(args.fast_prefetch),
                                 "-n", f"fast{number}@%h", *WORKER_FLAGS],
                                tmp_path / f"{log}-{number}.log", env)
                for number in range(args.fast_workers)])

        def huey_consumer(log: str) -> services.Worker:
            return services.Worker([sys.executable, "-m", "huey.bin.huey_consumer", "bench.peer_apps.huey",
                                    "-w", "2", "-k", "process", "-q", "-n", "-C"], tmp_path / log, env)

        kinds: list[tuple[str, t.Callable[[int], object]]] = [
            ("raw Celery prefork -c 2", lambda n: worker_run(
                client, raw_queue, count, raw_prefill(raw_app.app, "bench.raw.noop", count),
                lambda: services.raw_worker(tmp_path / f"raw-{n}.log", env), timeout)),
            ("ours, default (prefork -c 2)", lambda n: worker_run(
                client, ws_queue, count, ws_prefill(ws_tasks, ws_tasks.noop, count),
                lambda: services.ws_worker(ini, tmp_path / f"ws-{n}.log", env), timeout)),
            (f"ours, fast ({args.fast_workers} x solo)", lambda n: worker_run(
                client, ws_queue, count, ws_prefill(ws_tasks, ws_tasks.noop, count),
                lambda: fast_workers(f"fast-{n}"), timeout)),
            ("Huey, 2 processes", lambda n: worker_run(
                client, "unused-huey-queue", count, huey_prefill,
                lambda: huey_consumer(f"huey-{n}.log"), timeout)),
        ]
        series = {name: Series(name) for name, _ in kinds}
        for number in range(args.process_rounds):
            shift = number % len(kinds)
            for name, run in kinds[shift:] + kinds[:shift]:
                series[name].rates.append(run(number).rate)
                peer_apps.huey.flush()  # nothing should be left; never carry one round's leftovers
            print(f"worker round {number + 1}: " + ", ".join(
                f"{name} {s.rates[-1]:,.0f}/s" for name, s in series.items()), flush=True)
    raw_series = series["raw Celery prefork -c 2"]
    huey_series = series["Huey, 2 processes"]
    goals = {"ours, default (prefork -c 2)": 1.0, f"ours, fast ({args.fast_workers} x solo)": 1.5}
    lines = [f"Processing rate, {count:,} no-op tasks a run, median of {args.process_rounds} interleaved rounds",
             f"{'system':<28} {'tasks/s':>9} {'range':>15} {'vs raw':>7} {'range':>10} {'vs Huey':>8}  goal"]
    for name, s in series.items():
        vs_raw, raw_range = ratio_text(s, raw_series)
        vs_huey, _ = ratio_text(s, huey_series)
        goal = goals.get(name)
        goal_text = f">= {goal:.1f}x raw: {'met' if vs_raw >= goal else 'NOT met'}" if goal else ""
        lines.append(f"{name:<28} {s.median:>9,.0f} {min(s.rates):>7,.0f}-{max(s.rates):<7,.0f} "
                     f"{vs_raw:>6.2f}x {raw_range:>10} {vs_huey:>7.2f}x  {goal_text}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
