"""``bench/run.py --profile``: where a worker's time goes, per task, ours against raw Celery.

One ``-P solo`` worker per side runs under cProfile, so the consumer, the
intake and the task's run are all in the one profiled process. The queue is
pre-filled as in the throughput runs (a mark, N tasks, a mark). The profiler
is switched on when the first mark starts and off when the second one ends
(Celery's task_prerun and task_postrun signals), so start-up, imports and the
idle wait after the last task are left out: what is left is N tasks' worth of
the per-task path, divided by N.

    python -m bench.profile_worker OUT.prof celery -A bench.raw_app worker -P solo ...
    python -m bench.profile_worker OUT.prof ws-celery INI -- worker -P solo ...

cProfile slows every Python call, so the figures are larger than in a plain
run; they are for comparing the two sides and finding what ours adds.

An OUT that ends in ``.cpu`` runs the worker without the profiler and writes
the process's CPU time (``time.process_time()``, user and system, all its
threads) and wall time between the same two marks instead: the per-task CPU
cost of the whole path, consumer and run in one process, which the machine's
load changes far less than a rate (``bench/run.py --cpu``).
"""
from __future__ import annotations

import cProfile
import pathlib
import pstats
import statistics
import sys
import time
import typing as t

from bench import services

MARK_TASKS = frozenset({"bench.raw.mark", "bench.ws.mark"})


def profiled_worker(app_argv: list[str], out: pathlib.Path, log: pathlib.Path, env: dict[str, str]) -> services.Worker:
    argv = [sys.executable, "-m", "bench.profile_worker", str(out), *app_argv,
            "worker", "-P", "solo", "-l", "warning", "--without-mingle", "--without-gossip", "--without-heartbeat"]
    return services.Worker(argv, log, env)


def _run_profiled(out: str, argv: list[str]) -> int:
    """Run a worker command with the profiler on between the two marks (module docstring)."""
    from celery import signals

    marks_seen = {"started": 0, "ended": 0}
    if out.endswith(".cpu"):
        clocks: dict[str, float] = {}

        def start() -> None:
            clocks["cpu"], clocks["wall"] = time.process_time(), time.perf_counter()

        def stop() -> None:
            cpu, wall = time.process_time() - clocks["cpu"], time.perf_counter() - clocks["wall"]
            pathlib.Path(out).write_text(f"{cpu!r} {wall!r}\n")
    else:
        profiler = cProfile.Profile()
        start = profiler.enable

        def stop() -> None:
            profiler.disable()
            profiler.dump_stats(out)

    def on_prerun(sender: t.Any = None, **_: t.Any) -> None:
        if getattr(sender, "name", None) in MARK_TASKS:
            marks_seen["started"] += 1
            if marks_seen["started"] == 1:
                start()

    def on_postrun(sender: t.Any = None, **_: t.Any) -> None:
        if getattr(sender, "name", None) in MARK_TASKS:
            marks_seen["ended"] += 1
            if marks_seen["ended"] == 2:
                stop()

    signals.task_prerun.connect(on_prerun, weak=False)
    signals.task_postrun.connect(on_postrun, weak=False)
    if argv[0] == "ws-celery":
        from websauna_tasks.cli import main as ws_main

        return ws_main(argv[1:])
    from celery.bin.celery import main as celery_main

    sys.argv = ["celery", *argv[1:]]  # Celery's click group reads the process's arguments
    return celery_main()


def wait_for_file(path: pathlib.Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size:
            return
        time.sleep(0.1)
    raise TimeoutError(f"no profile written to {path}")


def own_times(path: pathlib.Path, count: int) -> dict[str, tuple[float, float, float]]:
    """Function -> (calls per task, own us per task, cumulative us per task) over the profiled window."""
    stats = pstats.Stats(str(path))
    rows = {}
    for (filename, line, name), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        where = f"{pathlib.Path(filename).parent.name}/{pathlib.Path(filename).name}:{line}" if line else "~"
        rows[f"{where}({name})"] = (ncalls / count, tottime / count * 1e6, cumtime / count * 1e6)
    return rows


#: Time spent waiting, not computing: shown apart from the CPU figures.
WAITS = ("poll' of 'select.epoll", "recv' of '_socket.socket", "sendall' of '_socket.socket",
         "select.select", "psycopg/connection.py")


def report(label: str, raw_path: pathlib.Path, ws_path: pathlib.Path, count: int, limit: int = 12) -> str:
    raw, ours = own_times(raw_path, count), own_times(ws_path, count)

    def total(rows: dict[str, tuple[float, float, float]], waits: bool) -> float:
        return sum(own for name, (_calls, own, _cum) in rows.items()
                   if any(wait in name for wait in WAITS) == waits)

    lines = [f"--profile, {label}: {count:,} tasks, one -P solo worker under cProfile between the marks, "
             "us per task",
             f"  computing (own time outside socket and poll waits): raw {total(raw, False):8.1f}   "
             f"ours {total(ours, False):8.1f}   ours - raw {total(ours, False) - total(raw, False):+8.1f}",
             f"  waiting on sockets and poll:                        raw {total(raw, True):8.1f}   "
             f"ours {total(ours, True):8.1f}",
             "  what ours adds: own time, ours minus raw, largest first (calls/task in ours, ours us, raw us):"]
    added = sorted(((ours[name][1] - raw.get(name, (0, 0.0, 0))[1], name) for name in ours
                    if not any(wait in name for wait in WAITS)), reverse=True)
    for difference, name in added[:limit]:
        lines.append(f"    {difference:+8.1f}  {name:<70} {ours[name][0]:5.1f} {ours[name][1]:8.1f} "
                     f"{raw.get(name, (0, 0.0, 0))[1]:8.1f}")
    lines.append("  our own functions, by cumulative time (calls/task, own us, cumulative us):")
    mine = sorted(((cum, own, calls, name) for name, (calls, own, cum) in ours.items()
                   if name.startswith(("websauna_tasks/", "observability/", "outbox/"))), reverse=True)
    for cum, own, calls, name in mine[:limit]:
        lines.append(f"    {name:<72} {calls:5.1f} {own:8.1f} {cum:9.1f}")
    return "\n".join(lines)


def cpu_pairs(label: str, count: int, rounds: int, tmp: pathlib.Path, env: dict[str, str],
              run_raw: t.Callable[[t.Callable[[], services.Worker]], object],
              run_ws: t.Callable[[t.Callable[[], services.Worker]], object],
              raw_argv: list[str], ws_argv: list[str]) -> str:
    """CPU us per task of one ``-P solo`` worker per side, without the profiler, ``rounds`` interleaved pairs.

    The order alternates with the round. The ratio is raw's CPU per task over
    ours, so that, like the rate rows, 1.0x or more means ours costs no more.
    """
    slug = label.replace(" ", "-")
    pairs = []
    for number in range(rounds):
        raw_out, ws_out = tmp / f"raw-{slug}-{number}.cpu", tmp / f"ws-{slug}-{number}.cpu"
        sides = [(run_raw, raw_argv, raw_out, "raw"), (run_ws, ws_argv, ws_out, "ws")]
        for run, argv, out, side in (sides if number % 2 == 0 else sides[::-1]):
            run(lambda argv=argv, out=out, side=side: profiled_worker(
                argv, out, tmp / f"{side}-{slug}-{number}-cpu.log", env))
            wait_for_file(out)
        raw_cpu, ws_cpu = (float(path.read_text().split()[0]) / count * 1e6 for path in (raw_out, ws_out))
        pairs.append((raw_cpu, ws_cpu))
    raw_median = statistics.median(raw for raw, _ in pairs)
    ws_median = statistics.median(ws for _, ws in pairs)
    ratios = [raw / ws for raw, ws in pairs]
    return (f"--cpu, {label}: {count:,} tasks, one -P solo worker per side, no profiler, CPU time of the worker "
            f"process between the marks, median of {rounds} interleaved pairs\n"
            f"  CPU us per task: raw {raw_median:7.1f}   ours {ws_median:7.1f}   "
            f"ours - raw {ws_median - raw_median:+6.1f}   raw/ours {statistics.median(ratios):.2f}x "
            f"(pairs {min(ratios):.2f}x-{max(ratios):.2f}x)")


def profile_pair(label: str, count: int, tmp: pathlib.Path, env: dict[str, str],
                 run_raw: t.Callable[[t.Callable[[], services.Worker]], object],
                 run_ws: t.Callable[[t.Callable[[], services.Worker]], object],
                 raw_argv: list[str], ws_argv: list[str]) -> str:
    """Profile one raw and one ws run of the same kind; ``run_*`` take the worker factory (measure.worker_run)."""
    slug = label.replace(" ", "-")
    raw_out, ws_out = tmp / f"raw-{slug}.prof", tmp / f"ws-{slug}.prof"
    run_raw(lambda: profiled_worker(raw_argv, raw_out, tmp / f"raw-{slug}-prof.log", env))
    wait_for_file(raw_out)
    run_ws(lambda: profiled_worker(ws_argv, ws_out, tmp / f"ws-{slug}-prof.log", env))
    wait_for_file(ws_out)
    return report(label, raw_out, ws_out, count)


if __name__ == "__main__":
    if len(sys.argv) < 4 or sys.argv[2] not in ("celery", "ws-celery"):
        print("usage: python -m bench.profile_worker OUT.prof (celery -A APP | ws-celery INI --) worker [options]",
              file=sys.stderr)
        sys.exit(2)
    sys.exit(_run_profiled(sys.argv[1], sys.argv[2:]))
