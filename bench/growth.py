"""How cost grows with the work: dispatch per commit, outbox relays, latency under load, worker memory.

    .venv/bin/python bench/growth.py                        # all four parts, about ten minutes
    .venv/bin/python bench/growth.py --parts dispatch,rss   # some of them
    .venv/bin/python bench/growth.py --backlog 20000 --rss-runs 1000,10000,50000   # smaller

dispatch  time of one commit that sends 1, 10, 100, 1,000 and 10,000 tasks (in process,
          the plain path), its least-squares line: the per-commit and the per-task constant;
          wall clock and the thread's CPU time (which a loaded machine inflates far less).
relays    an outbox backlog of --backlog rows, published by 1, 2 and 4 ``outbox-relay``
          processes: rows per second from the first message on Redis to the last.
latency   commits of one task each at --rate a second for --seconds, to our worker
          (prefork -c 2): commit-to-start p50 and p99, plain path and outbox path.
rss       resident memory of the process that runs the tasks (the ``-P solo`` worker, or with
          --rss-pool prefork the one child of ``-c 1``) after --rss-runs no-op runs: ours against
          bare raw Celery, against raw Celery that also imports --rss-raw-preload (SQLAlchemy's
          ORM and its PostgreSQL dialect on psycopg: the database layer every Websauna app's worker
          holds), and against raw Celery that imports --rss-stack-preload as well (Pyramid,
          pyramid_tm, zope.sqlalchemy: what a Pyramid request in the worker needs, whoever builds
          it); the three ratios. Our worker is configured with the same PostgreSQL URL (its engine
          never connects). The task itself reads /proc/self/status.

Services and private names as bench/run.py: BENCH_REDIS_URL (queues ``bench-<id>-*``) and
BENCH_DATABASE_URL (a database of its own, dropped at the end).
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

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make ``bench`` and the project importable
    sys.path.insert(0, str(ROOT))

from bench import services, settings  # noqa: E402

PARTS = ("dispatch", "relays", "latency", "rss")
WORKER_FLAGS = ["-l", "warning", "--without-mingle", "--without-gossip", "--without-heartbeat"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--sizes", default="1,10,100,1000,10000", help="tasks per commit (dispatch)")
    parser.add_argument("--backlog", type=int, default=50000, help="outbox rows (relays)")
    parser.add_argument("--relays", default="1,2,4", help="relay process counts (relays)")
    parser.add_argument("--seed", type=int, default=5000,
                        help="outbox rows written through apply_async; the rest of --backlog are SQL copies")
    parser.add_argument("--rate", type=float, default=500.0, help="commits per second (latency)")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long the load lasts (latency)")
    parser.add_argument("--rss-runs", default="1000,10000,100000", help="runs after which RSS is read (rss)")
    parser.add_argument("--rss-sides", default="raw,raw+sql,raw+stack,ours",
                        help="which workers the rss part runs: raw (bare), raw+sql (imports --rss-raw-preload), "
                             "raw+stack (imports --rss-raw-preload and --rss-stack-preload), ours")
    parser.add_argument("--rss-raw-preload", default="sqlalchemy.orm,sqlalchemy.dialects.postgresql.psycopg,psycopg",
                        help="modules the raw+sql worker imports at start (rss)")
    parser.add_argument("--rss-stack-preload", default="pyramid.config,pyramid.router,pyramid_tm,zope.sqlalchemy",
                        help="modules the raw+stack worker imports at start besides --rss-raw-preload (rss)")
    parser.add_argument("--rss-pool", default="solo", choices=("solo", "prefork"),
                        help="pool of every rss worker; prefork runs -c 1 and measures its child (rss)")
    args = parser.parse_args(argv)
    args.parts = [part for part in args.parts.split(",") if part]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    args.sizes = [int(size) for size in args.sizes.split(",")]
    args.relays = [int(count) for count in args.relays.split(",")]
    args.rss_runs = sorted(int(count) for count in args.rss_runs.split(","))
    return args


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def write_ini(path: pathlib.Path, values: dict[str, str]) -> pathlib.Path:
    path.write_text("[app:main]\nuse = call:bench.ws_app:main\n"
                    + "".join(f"{key} = {value}\n" for key, value in values.items()))
    return path


def fit_per_task(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(fixed, per_task) of time = fixed + k * per_task, least squares on time / k against 1 / k."""
    xs = [1 / k for k, _ in points]
    ys = [seconds / k for k, seconds in points]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    fixed = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    return fixed, mean_y - fixed * mean_x


# -- dispatch: one commit of k tasks ------------------------------------------------------------------------

def dispatch_growth(args, client, queue: str, ws_tasks) -> str:
    import transaction

    # CPU time (this thread's) beside the wall clock: on a shared machine the wall clock mostly
    # measures the wait for a core, the CPU time what the dispatch itself costs.
    lines = ["dispatch: one commit of k tasks (plain path, in process), median of the repetitions",
             f"{'k':>7} {'reps':>5} {'ms per commit':>14} {'us per task':>12} {'CPU us per task':>16}"]
    points = []
    cpu_points = []
    for size in args.sizes:
        repetitions = max(3, min(50, 20000 // size))
        times = []
        cpu_times = []
        for repetition in range(repetitions + 1):
            tm = transaction.TransactionManager(explicit=True)
            started, cpu_started = time.perf_counter(), time.thread_time()
            with tm:
                for index in range(size):
                    ws_tasks.noop.apply_async((index,), tm=tm)
            elapsed, cpu = time.perf_counter() - started, time.thread_time() - cpu_started
            queued = client.llen(queue)
            if queued != size:
                raise AssertionError(f"{queued} messages queued, expected {size}")
            client.delete(queue)
            if repetition:  # the first one warms up
                times.append(elapsed)
                cpu_times.append(cpu)
        median, cpu_median = statistics.median(times), statistics.median(cpu_times)
        points.append((size, median))
        cpu_points.append((size, cpu_median))
        lines.append(f"{size:>7,} {repetitions:>5} {median * 1e3:>14.2f} {median / size * 1e6:>12.1f} "
                     f"{cpu_median / size * 1e6:>16.1f}")
    # time = fixed + k * per_task, fitted as time / k = per_task + fixed / k: every size weighs the
    # same in the per-task figure, so the 10,000-task commit does not decide the line alone.
    fixed, per_task = fit_per_task(points)
    spread = [y / x for x, y in points if x >= 10]
    lines.append(f"fit: {fixed * 1e6:,.0f} us per commit + {per_task * 1e6:,.1f} us per task; "
                 f"per task from k = 10 on: {min(spread) * 1e6:,.0f} to {max(spread) * 1e6:,.0f} us")
    cpu_fixed, cpu_per_task = fit_per_task(cpu_points)
    lines.append(f"CPU fit: {cpu_fixed * 1e6:,.0f} us per commit + {cpu_per_task * 1e6:,.1f} us per task")
    return "\n".join(lines)


# -- relays: an outbox backlog --------------------------------------------------------------------------------

def relay_growth(args, client, queue: str, tmp: pathlib.Path, env: dict[str, str], database_url: str,
                 ws_main, ws_tasks) -> str:
    import sqlalchemy
    from sqlalchemy import text

    from websauna_tasks.request import task_request

    values = {"websauna.celery_config": repr(settings.celery_config(queue)), "sqlalchemy.url": database_url,
              "websauna_tasks.outbox": "true", "websauna_tasks.outbox_publish_on_commit": "false",
              "websauna_tasks.outbox_relay_in_worker": "false"}
    ini = write_ini(tmp / "relay.ini", values)
    router = ws_main({}, **values)
    engine = sqlalchemy.create_engine(database_url)
    count = args.backlog
    # Written through apply_async (the real rows), at most --seed rows; the rest of the backlog
    # is copies of them made by SQL under new ids, since writing 50,000 rows through the ORM
    # on this machine would take longer than everything else here together.
    seed = min(count, args.seed)
    started = time.perf_counter()
    with task_request(router.registry) as request:
        for first in range(0, seed, 1000):
            with request.tm:
                for index in range(first, min(seed, first + 1000)):
                    ws_tasks.noop.apply_async((index,), tm=request.tm)
    fill = time.perf_counter() - started
    from websauna_tasks.schema import outbox_table

    columns = [column.name for column in outbox_table.columns]
    copied = ", ".join("id || '-' || g" if name == "id" else f'"{name}"' for name in columns)
    names = ", ".join(f'"{name}"' for name in columns)
    with engine.begin() as conn:
        copies = -(-count // seed) - 1
        if copies:
            conn.execute(text(f"INSERT INTO websauna_tasks_outbox ({names}) SELECT {copied} "
                              f"FROM websauna_tasks_outbox, generate_series(1, :copies) g"), {"copies": copies})
            conn.execute(text("DELETE FROM websauna_tasks_outbox WHERE id IN (SELECT id FROM websauna_tasks_outbox "
                              "ORDER BY created_at DESC, id LIMIT :extra)"), {"extra": (copies + 1) * seed - count})
        rows = conn.execute(text("SELECT count(*) FROM websauna_tasks_outbox WHERE sent_at IS NULL")).scalar_one()
        if rows != count:
            raise AssertionError(f"{rows} outbox rows, expected {count}")
        # The same backlog again for every relay count: copied back, not written again.
        conn.execute(text("CREATE TABLE bench_outbox_copy AS SELECT * FROM websauna_tasks_outbox"))
    lines = [f"relays: a backlog of {count:,} outbox rows ({seed:,} written by apply_async in {fill:.1f} s, "
             f"{seed / fill:,.0f} rows/s at 1,000 per commit; the rest SQL copies), outbox_batch_size default; "
             "timed from the first message on Redis to the last",
             f"{'relays':>6} {'seconds':>8} {'rows/s':>8}"]
    try:
        for relays in args.relays:
            with engine.begin() as conn:
                conn.execute(text("DELETE FROM websauna_tasks_outbox"))
                conn.execute(text("INSERT INTO websauna_tasks_outbox SELECT * FROM bench_outbox_copy"))
            client.delete(queue)
            launched = time.perf_counter()
            workers = services.WorkerGroup([
                services.Worker([sys.executable, "-m", "websauna_tasks.cli", str(ini), "--", "outbox-relay",
                                 "-l", "warning"], tmp / f"relay-{relays}-{number}.log", env)
                for number in range(relays)])
            try:
                deadline = time.monotonic() + 120 + count / 200
                first_seen = None
                while True:
                    queued = client.llen(queue)
                    now = time.perf_counter()
                    if first_seen is None and queued:
                        first_seen = now
                    if queued >= count:
                        break
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{queued} of {count} published; relay output:\n"
                                           f"{workers.output()[-3000:]}")
                    workers.check_alive()
                    time.sleep(0.01)
            finally:
                workers.stop()
            # From the first message on: the relays' start-up (imports, the app) is left out.
            # A backlog that fits in one batch gives no span; then the start-up is counted.
            seconds = now - t.cast(float, first_seen)
            if seconds <= 0:
                seconds = now - launched
            with engine.connect() as conn:
                unsent = conn.execute(text("SELECT count(*) FROM websauna_tasks_outbox WHERE sent_at IS NULL")
                                      ).scalar_one()
            if client.llen(queue) != count or unsent:
                raise AssertionError(f"{client.llen(queue)} messages for {count} rows, {unsent} unsent")
            lines.append(f"{relays:>6} {seconds:>8.2f} {count / seconds:>8,.0f}")
    finally:
        client.delete(queue)
        engine.dispose()
    return "\n".join(lines)


# -- latency: commit to start under a steady rate -------------------------------------------------------------

def latency_growth(args, client, raw_queue: str, queue: str, tmp: pathlib.Path, env: dict[str, str],
                   database_url: str, ws_main, raw_app, ws_tasks) -> str:
    from websauna_tasks.request import task_request

    lines = [f"latency: one task per commit at {args.rate:.0f} commits/s for {args.seconds:.0f} s, "
             "worker prefork -c 2, from the commit's start (raw: apply_async's) to the run's start",
             f"{'path':<10} {'achieved/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}"]
    count = int(args.rate * args.seconds)

    def paced(send: t.Callable[[], None]) -> float:
        started = time.perf_counter()
        for index in range(count):
            pause = started + index / args.rate - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            send()
        return count / (time.perf_counter() - started)

    for path in ("raw Celery", "plain", "outbox"):
        key = f"{queue}-latency-{uuid.uuid4().hex[:6]}"
        if path == "raw Celery":
            worker = services.raw_worker(tmp / "latency-raw.log", env)
            send_one = lambda: raw_app.stamp.apply_async((key, time.time()))  # noqa: E731
            request_context = None
        else:
            values = {"websauna.celery_config": repr(settings.celery_config(queue)), "sqlalchemy.url": database_url}
            if path == "outbox":
                values["websauna_tasks.outbox"] = "true"
            ini = write_ini(tmp / f"latency-{path}.ini", values)
            router = ws_main({}, **values)
            worker = services.ws_worker(ini, tmp / f"latency-{path}.log", env)
            request_context = task_request(router.registry)
        try:
            if request_context is not None:
                request = request_context.__enter__()

                def send_one() -> None:
                    with request.tm:
                        ws_tasks.stamp.apply_async((key, time.time()), tm=request.tm)
            # Wait for the worker to run a first task, so that its start-up is not a latency.
            send_one()
            services.wait_for_length(client, key, 1, worker, 120)
            client.delete(key)
            achieved = paced(send_one)
            services.wait_for_length(client, key, count, worker, 120 + count / 20)
            latencies = [float(value) * 1e3 for value in client.lrange(key, 0, -1)]
        finally:
            if request_context is not None:
                request_context.__exit__(None, None, None)
            worker.stop()
            client.delete(key)
            services.delete_queue_keys(client, raw_queue if path == "raw Celery" else queue)
        lines.append(f"{path:<10} {achieved:>10,.0f} {percentile(latencies, 0.5):>8.1f} "
                     f"{percentile(latencies, 0.99):>8.1f} {max(latencies):>8.1f}")
    return "\n".join(lines)


# -- rss: worker memory after many runs ----------------------------------------------------------------------

def rss_growth(args, client, raw_queue: str, ws_queue: str, tmp: pathlib.Path, env: dict[str, str],
               ws_main, raw_app, ws_tasks) -> str:
    import transaction

    # The same database layer as raw+sql: an engine on PostgreSQL (made, never connected: no task uses it).
    values = {"websauna.celery_config": repr(settings.celery_config(ws_queue)), "sqlalchemy.url": settings.DATABASE_URL}
    ini = write_ini(tmp / "rss.ini", values)
    ws_main({}, **values)
    marks = args.rss_runs
    results: dict[str, list[int]] = {}

    def feed_raw(key_of: t.Callable[[int], str]) -> None:
        done = 0
        with raw_app.app.producer_or_acquire() as producer:
            for mark in marks:
                for index in range(done, mark):
                    raw_app.noop.apply_async((index,), producer=producer)
                raw_app.rss.apply_async((key_of(mark),), producer=producer)
                done = mark

    def feed_ws(key_of: t.Callable[[int], str]) -> None:
        done = 0
        for mark in marks:
            for first in range(done, mark, 10000):
                tm = transaction.TransactionManager(explicit=True)
                with tm:
                    for index in range(first, min(mark, first + 10000)):
                        ws_tasks.noop.apply_async((index,), tm=tm)
            tm = transaction.TransactionManager(explicit=True)
            with tm:
                ws_tasks.rss.apply_async((key_of(mark),), tm=tm)
            done = mark

    pool = ["-P", "solo"] if args.rss_pool == "solo" else ["-P", "prefork", "-c", "1"]

    def raw_worker(preload: str) -> t.Callable[[pathlib.Path], t.Any]:
        return lambda log: services.Worker([sys.executable, "-m", "celery", "-A", "bench.raw_app", "worker",
                                            *pool, *WORKER_FLAGS], log, {**env, "BENCH_RAW_PRELOAD": preload})

    # The same pool, concurrency, flags, broker and serializer on every side; each task body is
    # empty, and the mark task is the same code (bench.settings.own_rss_kib) in the same process.
    sides = {"raw": ("raw Celery", raw_queue, feed_raw, raw_worker("")),
             "raw+sql": ("raw Celery + SQLAlchemy", raw_queue, feed_raw, raw_worker(args.rss_raw_preload)),
             "raw+stack": ("raw Celery + SQLAlchemy + Pyramid", raw_queue, feed_raw,
                           raw_worker(f"{args.rss_raw_preload},{args.rss_stack_preload}")),
             "ours": ("ours", ws_queue, feed_ws,
                      lambda log: services.Worker([sys.executable, "-m", "websauna_tasks.cli", str(ini), "--",
                                                   "worker", *pool, *WORKER_FLAGS], log, env))}
    chosen = [side for side in args.rss_sides.split(",") if side]
    unknown = set(chosen) - set(sides)
    if unknown:
        raise SystemExit(f"--rss-sides: unknown {', '.join(sorted(unknown))} (raw, raw+sql, raw+stack, ours)")
    for side in chosen:
        name, queue, feed, start = sides[side]
        prefix = f"{queue}-rss-{uuid.uuid4().hex[:6]}"
        worker = start(tmp / f"rss-{side}.log")
        try:
            # Fed while the worker runs: only memory is measured here, not speed.
            feed(lambda mark: f"{prefix}-{mark}")
            results[side] = []
            for mark in marks:
                results[side].append(int(services.wait_for_key(client, f"{prefix}-{mark}", worker, 300 + mark / 20)))
                print(f"rss: {name} after {mark:,} runs: {results[side][-1]:,} KiB", flush=True)
        finally:
            worker.stop()
            client.delete(*(f"{prefix}-{mark}" for mark in marks))
            services.delete_queue_keys(client, queue)
    process = "one -P solo worker process" if args.rss_pool == "solo" else "the child of a -P prefork -c 1 worker"
    lines = [f"rss: {process}, resident set after n no-op runs (KiB, VmRSS); "
             f"raw+sql imports {args.rss_raw_preload} at start, raw+stack {args.rss_stack_preload} as well",
             f"{'runs':>8} {'raw KiB':>9} {'raw+sql KiB':>12} {'raw+stack KiB':>14} {'ours KiB':>9} "
             f"{'ours/raw':>9} {'ours/raw+sql':>13} {'ours/raw+stack':>15}"]

    def ratio(ours: int, raw: int, width: int) -> str:
        return f"{ours / raw:>{width - 1}.2f}x" if ours and raw else f"{'-':>{width}}"

    for index, mark in enumerate(marks):
        raw_kib, sql_kib, stack_kib, ours_kib = (results.get(side, [0] * len(marks))[index]
                                                 for side in ("raw", "raw+sql", "raw+stack", "ours"))
        lines.append(f"{mark:>8,} {raw_kib:>9,} {sql_kib:>12,} {stack_kib:>14,} {ours_kib:>9,} "
                     f"{ratio(ours_kib, raw_kib, 9)} {ratio(ours_kib, sql_kib, 13)} {ratio(ours_kib, stack_kib, 15)}")
    for side, figures in results.items():
        lines.append(f"{sides[side][0]}: grew {figures[-1] - figures[0]:+,} KiB "
                     f"from {marks[0]:,} to {marks[-1]:,} runs")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM as SystemExit: the finally blocks still stop the workers and delete the private keys.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    run_id = uuid.uuid4().hex[:8]
    raw_queue, ws_queue = f"bench-{run_id}-raw", f"bench-{run_id}-ws"
    env = {settings.BROKER_ENV: settings.REDIS_URL, settings.QUEUE_ENV: raw_queue,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    os.environ.update(env)
    import redis

    from bench import raw_app, ws_tasks
    from bench.run import machine
    from bench.ws_app import main as ws_main

    client = redis.Redis.from_url(settings.REDIS_URL)
    client.ping()
    print(f"machine: {machine()}\nqueues {raw_queue} / {ws_queue} in {settings.REDIS_URL}\n", flush=True)
    texts = []
    try:
        if "dispatch" in args.parts:
            ws_main({}, **{"websauna.celery_config": repr(settings.celery_config(ws_queue))})
            texts.append(dispatch_growth(args, client, ws_queue, ws_tasks))
            print(texts[-1] + "\n", flush=True)
        with tempfile.TemporaryDirectory(prefix="wsbench-growth-") as tmp:
            tmp_path = pathlib.Path(tmp)
            if "relays" in args.parts or "latency" in args.parts:
                with services.private_database(settings.DATABASE_URL) as database_url:
                    worker_env = {**env, settings.DATABASE_ENV: database_url}
                    if "relays" in args.parts:
                        texts.append(relay_growth(args, client, ws_queue, tmp_path, worker_env, database_url,
                                                  ws_main, ws_tasks))
                        print(texts[-1] + "\n", flush=True)
                    if "latency" in args.parts:
                        texts.append(latency_growth(args, client, raw_queue, ws_queue, tmp_path, worker_env,
                                                    database_url, ws_main, raw_app, ws_tasks))
                        print(texts[-1] + "\n", flush=True)
            if "rss" in args.parts:
                texts.append(rss_growth(args, client, raw_queue, ws_queue, tmp_path, env, ws_main, raw_app,
                                        ws_tasks))
                print(texts[-1] + "\n", flush=True)
    finally:
        for queue in (raw_queue, ws_queue):
            services.delete_queue_keys(client, queue)
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
