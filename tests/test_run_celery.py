"""README's local-development recipe, ``./run-celery.bash INI``, run as the README writes it.

The command is read from README.md, so a README that names an INI the script refuses (or a
script that stops working with the README's INI) fails here. It runs in a copy of the checkout's
layout in tmp_path: run-celery.bash and the INI side by side as in the checkout, ws-celery from
the project's .venv on PATH, so the SQLite broker lands in the test's own var/.
"""
from __future__ import annotations

import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.process_tree import alive, command_line, descendants
from websauna_tasks.testing import wait_for

ROOT = pathlib.Path(__file__).resolve().parent.parent


def readme_recipe() -> list[str]:
    """The README's ``./run-celery.bash ...`` line, as words, without its comment."""
    lines = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("./run-celery.bash ")]
    assert len(lines) == 1, lines
    return shlex.split(lines[0], comments=True)


def lay_out(tmp_path: pathlib.Path, ini: str) -> dict[str, str]:
    """Copy run-celery.bash and ``ini`` into tmp_path at their checkout paths; the environment to run them."""
    shutil.copy2(ROOT / "run-celery.bash", tmp_path / "run-celery.bash")
    target = tmp_path / ini
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ROOT / ini, target)
    # No .venv next to the copy: the script finds ws-celery on PATH, as for an installed package.
    return {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.slow
@pytest.mark.integration(reason="a real worker and beat on the example's SQLite broker")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find the script's processes")
def test_readme_recipe_runs_worker_and_beat_that_share_a_broker(tmp_path):
    command = readme_recipe()
    assert command[0] == "./run-celery.bash" and len(command) == 2, command
    ini = command[1]
    env = lay_out(tmp_path, ini)
    family: set[int] = set()
    log_path = tmp_path / "run-celery.log"
    with open(log_path, "wb") as log:
        script = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        def output() -> str:
            return log_path.read_text(errors="replace")

        # Beat sends the INI's heartbeat, and the worker, another process, receives and runs it:
        # what a memory:// or eager INI can never show.
        received = wait_for(lambda: re.search(r"Task example\.heartbeat\[([\w-]+)\] received", output())
                            or script.poll() is not None, timeout=120, describe=output)
        assert script.poll() is None, output()
        task_id = received.group(1)
        assert "Sending due task heartbeat (example.heartbeat)" in output()
        wait_for(lambda: re.search(rf"Task example\.heartbeat\[{task_id}\] succeeded", output()),
                 timeout=60, describe=output)
        assert (tmp_path / "var" / "broker.sqlite").exists()

        family = descendants(script.pid)
        commands = [command_line(pid) for pid in family]
        assert sum(f"{ini} -- worker" in c for c in commands) >= 2, commands  # the worker and its pool
        assert sum(f"{ini} -- beat" in c for c in commands) == 1, commands

        began = time.monotonic()
        script.send_signal(signal.SIGTERM)
        assert script.wait(60) == 143
        wait_for(lambda: not alive(family), timeout=30, describe=lambda: f"left running: {alive(family)}")
        print(f"run-celery.bash stopped worker and beat in {time.monotonic() - began:.1f} s")
    finally:
        family = descendants(script.pid) if script.poll() is None else family
        if script.poll() is None:
            script.kill()
            script.wait(30)
        for pid in alive(family):
            os.kill(pid, signal.SIGKILL)


def test_run_celery_refuses_an_ini_without_a_shared_broker(tmp_path):
    env = lay_out(tmp_path, "development.ini")
    began = time.monotonic()
    result = subprocess.run(["./run-celery.bash", "development.ini"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result
    assert result.stdout == ""
    # One line that names the INI, the reason and what to use instead; nothing was started.
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("run-celery: development.ini runs tasks eagerly in the web process"), \
        result.stderr
    assert "give an INI with a real broker" in result.stderr
    assert not (tmp_path / "var").exists()
    print(f"refused in {time.monotonic() - began:.1f} s")


def test_run_celery_refuses_a_memory_broker(tmp_path):
    ini = tmp_path / "memory.ini"
    ini.write_text("[app:main]\nuse = egg:websauna_tasks_example\nsqlalchemy.url = sqlite://\n"
                   "websauna.celery_config = {\"broker_url\": \"memory://localhost/\"}\n")
    shutil.copy2(ROOT / "run-celery.bash", tmp_path / "run-celery.bash")
    env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["./run-celery.bash", "memory.ini"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result
    assert result.stderr.count("\n") == 1, result.stderr
    assert "memory.ini has the in-process broker memory://localhost/" in result.stderr
