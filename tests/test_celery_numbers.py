"""Celery's numeric settings and worker options that Celery takes without a word and fails on later.

A negative prefetch multiplier makes a worker that never consumes; a word in it, or in the Redis
visibility timeout, a traceback at start; a NaN visibility timeout a worker that stops on Redis'
reply. Each is refused at start (ConfigurationError naming the setting) or, given on the worker's
command line, in one line with status 2 before Celery starts.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pyramid.exceptions import ConfigurationError

from websauna_tasks.settings import parse_settings


def celery_config(**flat: str) -> dict:
    return dict(parse_settings({f"celery.{name}": value for name, value in flat.items()}).celery_config)


@pytest.mark.parametrize("name, value, fragment", [
    ("worker_prefetch_multiplier", "-5", "must be 0 (no limit), or 1 to"),
    ("worker_prefetch_multiplier", "abc", "expected a whole number"),
    ("worker_prefetch_multiplier", "1.5", "expected a whole number"),
    ("worker_prefetch_multiplier", "true", "expected a whole number"),
    ("worker_prefetch_multiplier", "[4]", "expected a whole number"),
    ("worker_concurrency", "-2", "must be 0 (one per CPU), or 1 to"),
    ("worker_max_tasks_per_child", "-1", "must be 0 (no limit)"),
    ("worker_max_memory_per_child", "1e400", "expected a finite number"),
    ("task_time_limit", "-1", "must be 0 (no limit), or 0.001 to"),
    ("task_soft_time_limit", "nan", "expected a finite number"),
    ("visibility_timeout", "inf", "expected a finite number"),
    ("visibility_timeout", "0", "must be 1 to"),
    ("broker_transport_options", '{"visibility_timeout": NaN}', "expected a finite number"),
    ("broker_transport_options", '{"visibility_timeout": "x"}', "expected a number"),
    ("broker_transport_options", '{"visibility_timeout": -5}', "must be 1 to"),
    ("result_backend_transport_options", '{"visibility_timeout": 1e999}', "expected a finite number"),
])
def test_a_wrong_celery_number_is_refused_at_start_naming_the_setting(name, value, fragment):
    with pytest.raises(ConfigurationError) as refused:
        celery_config(**{name: value})
    message = str(refused.value)
    assert f"Celery setting {name}" in message
    assert fragment in message


def test_the_dict_form_is_checked_as_the_flat_one():
    with pytest.raises(ConfigurationError, match="Celery setting worker_prefetch_multiplier: must be"):
        parse_settings({"websauna.celery_config": "{'worker_prefetch_multiplier': -1}"})
    with pytest.raises(ConfigurationError, match=r"broker_transport_options\['visibility_timeout'\]"):
        parse_settings({"websauna.celery_config": "{'broker_transport_options': {'visibility_timeout': 'soon'}}"})


def test_good_numbers_pass_as_numbers_and_other_options_are_kept():
    config = celery_config(worker_prefetch_multiplier="0", worker_concurrency="4", task_time_limit="30.5",
                           worker_max_memory_per_child="200000", visibility_timeout="7200",
                           broker_transport_options='{"visibility_timeout": 7200, "fanout_prefix": true}')
    assert config["worker_prefetch_multiplier"] == 0 and isinstance(config["worker_prefetch_multiplier"], int)
    assert config["worker_concurrency"] == 4
    assert config["task_time_limit"] == 30.5
    assert config["worker_max_memory_per_child"] == 200000
    assert config["visibility_timeout"] == 7200
    assert config["broker_transport_options"] == {"visibility_timeout": 7200, "fanout_prefix": True}
    # None keeps Celery's default; a setting not given is not added.
    assert celery_config(task_time_limit="none")["task_time_limit"] is None
    assert "worker_concurrency" not in celery_config(task_default_queue="q")


@pytest.mark.parametrize("args, fragment", [
    (["--prefetch-multiplier", "-5"], "--prefetch-multiplier: must be 0 (no limit)"),
    (["--time-limit", "nan"], "--time-limit: expected a finite number"),
    (["--soft-time-limit=-1"], "--soft-time-limit: must be 0 (no limit)"),
    (["--max-tasks-per-child", "-3"], "--max-tasks-per-child: must be 0 (no limit)"),
    # Celery's worker detaches by exec'ing "python -m celery", which cannot read the INI: it used to exit 0
    # and leave nothing running.
    (["--detach"], "worker --detach is not supported"),
    (["-D", "--logfile", "worker.log"], "worker --detach is not supported"),
])
def test_a_wrong_worker_option_is_one_line_before_celery_starts(args, fragment, subprocess_env, tmp_path):
    """The options that set those numbers, and --detach, which would start nothing."""
    ini = tmp_path / "worker.ini"
    ini.write_text("[app:main]\nuse = call:tests.apps.testapp:main\n"
                   "websauna.celery_config = {'broker_url': 'memory://', 'task_default_queue': 'numbers'}\n")
    done = subprocess.run([sys.executable, "-m", "websauna_tasks.cli", str(ini), "--", "worker", "-P", "solo", *args],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **subprocess_env})
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    lines = [line for line in done.stderr.splitlines() if line.startswith("ws-celery: ")]
    assert len(lines) == 1 and fragment in lines[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "celery@" not in done.stdout + done.stderr  # no worker banner: Celery never started
