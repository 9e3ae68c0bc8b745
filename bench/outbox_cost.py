"""The producer's cost of one commit with one task: the outbox path against the plain path.

    .venv/bin/python bench/outbox_cost.py                         # CPU us per commit, 5 interleaved rounds
    .venv/bin/python bench/outbox_cost.py --callgrind 200,1000    # instructions per commit (valgrind)
    .venv/bin/python bench/outbox_cost.py --profile outbox        # cProfile of the outbox loop, top 40

Each measurement is a subprocess that builds ``bench.ws_app`` (outbox on or off, a database of
its own, a private Redis queue), warms up with a few commits, then runs ``--commits`` times
``with request.tm: stamp.apply_async(..., tm=request.tm)`` as bench/growth.py's latency part does.
The outbox path's fast path (the thread that publishes each commit's row and marks it sent) runs
in the same process and is flushed after every commit, so that each commit is one round of it
(what a producer at a rate it keeps up with pays) and the count does not depend on timing;
``--no-flush`` lets it batch.

- CPU: ``time.process_time`` of the whole loop (every thread of the process: the fast path's
  work counts), per commit; the median of ``--rounds`` rounds, plain and outbox alternating.
- callgrind: ``(I(N2) - I(N1)) / (N2 - N1)``, the instructions of every thread of the process,
  so start-up and warm-up cancel out. Load-independent.

No worker runs: the relay's work (woken by each commit's NOTIFY) is in the worker, not here.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make ``bench`` and the project importable
    sys.path.insert(0, str(ROOT))

from bench import services, settings  # noqa: E402

MODES = ("plain", "outbox")
WARM_UP = 30


def child(mode: str, commits: int, database_url: str, queue: str, flush: bool, profile: bool) -> None:
    """Run the loop in this process and print ``cpu wall`` seconds of the measured commits."""
    import redis

    from bench import ws_tasks
    from bench.ws_app import main as ws_main
    from websauna_tasks.outbox import find_outbox
    from websauna_tasks.request import task_request

    values = {"websauna.celery_config": repr(settings.celery_config(queue)), "sqlalchemy.url": database_url,
              # No relay thread in this process: a producer has none (the worker runs it).
              "websauna_tasks.outbox_relay_in_worker": "false"}
    if mode == "outbox":
        values["websauna_tasks.outbox"] = "true"
    router = ws_main({}, **values)
    outbox = find_outbox(ws_tasks.stamp.app)
    if (outbox is not None) != (mode == "outbox"):
        raise AssertionError(f"mode {mode}, outbox {outbox}")
    client = redis.Redis.from_url(settings.broker_url())
    with task_request(router.registry) as request:
        def loop(count: int) -> None:
            for _ in range(count):
                with request.tm:
                    ws_tasks.stamp.apply_async(("k", time.time()), tm=request.tm)
                if flush and outbox is not None:
                    outbox.fast_path.flush(30)

        loop(WARM_UP)
        if outbox is not None:
            outbox.fast_path.flush(30)
        if profile:
            import cProfile
            import pstats

            profiler = cProfile.Profile(time.thread_time)
            if outbox is not None:
                # cProfile sees one thread: the fast path's rounds get a profiler of their own. CPU time, not the waits.
                thread_profiler = cProfile.Profile(time.thread_time)
                publish_pending = outbox.publish_pending
                outbox.publish_pending = lambda *a, **k: thread_profiler.runcall(publish_pending, *a, **k)
            profiler.enable()
        cpu, wall = time.process_time(), time.perf_counter()
        loop(commits)
        if outbox is not None:
            outbox.fast_path.flush(30)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        if profile:
            profiler.disable()
            pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(60)
            pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(40)
            if outbox is not None:
                print("-- the fast path's thread", file=sys.stderr)
                pstats.Stats(thread_profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(60)
                pstats.Stats(thread_profiler, stream=sys.stderr).sort_stats("tottime").print_stats(40)
    queued = client.llen(queue)
    if queued != WARM_UP + commits:
        raise AssertionError(f"{queued} messages queued, expected {WARM_UP + commits}")
    client.close()
    print(f"{cpu} {wall}", flush=True)


def run_child(mode: str, commits: int, database_url: str, flush: bool, valgrind: pathlib.Path | None = None,
              profile: bool = False) -> tuple[float, float, int]:
    """One subprocess: (cpu s, wall s, instructions or 0); its queue deleted afterwards."""
    import redis

    queue = f"bench-outbox-cost-{uuid.uuid4().hex[:8]}"
    argv = [sys.executable, __file__, "--child", mode, "--commits", str(commits), "--database-url", database_url,
            "--queue", queue] + ([] if flush else ["--no-flush"]) + (["--profile", mode] if profile else [])
    if valgrind is not None:
        argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={valgrind}", "--dump-instr=no"] + argv
    client = redis.Redis.from_url(settings.broker_url())
    try:
        done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
        if done.returncode:
            raise RuntimeError(f"{mode} child failed:\n{done.stderr[-4000:]}")
        if profile:
            print(done.stderr)
        cpu, wall = (float(value) for value in done.stdout.split()[-2:])
        instructions = 0
        if valgrind is not None:
            match = re.search(r"^(?:summary|totals): (\d+)", valgrind.read_text(), re.M)
            if match is None:
                raise RuntimeError(f"no totals in {valgrind}")
            instructions = int(match.group(1))
        return cpu, wall, instructions
    finally:
        services.delete_queue_keys(client, queue)
        client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--commits", type=int, default=2000, help="measured commits per round (CPU)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each mode, alternating (CPU)")
    parser.add_argument("--callgrind", help="N1,N2: count instructions of N1 and N2 commits under callgrind")
    parser.add_argument("--profile", choices=MODES, help="print a cProfile of one mode's loop")
    parser.add_argument("--modes", default=",".join(MODES), help="which of plain,outbox")
    parser.add_argument("--no-flush", dest="flush", action="store_false",
                        help="let the fast path batch commits instead of flushing it after each one")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--database-url", help=argparse.SUPPRESS)
    parser.add_argument("--queue", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.commits, args.database_url, args.queue, args.flush, args.profile is not None)
        return 0
    modes = [mode for mode in args.modes.split(",") if mode]
    with services.private_database(settings.DATABASE_URL) as database_url:
        if args.profile:
            run_child(args.profile, args.commits, database_url, args.flush, profile=True)
            return 0
        if args.callgrind:
            low, high = (int(value) for value in args.callgrind.split(","))
            counts = {}
            with tempfile.TemporaryDirectory(prefix="wsbench-outbox-cost-") as tmp:
                for mode in modes:
                    low_i = run_child(mode, low, database_url, args.flush, pathlib.Path(tmp, f"{mode}-low.out"))[2]
                    high_i = run_child(mode, high, database_url, args.flush, pathlib.Path(tmp, f"{mode}-high.out"))[2]
                    counts[mode] = (high_i - low_i) / (high - low)
                    print(f"{mode:<7} instructions per commit: {counts[mode]:>12,.0f} "
                          f"(I({high})={high_i:,}, I({low})={low_i:,})", flush=True)
            if len(counts) == 2:
                print(f"outbox / plain: {counts['outbox'] / counts['plain']:.2f}x, "
                      f"outbox - plain: {counts['outbox'] - counts['plain']:,.0f} instructions per commit")
            return 0
        cpu: dict[str, list[float]] = {mode: [] for mode in modes}
        wall: dict[str, list[float]] = {mode: [] for mode in modes}
        for round_ in range(args.rounds):
            for mode in modes:
                cpu_s, wall_s, _ = run_child(mode, args.commits, database_url, args.flush)
                cpu[mode].append(cpu_s / args.commits * 1e6)
                wall[mode].append(wall_s / args.commits * 1e6)
                print(f"round {round_ + 1} {mode:<7} CPU {cpu[mode][-1]:8.1f} us/commit, "
                      f"wall {wall[mode][-1]:8.1f} us/commit", flush=True)
        print(f"load average: {' '.join(f'{value:.2f}' for value in os.getloadavg())}")
        for mode in modes:
            print(f"{mode:<7} CPU median {statistics.median(cpu[mode]):8.1f} us/commit "
                  f"({min(cpu[mode]):.1f}-{max(cpu[mode]):.1f}), wall median "
                  f"{statistics.median(wall[mode]):8.1f} us/commit")
        if len(modes) == 2:
            print(f"outbox / plain CPU: {statistics.median(cpu['outbox']) / statistics.median(cpu['plain']):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
