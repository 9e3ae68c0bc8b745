"""What our modules add to a worker's resident set, and the most that loading optional features lazily could save.

    .venv/bin/python bench/import_cost.py                 # 5 fresh interpreters per side, seconds
    .venv/bin/python bench/import_cost.py --repeats 9 --optional websauna_tasks.defer,websauna_tasks.iteration

Each measurement is a fresh interpreter that first imports what raw Celery with the Pyramid stack
holds (bench/growth.py's ``raw+stack`` side: Celery's worker, SQLAlchemy's ORM with the PostgreSQL
dialect on psycopg, Pyramid, pyramid_tm, zope.sqlalchemy), then reads its resident set (VmRSS) and:

ini       imports what ``ws-celery`` reads the INI with (plaster_pastedeploy, pyramid.paster, and so
          logging.config): the cost of configuring a worker from the application's INI file.
ours      imports websauna_tasks as a worker does (the package, its CLI and loader), then drops the
          source lines cached while loading, as ``ws-celery`` does (cli.forget_load_caches).
lean      the same, but every module named by --optional (and its submodules) is replaced by an
          empty stand-in before anything imports it: what a worker would hold if those features
          were loaded only on first use. The stand-ins answer any attribute, so this measures memory
          only; nothing in that interpreter could run.

``ours - lean`` is an upper bound of what lazy loading could save: a real lazy load keeps some
glue, and each feature loads in full the first time a message needs it. Given the two resident
sets of bench/growth.py --parts rss (``--ours-kib``, ``--raw-sql-kib``), the script also prints
the ratio that bound would leave.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

#: bench/growth.py's raw+stack preload, and the Celery modules a started worker holds once it has run tasks.
BASE = ("celery.bin.worker", "celery.apps.worker", "celery.worker", "celery.backends.base",
        "celery.app.trace", "celery.app.amqp", "celery.app.control", "celery.app.events", "celery.app.log",
        "celery.app.routes", "celery.events", "celery.worker.request", "celery.worker.strategy",
        "celery.worker.consumer", "celery.worker.control", "celery.concurrency.solo", "billiard.pool",
        "kombu.pidbox", "kombu.mixins", "kombu.transport.redis",
        "sqlalchemy.orm", "sqlalchemy.dialects.postgresql.psycopg", "psycopg",
        "pyramid.config", "pyramid.router", "pyramid_tm", "zope.sqlalchemy")
INI = ("plaster_pastedeploy", "pyramid.paster")
OURS = ("websauna_tasks", "websauna_tasks.cli", "websauna_tasks.loader", "websauna_tasks.config_uri")
#: Features a plain worker may never run: each is wired by includeme, used by few messages or none.
OPTIONAL = ("websauna_tasks.deadletters", "websauna_tasks.defer", "websauna_tasks.iteration",
            "websauna_tasks.outbox", "websauna_tasks.idempotency", "websauna_tasks.claim_check",
            "websauna_tasks.progress", "websauna_tasks.async_dispatch", "websauna_tasks.schedule",
            "websauna_tasks.rolling", "websauna_tasks.after_response", "websauna_tasks.observability.tracing",
            "celery.schedules")

# Runs in the fresh interpreter: argv[1] is a JSON list of steps, argv[2] the modules to stand in for.
PROBE = r'''
import gc, importlib, importlib.abc, importlib.machinery, json, sys, types
from bench.settings import own_rss_kib

stand_in = set(json.loads(sys.argv[2]))

class _Anything:
    """Any attribute, call or decoration of a stood-in module's names: enough for imports to finish."""
    def __init__(self, *args, **kwargs):
        pass
    def __call__(self, *args, **kwargs):
        return args[0] if len(args) == 1 and not kwargs and callable(args[0]) else _Anything()
    def __getattr__(self, name):
        return _Anything()
    def __iter__(self):
        return iter(())
    def __mro_entries__(self, bases):
        return (object,)

class _StandIn(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        # Capitalised names are classes that others subclass, catch or raise.
        return type(name, (Exception,), {}) if name[:1].isupper() else _Anything()

class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if any(name == prefix or name.startswith(prefix + ".") for prefix in stand_in):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None
    def create_module(self, spec):
        module = _StandIn(spec.name)
        module.__path__ = []
        return module
    def exec_module(self, module):
        pass

sys.meta_path.insert(0, _Finder())
marks = []
for step in json.loads(sys.argv[1]):
    for name in step:
        importlib.import_module(name)
    if "websauna_tasks.cli" in step:
        sys.modules["websauna_tasks.cli"].forget_load_caches()
    gc.collect()
    marks.append(own_rss_kib())
real = sorted(name for name, module in sys.modules.items()
              if name.startswith("websauna_tasks") and not isinstance(module, _StandIn))
print(json.dumps({"marks": marks, "ours": len(real)}))
'''


def probe(steps: list[tuple[str, ...]], stand_in: tuple[str, ...]) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(steps), json.dumps(list(stand_in))],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    if done.returncode != 0:
        raise SystemExit(f"probe failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="fresh interpreters per side (the median is kept)")
    parser.add_argument("--optional", default=",".join(OPTIONAL), help="modules the lean side stands in for")
    parser.add_argument("--ours-kib", type=int, help="our worker's resident set from bench/growth.py --parts rss")
    parser.add_argument("--raw-sql-kib", type=int, help="raw+sql's resident set from the same run")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    optional = tuple(name for name in args.optional.split(",") if name)
    ini, ours, lean, counts = [], [], [], {}
    for _ in range(args.repeats):  # interleaved, so that a drift in the machine falls on every side
        full = probe([BASE, INI, OURS], ())
        thin = probe([BASE, INI, OURS], optional)
        ini.append(full["marks"][1] - full["marks"][0])
        ours.append(full["marks"][2] - full["marks"][1])
        lean.append(thin["marks"][2] - thin["marks"][1])
        counts = {"ours": full["ours"], "lean": thin["ours"]}
    bound = statistics.median(ours) - statistics.median(lean)
    print(f"resident set over raw Celery with the Pyramid stack (KiB, VmRSS, median of {args.repeats} "
          f"fresh interpreters each)")
    print(f"  ini   reading the INI (plaster_pastedeploy, pyramid.paster)   {statistics.median(ini):8,.0f}  "
          f"({min(ini):,}-{max(ini):,})")
    print(f"  ours  websauna_tasks, {counts['ours']} modules                          {statistics.median(ours):8,.0f}  "
          f"({min(ours):,}-{max(ours):,})")
    print(f"  lean  without {len(optional)} optional features, {counts['lean']} modules        "
          f"{statistics.median(lean):8,.0f}  ({min(lean):,}-{max(lean):,})")
    print(f"  lazy loading could save at most {bound:,.0f} KiB")
    if args.ours_kib and args.raw_sql_kib:
        print(f"  ours/raw+sql {args.ours_kib / args.raw_sql_kib:.3f}x now; at best "
              f"{(args.ours_kib - bound) / args.raw_sql_kib:.3f}x with every optional feature loaded lazily "
              f"(goal 1.1x: {1.1 * args.raw_sql_kib - args.ours_kib:+,.0f} KiB)")


if __name__ == "__main__":
    main()
