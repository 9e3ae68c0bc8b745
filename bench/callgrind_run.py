"""Instructions per task run in a pool process, counted by callgrind: ours against raw Celery.

A prefork child runs each task through Celery's tracer (``build_tracer``):
signals, the task's ``__call__``, the result. This script runs that tracer
in one process, with no broker and no consumer, so what it counts is the
child's side of a run only: the run path of our layer (the task request, its
``dbsession``, the transaction and retry loop) and the database work.

    python -m bench.callgrind_run [--kinds raw-core,raw-session,ours] [--counts 200,1000]

runs ``valgrind --tool=callgrind`` once per kind and count, and prints
(I(N2) - I(N1)) / (N2 - N1): start-up, imports and the first runs cancel
out, and the machine's load does not change an instruction count.

Kinds: ``raw-core`` (bench.raw.touch, SQLAlchemy Core), ``raw-session``
(bench.raw.touch_session, an ORM Session and ``session.commit()``), ``ours``
(bench.ws.touch, a RetryableTransactionTask), ``raw-noop`` and ``ours-noop``.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import typing as t
import uuid

from bench import settings

#: Runs before the counted ones in every process, so that lazy set-up (engines, pools, caches) cancels out.
WARM_UP = 30
KINDS = ("raw-core", "raw-session", "ours", "raw-noop", "ours-noop")
ROWS = 64


def _tracer_and_args(kind: str) -> tuple[t.Callable[..., t.Any], t.Callable[[int], tuple]]:
    from celery.app.trace import build_tracer

    if kind.startswith("raw"):
        from bench import raw_app

        task = {"raw-core": raw_app.touch, "raw-session": raw_app.touch_session, "raw-noop": raw_app.noop}[kind]
        app = raw_app.app
    else:
        from bench import ws_app, ws_tasks
        from websauna_tasks.registry import get_celery

        router = ws_app.main({}, **{
            "websauna.celery_config": repr(settings.celery_config("callgrind-unused")),
            "sqlalchemy.url": os.environ[settings.DATABASE_ENV],
        })
        app = get_celery(router.registry)
        task = (ws_tasks.noop if kind == "ours-noop" else ws_tasks.touch).celery_task
    app.finalize()
    tracer = build_tracer(task.name, task, app=app, hostname="callgrind@localhost", eager=False)
    return tracer, lambda index: (index % ROWS + 1,)


def run(kind: str, count: int) -> None:
    tracer, args_of = _tracer_and_args(kind)
    for index in range(WARM_UP + count):
        if index == WARM_UP:
            # Valgrind started without instrumentation (measure()): imports and set-up run several
            # times faster so, and the (constant) cost of this call cancels out between the two counts.
            subprocess.run(["callgrind_control", "--instr=on", str(os.getpid())], check=True,
                           stdout=subprocess.DEVNULL)
        task_id = str(uuid.uuid4())
        request = {"id": task_id, "task": "", "hostname": "callgrind@localhost", "is_eager": False,
                   "delivery_info": {"exchange": "", "routing_key": "callgrind", "priority": 0,
                                     "redelivered": False},
                   "headers": None, "retries": 0, "args": args_of(index), "kwargs": {}}
        outcome = tracer(task_id, args_of(index), {}, request)
        if outcome.info is not None:  # set when the run failed or was retried
            raise RuntimeError(f"{kind}: run {index} failed: {outcome}")


def _instructions(out: pathlib.Path) -> int:
    match = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no instruction total in {out}")
    return int(match.group(1))


def measure(kinds: list[str], counts: tuple[int, int]) -> dict[str, float]:
    import sqlalchemy

    from bench import services
    from bench.measure import reset_rows

    per_task = {}
    with tempfile.TemporaryDirectory() as tmp, services.private_database(settings.DATABASE_URL) as url:
        reset_rows(sqlalchemy.create_engine(url), ROWS)
        env = {**os.environ, settings.DATABASE_ENV: url, "PYTHONHASHSEED": "0"}
        for kind in kinds:
            totals = []
            for count in counts:
                out = pathlib.Path(tmp) / f"{kind}-{count}.out"
                subprocess.run(["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
                                sys.executable, "-m", "bench.callgrind_run", "--run", kind, str(count)],
                               env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                totals.append(_instructions(out))
            per_task[kind] = (totals[1] - totals[0]) / (counts[1] - counts[0])
            print(f"{kind:12} {per_task[kind]:12,.0f} instructions per task", flush=True)
    return per_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", nargs=2, metavar=("KIND", "COUNT"), help="(inside valgrind) run COUNT tasks")
    parser.add_argument("--kinds", default="raw-core,raw-session,ours")
    parser.add_argument("--counts", default="200,1000")
    options = parser.parse_args()
    if options.run:
        run(options.run[0], int(options.run[1]))
        return
    kinds = options.kinds.split(",")
    unknown = set(kinds) - set(KINDS)
    if unknown:
        parser.error(f"unknown kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
    low, high = (int(count) for count in options.counts.split(","))
    per_task = measure(kinds, (low, high))
    for kind in kinds:
        if kind != "raw-core" and "raw-core" in per_task and not kind.endswith("noop"):
            print(f"{kind:12} / raw-core {per_task[kind] / per_task['raw-core']:.3f}x")


if __name__ == "__main__":
    main()
