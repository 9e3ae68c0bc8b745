"""websauna_tasks against raw Celery, on this machine's Redis (and PostgreSQL for the worker run).

    .venv/bin/python bench/run.py                 # everything (two to three minutes)
    .venv/bin/python bench/run.py --skip-worker   # only (a) and (b), no PostgreSQL needed
    .venv/bin/python bench/run.py --fast          # also the fast profile (docs/fast_profile.md)
    .venv/bin/python bench/run.py --profile       # also where the worker's time goes, per task
    .venv/bin/python bench/run.py --cpu           # also CPU us per task of a -P solo worker, ours vs raw

Every figure is measured in the same run as the raw Celery figure it is
compared with, on private queue names that are deleted afterwards (the Redis
database is shared: nothing else is touched). Services: BENCH_REDIS_URL
(default redis://127.0.0.1:6379/15) and BENCH_DATABASE_URL (an existing
PostgreSQL database in which a private one is created and dropped).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys
import tempfile
import uuid

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make ``bench`` and the project importable
    sys.path.insert(0, str(ROOT))

from bench import services, settings
from bench.measure import Result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dispatch-tasks", type=int, default=1000, help="tasks per commit in (a)")
    parser.add_argument("--dispatch-rounds", type=int, default=7, help="rounds of (a)")
    parser.add_argument("--single-repetitions", type=int, default=3000, help="repetitions of (b)")
    parser.add_argument("--worker-tasks", type=int, default=2000, help="tasks per worker run in (c)")
    parser.add_argument("--worker-runs", type=int, default=3, help="worker runs per side in (c)")
    parser.add_argument("--skip-worker", action="store_true", help="skip (c)")
    parser.add_argument("--async-commit", action="store_true",
                        help="run (c) with synchronous_commit = off on the run's private database, "
                             "to see how much of (c) is PostgreSQL waiting for the disk")
    parser.add_argument("--context", action="store_true",
                        help="also run rows that split the (c)/(c1) gaps: raw Celery's task through an ORM "
                             "Session (at Celery's defaults, and with our acks_late and prefetch 1), and our "
                             "worker with Celery's default prefetch (x4)")
    parser.add_argument("--fast", action="store_true",
                        help="also run the fast profile (docs/fast_profile.md) on the (c) task and the no-op")
    parser.add_argument("--fast-workers", type=int, default=2, help="-P solo processes of the fast profile")
    parser.add_argument("--fast-prefetch", type=int, default=16,
                        help="--prefetch-multiplier of each fast-profile worker")
    parser.add_argument("--profile", action="store_true",
                        help="after the table, profile one -P solo worker per side with cProfile "
                             "(the no-op and the (c) task) and print the per-task costs")
    parser.add_argument("--profile-tasks", type=int, default=2000, help="tasks per profiled (and --cpu) worker run")
    parser.add_argument("--cpu", action="store_true",
                        help="after the table, the CPU time per task of one -P solo worker per side, without the "
                             "profiler (the no-op and the (c) task): what the machine's load changes least")
    parser.add_argument("--cpu-rounds", type=int, default=3, help="interleaved pairs of --cpu runs")
    return parser.parse_args(argv)


def machine() -> str:
    model = ""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import celery
    import kombu
    import redis

    return (f"{os.cpu_count()} cores {model}, Python {platform.python_version()}, celery {celery.__version__}, "
            f"kombu {kombu.__version__}, redis-py {redis.__version__}")


def print_table(results: list[Result]) -> None:
    header = f"{'benchmark':<42} {'raw celery':>12} {'websauna':>12} {'ratio':>7}  {'goal':<20} met"
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r.name:<42} {r.raw:>9.1f} {r.unit:<2} {r.ours:>9.1f} {r.unit:<2} {r.ratio:>6.2f}x  "
              f"{r.goal:<20} {'-' if r.met is None else 'yes' if r.met else 'NO'}")
    for r in results:
        if r.note:
            print(f"  {r.name.split(' ', 1)[0]} {r.note}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_id = uuid.uuid4().hex[:8]
    raw_queue, ws_queue = f"bench-{run_id}-raw", f"bench-{run_id}-ws"
    # The raw app reads these at import; worker subprocesses inherit them.
    env = {settings.BROKER_ENV: settings.REDIS_URL, settings.QUEUE_ENV: raw_queue,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    os.environ.update(env)

    import redis

    from bench import raw_app, ws_tasks
    from bench.measure import dispatch_many, dispatch_one
    from bench.ws_app import main as ws_main

    client = redis.Redis.from_url(settings.REDIS_URL)
    client.ping()
    print(f"machine: {machine()}")
    print(f"broker: {settings.REDIS_URL}, queues {raw_queue} / {ws_queue}\n")
    results: list[Result] = []
    try:
        ws_settings = {"websauna.celery_config": repr(settings.celery_config(ws_queue))}
        ws_main({}, **ws_settings)
        results.append(dispatch_many(raw_app.noop, ws_tasks.noop, client, raw_queue, ws_queue,
                                     args.dispatch_tasks, args.dispatch_rounds))
        results.append(dispatch_one(raw_app.noop, ws_tasks.noop, client, raw_queue, ws_queue,
                                    args.single_repetitions))
        if not args.skip_worker:
            results.extend(run_workers(args, client, raw_queue, ws_queue, env, ws_main, raw_app, ws_tasks))
    finally:
        for queue in (raw_queue, ws_queue):
            services.delete_queue_keys(client, queue)
        client.close()
    print()
    print_table(results)
    return 0


def run_workers(args: argparse.Namespace, client, raw_queue: str, ws_queue: str, env: dict[str, str],
                ws_main, raw_app, ws_tasks) -> list[Result]:
    import sqlalchemy

    from bench.measure import check_rows, raw_prefill, reset_rows, throughput, worker_run, ws_prefill

    count, timeout = args.worker_tasks, 120.0 + args.worker_tasks / 50
    with tempfile.TemporaryDirectory(prefix="wsbench-") as tmp, \
            services.private_database(settings.DATABASE_URL, not args.async_commit) as database_url:
        tmp_path = pathlib.Path(tmp)
        worker_env = {**env, settings.DATABASE_ENV: database_url}
        ws_settings = {"websauna.celery_config": repr(settings.celery_config(ws_queue)),
                       "sqlalchemy.url": database_url}
        ini = tmp_path / "bench.ini"
        ini.write_text("[app:main]\nuse = call:bench.ws_app:main\n"
                       + "".join(f"{key} = {value}\n" for key, value in ws_settings.items()))
        ws_main({}, **ws_settings)  # the producing side, with this run's database
        engine = sqlalchemy.create_engine(database_url)

        def raw(task_name: str, log: str):
            return worker_run(client, raw_queue, count, raw_prefill(raw_app.app, task_name, count, first=1),
                              lambda: services.raw_worker(tmp_path / log, worker_env), timeout)

        def raw_late(task_name: str, log: str):
            # Raw Celery with our delivery settings: acks_late on the task, one message per pool process.
            return worker_run(client, raw_queue, count, raw_prefill(raw_app.app, task_name, count, first=1),
                              lambda: services.raw_worker(tmp_path / log, worker_env, "--prefetch-multiplier", "1"),
                              timeout)

        def ws(task, log: str):
            return worker_run(client, ws_queue, count, ws_prefill(ws_tasks, task, count, first=1),
                              lambda: services.ws_worker(ini, tmp_path / log, worker_env), timeout)

        def ws_prefetch4(task, log: str):
            return worker_run(client, ws_queue, count, ws_prefill(ws_tasks, task, count, first=1),
                              lambda: services.ws_worker(ini, tmp_path / log, worker_env, "--prefetch-multiplier",
                                                         "4"), timeout)

        def fast(task, log: str):
            return worker_run(client, ws_queue, count, ws_prefill(ws_tasks, task, count, first=1),
                              lambda: fast_profile_workers(ini, tmp_path, log, worker_env, args), timeout)

        kinds = [("raw touch", lambda n: raw("bench.raw.touch", f"raw-touch-{n}.log"), True),
                 ("ws touch", lambda n: ws(ws_tasks.touch, f"ws-touch-{n}.log"), True),
                 ("raw noop", lambda n: raw("bench.raw.noop", f"raw-noop-{n}.log"), False),
                 ("ws noop", lambda n: ws(ws_tasks.noop, f"ws-noop-{n}.log"), False)]
        if args.context:
            kinds += [("raw touch session", lambda n: raw("bench.raw.touch_session", f"raw-session-{n}.log"), True),
                      ("raw touch late", lambda n: raw_late("bench.raw.touch_session_late", f"raw-late-{n}.log"),
                       True),
                      ("ws touch p4", lambda n: ws_prefetch4(ws_tasks.touch, f"ws-touch-p4-{n}.log"), True),
                      ("ws noop p4", lambda n: ws_prefetch4(ws_tasks.noop, f"ws-noop-p4-{n}.log"), False)]
        if args.fast:
            kinds += [("fast touch", lambda n: fast(ws_tasks.touch, f"fast-touch-{n}"), True),
                      ("fast noop", lambda n: fast(ws_tasks.noop, f"fast-noop-{n}"), False)]
        runs: dict[str, list] = {kind: [] for kind, _, _ in kinds}
        try:
            for number in range(args.worker_runs):
                # Interleaved, and the order rotates with the round, so that every kind
                # of run sees the same machine load on this shared machine.
                shift = (number * 2) % len(kinds)
                for kind, run, uses_rows in kinds[shift:] + kinds[:shift]:
                    if uses_rows:
                        reset_rows(engine, count)
                    runs[kind].append(run(number))
                    if uses_rows:
                        check_rows(engine, count)
                print(f"worker run {number + 1}: " + ", ".join(
                    f"{kind} {kind_runs[-1].rate:.0f}/s" for kind, kind_runs in runs.items()), flush=True)
            profile_text = run_profiles(args, client, raw_queue, ws_queue, worker_env, ini, tmp_path, engine,
                                        raw_app, ws_tasks) if args.profile or args.cpu else ""
        finally:
            engine.dispose()
    size = f"median of {args.worker_runs} runs of {count:,} tasks, prefork -c 2 unless said"
    results = [
        throughput("(c) same SQL: RetryableTransactionTask", runs["raw touch"], runs["ws touch"], 0.95,
                   f"{size}; raw: plain Celery task, SQLAlchemy Core, SELECT + UPDATE + explicit COMMIT"),
        throughput("(c1) no-op task in both", runs["raw noop"], runs["ws noop"], 1.0,
                   "ours: ScheduleOnCommitTask doing nothing (a Pyramid request per run)"),
    ]
    if args.context:
        results += [
            throughput("(c-session) ours vs raw with an ORM Session", runs["raw touch session"], runs["ws touch"],
                       None, "raw: the same SQL through sessionmaker's Session and session.commit()"),
            throughput("(c-same) ours vs raw Session, same delivery", runs["raw touch late"], runs["ws touch"], None,
                       "raw: the Session task with acks_late and --prefetch-multiplier 1, as our "
                       "RetryableTransactionTask is delivered: what our layer costs at equal guarantees"),
            throughput("(c-p4) same SQL, ours at prefetch x4", runs["raw touch"], runs["ws touch p4"], None,
                       "ours: --prefetch-multiplier 4, Celery's default (ours is 1)"),
            throughput("(c1-p4) no-op, ours at prefetch x4", runs["raw noop"], runs["ws noop p4"], None,
                       "ours: --prefetch-multiplier 4, Celery's default (ours is 1)"),
        ]
    if args.fast:
        profile = f"{args.fast_workers} x -P solo, prefetch x{args.fast_prefetch}"
        results += [
            throughput("(c-fast) same SQL, fast vs raw prefork", runs["raw touch"], runs["fast touch"], None,
                       f"ours: fast profile ({profile})"),
            throughput("(c1-fast) no-op, fast vs raw prefork", runs["raw noop"], runs["fast noop"], 1.5,
                       f"ours: fast profile ({profile})"),
        ]
    if profile_text:
        print("\n" + profile_text + "\n")
    return results


def fast_profile_workers(ini: pathlib.Path, tmp_path: pathlib.Path, log: str, env: dict[str, str],
                         args: argparse.Namespace):
    """The fast profile of docs/fast_profile.md: several single-process workers on one queue."""
    return services.WorkerGroup([
        services.Worker([sys.executable, "-m", "websauna_tasks.cli", str(ini), "--", "worker", "-P", "solo",
                         "--prefetch-multiplier", str(args.fast_prefetch), "-n", f"fast{number}@%h",
                         "-l", "warning", "--without-mingle", "--without-gossip", "--without-heartbeat"],
                        tmp_path / f"{log}-{number}.log", env)
        for number in range(args.fast_workers)])


def run_profiles(args: argparse.Namespace, client, raw_queue: str, ws_queue: str, env: dict[str, str],
                 ini: pathlib.Path, tmp_path: pathlib.Path, engine, raw_app, ws_tasks) -> str:
    from bench.measure import check_rows, raw_prefill, reset_rows, worker_run, ws_prefill
    from bench.profile_worker import cpu_pairs, profile_pair

    count, timeout = args.profile_tasks, 120.0 + args.profile_tasks / 20
    raw_argv = ["celery", "-A", "bench.raw_app"]
    ws_argv = ["ws-celery", str(ini), "--"]
    texts = []
    for label, raw_task, ws_task, uses_rows in (("no-op", "bench.raw.noop", ws_tasks.noop, False),
                                                 ("(c) task", "bench.raw.touch", ws_tasks.touch, True)):
        def run_raw(factory, raw_task=raw_task, uses_rows=uses_rows):
            if uses_rows:
                reset_rows(engine, count)
            worker_run(client, raw_queue, count, raw_prefill(raw_app.app, raw_task, count, first=1), factory,
                       timeout)
            if uses_rows:
                check_rows(engine, count)

        def run_ws(factory, ws_task=ws_task, uses_rows=uses_rows):
            if uses_rows:
                reset_rows(engine, count)
            worker_run(client, ws_queue, count, ws_prefill(ws_tasks, ws_task, count, first=1), factory, timeout)
            if uses_rows:
                check_rows(engine, count)

        if args.profile:
            texts.append(profile_pair(label, count, tmp_path, env, run_raw, run_ws, raw_argv, ws_argv))
        if args.cpu:
            texts.append(cpu_pairs(label, count, args.cpu_rounds, tmp_path, env, run_raw, run_ws, raw_argv, ws_argv))
    return "\n\n".join(texts)


if __name__ == "__main__":
    sys.exit(main())
