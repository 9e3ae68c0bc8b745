"""What a plain worker holds in memory: no optional feature's modules, no load-time caches.

Every module a worker imports stays resident for its whole life (bench/growth.py --parts rss
compares its resident set with raw Celery's). Each check runs in a fresh interpreter, since
this test process has imported everything already.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

#: Modules of features that are off unless a setting (or a command) asks for them.
OPTIONAL = (
    "jinja2",
    "pyramid_jinja2",
    "prometheus_client",
    "alembic",
    "websauna_tasks.console",
    "websauna_tasks.health",
    "websauna_tasks.operator_commands",
    "websauna_tasks.observability.metrics",
)


def loaded_in_fresh_interpreter(code: str, subprocess_env: dict[str, str]) -> dict:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **subprocess_env})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def optional_loaded(modules: list[str]) -> list[str]:
    return sorted(name for name in modules if any(name == heavy or name.startswith(heavy + ".")
                                                  for heavy in OPTIONAL))


def test_importing_the_package_imports_no_optional_feature(subprocess_env):
    found = loaded_in_fresh_interpreter(
        "import json, sys\nimport websauna_tasks\nprint(json.dumps({'modules': sorted(sys.modules)}))",
        subprocess_env)
    assert optional_loaded(found["modules"]) == []
    # Tracing is on by default when opentelemetry-api is installed, but only once the app is built.
    assert "websauna_tasks.observability.tracing" not in found["modules"]


WORKER = """
import json, linecache, sys
from websauna_tasks import cli

def instead_of_celery(app, celery_args):
    files = [name for name in linecache.cache if not name.startswith("<")]
    print(json.dumps({"modules": sorted(sys.modules), "cached_files": files, "args": celery_args}))
    return 0

cli.run_celery = instead_of_celery
sys.exit(cli.main([sys.argv[1], "--", "worker", "-P", "solo"]))
"""


def test_a_plain_worker_imports_no_optional_feature_and_keeps_no_source_lines(subprocess_env, tmp_path):
    ini = tmp_path / "worker.ini"
    ini.write_text("[app:main]\nuse = call:tests.apps.testapp:main\n"
                   "websauna.celery_config = {'broker_url': 'memory://', 'task_default_queue': 'imports'}\n")
    found = loaded_in_fresh_interpreter(WORKER.replace("sys.argv[1]", repr(str(ini))), subprocess_env)
    assert found["args"] == ["worker", "-P", "solo"]
    assert "tests.apps.sample_tasks" in found["modules"]  # the application was loaded
    assert optional_loaded(found["modules"]) == []
    # Pyramid's and venusian's source lines of the configuration, useless once it is done.
    assert found["cached_files"] == []


@pytest.mark.parametrize("url, unused", [
    ("postgresql+psycopg://root@127.0.0.1:5432/test", "sqlalchemy.dialects.sqlite"),
    ("sqlite:///{tmp}/worker.sqlite", "sqlalchemy.dialects.postgresql"),
], ids=["postgresql", "sqlite"])
def test_a_worker_loads_only_its_databases_dialect(url, unused, subprocess_env, tmp_path):
    # Loading the application opens no connection: the engine's dialect is loaded, the other one must not be
    # (schema.py's partial index used to validate options of both: 2.4 MB for PostgreSQL's, 0.6 MB for SQLite's).
    ini = tmp_path / "worker.ini"
    ini.write_text("[app:main]\nuse = call:tests.apps.testapp:main\n"
                   f"sqlalchemy.url = {url.format(tmp=tmp_path)}\n"
                   "websauna.celery_config = {'broker_url': 'memory://', 'task_default_queue': 'imports'}\n")
    found = loaded_in_fresh_interpreter(WORKER.replace("sys.argv[1]", repr(str(ini))), subprocess_env)
    used = url.split(":", 1)[0].split("+", 1)[0]
    assert f"sqlalchemy.dialects.{used}" in found["modules"]  # the engine was made
    assert unused not in found["modules"]


def test_celery_processes_are_never_our_commands():
    from websauna_tasks import cli

    assert not cli.CELERY_PROCESSES & set(cli.own_commands())
    assert cli.own_command("outbox-relay") is cli.outbox_relay
    assert cli.own_command("worker") is None


# Runs ws-celery's worker command up to the worker's start: the command line, the app and the
# WorkController built from them, then reports instead of consuming.
STARTED_WORKER = """
import json, sys
import click
import celery.worker.worker as work
from websauna_tasks import cli

def instead_of_consuming(self):
    print(json.dumps({"modules": sorted(sys.modules), "pool": self.pool_cls.__module__, "hostname": self.hostname,
                      "prefetch": self.prefetch_multiplier, "probe": self.options.get("probe_option")}))
    self.exitcode = 3

work.WorkController.start = instead_of_consuming


def instead_of_beating(self):
    print(json.dumps({"modules": sorted(sys.modules), "schedule": self.schedule}))
    return 4


import celery.apps.beat
celery.apps.beat.Beat.run = instead_of_beating
real_run_celery = cli.run_celery

def with_a_user_option(app, celery_args):
    # Celery's way for an application to add its own worker options (and, for every command, preload ones).
    app.user_options["worker"].add(click.Option(["--probe-option"], default=None))
    if "--preload-probe" in celery_args:
        app.user_options["preload"].add(click.Option(["--preload-probe"], default=None))
    return real_run_celery(app, celery_args)

cli.run_celery = with_a_user_option
sys.exit(cli.main([sys.argv[1], "--", *json.loads(sys.argv[2])]))
"""


def start_worker(tmp_path, subprocess_env, args: list[str]) -> tuple[int, dict]:
    ini = tmp_path / "worker.ini"
    ini.write_text("[app:main]\nuse = call:tests.apps.testapp:main\n"
                   "websauna.celery_config = {'broker_url': 'memory://', 'task_default_queue': 'imports'}\n")
    done = subprocess.run([sys.executable, "-c", STARTED_WORKER, str(ini), json.dumps(args)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **subprocess_env})
    return done.returncode, json.loads(done.stdout.strip().splitlines()[-1])


def test_a_worker_starts_without_celerys_command_line_group_and_its_plugins(subprocess_env, tmp_path):
    # celery.bin.celery imports every Celery subcommand (amqp: click_repl, prompt_toolkit) and every
    # celery.commands plugin (Flower, installed by the test extra): 13 MB a worker process never runs.
    status, found = start_worker(tmp_path, subprocess_env,
                                 ["worker", "-P", "solo", "-n", "probe@here", "--prefetch-multiplier", "5",
                                  "--probe-option", "given"])
    assert status == 3  # the worker's own exit code, as Celery's command line returns it
    for module in ("celery.bin.celery", "flower", "prompt_toolkit", "click_repl"):
        assert module not in found["modules"], module
    # Celery's options, and the application's own, reached the worker.
    assert found["pool"] == "celery.concurrency.solo"
    assert found["hostname"] == "probe@here"
    assert found["prefetch"] == 5
    assert found["probe"] == "given"


def test_a_worker_after_a_global_option_goes_through_celerys_command_line(subprocess_env, tmp_path):
    # Options of Celery's group (before the subcommand) are the group's to read: the whole command line runs.
    status, found = start_worker(tmp_path, subprocess_env, ["--quiet", "worker", "-P", "solo", "--probe-option", "x"])
    assert status == 3  # the worker's exit code here too (Celery.start() returns None for it)
    assert "celery.bin.celery" in found["modules"]
    assert found["pool"] == "celery.concurrency.solo"
    assert found["probe"] == "x"


def test_an_app_with_preload_options_keeps_celerys_command_line(subprocess_env, tmp_path):
    # Celery's group takes preload options off every command's arguments: only it can run them.
    status, found = start_worker(tmp_path, subprocess_env, ["worker", "-P", "solo", "--preload-probe", "p"])
    assert status == 3
    assert "celery.bin.celery" in found["modules"]
    assert found["pool"] == "celery.concurrency.solo"


def test_beat_starts_without_celerys_command_line_group(subprocess_env, tmp_path):
    schedule = str(tmp_path / "beat-schedule")
    status, found = start_worker(tmp_path, subprocess_env, ["beat", "-s", schedule])
    assert status == 4  # what beat's command returned
    assert found["schedule"] == schedule  # its option reached it
    for module in ("celery.bin.celery", "flower", "prompt_toolkit"):
        assert module not in found["modules"], module
