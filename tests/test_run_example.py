"""scripts/run-example as a newcomer meets it: the port setting, a taken port, when it says
"open", and how it stops.

The INI is a copy in tmp_path (its %(here)s/../var then lands in tmp_path/var), still with the
shipped ``listen = 127.0.0.1:6543``: the free port comes from EXAMPLE_PORT alone, so a server
that did not really move would not answer the test. tests/test_example.py runs the full tour of
the page through the script.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.process_tree import alive, command_line, descendants
from tests.servers import free_port
from websauna_tasks.testing import wait_for

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "scripts" / "run-example")

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads /proc to find the script's processes")


def example_ini(tmp_path: pathlib.Path) -> str:
    target = tmp_path / "conf" / "example.ini"
    target.parent.mkdir()
    shutil.copy2(ROOT / "conf" / "example.ini", target)
    assert "listen = 127.0.0.1:6543" in target.read_text()
    return str(target)


def script_env(**settings: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("EXAMPLE_PORT", "EXAMPLE_URL")}
    return {**env, **settings}


def test_taken_port_is_one_line_and_nothing_starts(tmp_path):
    ini = example_ini(tmp_path)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        began = time.monotonic()
        result = subprocess.run([SCRIPT, ini], env=script_env(EXAMPLE_PORT=str(port)), capture_output=True,
                                text=True, timeout=120)
    assert result.returncode == 3, result
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"run-example: port {port} on 127.0.0.1 is taken (another run-example or server?); "
        f"stop it, or run on another port: EXAMPLE_PORT={port + 1} scripts/run-example"], result.stderr
    # Refused before anything started: the example would have created its SQLite files.
    assert not (tmp_path / "var").exists()
    print(f"refused in {time.monotonic() - began:.1f} s")


@pytest.mark.parametrize("settings, message", [
    ({"EXAMPLE_PORT": "http"}, "run-example: EXAMPLE_PORT must be a port number, not 'http'"),
    ({"EXAMPLE_PORT": "70000"}, "run-example: EXAMPLE_PORT must be a port number from 1 to 65535, not 70000"),
    ({"EXAMPLE_URL": "http://127.0.0.1:7001", "EXAMPLE_PORT": "7002"},
     "run-example: EXAMPLE_URL (http://127.0.0.1:7001) and EXAMPLE_PORT (7002) name two ports: set one of them"),
])
def test_bad_port_settings_are_one_line(tmp_path, settings, message):
    result = subprocess.run([SCRIPT, example_ini(tmp_path)], env=script_env(**settings), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 3, result
    assert result.stderr.splitlines() == [message]


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


@pytest.mark.slow
@pytest.mark.integration(reason="the example's web server, worker and beat, on the SQLite broker")
def test_example_port_moves_the_server_ready_line_and_sigterm_stops_every_process(tmp_path):
    ini = example_ini(tmp_path)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "run-example.log"
    with open(log_path, "wb") as log:
        script = subprocess.Popen([SCRIPT, ini], env=script_env(EXAMPLE_PORT=str(port)), stdout=log,
                                  stderr=subprocess.STDOUT)
    family: set[int] = set()
    try:
        def output() -> str:
            return log_path.read_text(errors="replace")

        ready_line = f"run-example: the worker is ready: open {url}\n"
        final_line = f"run-example: open {url}  (worker and beat are running; Ctrl-C stops everything)\n"
        wait_for(lambda: final_line in output() or script.poll() is not None, timeout=180, describe=output)
        assert script.poll() is None, output()
        text = output()
        # Announced only once the worker consumes ("ready." is its last startup line), and again
        # below both banners: beat's start line comes before the second announcement.
        assert text.index("celery@") < text.index(" ready.\n") < text.index(ready_line), text
        assert text.index("beat: Starting...") < text.index(final_line), text
        assert text.count(f"open {url}") == 2
        # EXAMPLE_PORT really moved the server: the INI still says 6543.
        assert "Tasks go through the broker" in http_get(url)
        assert f"Serving on {url}" in text

        family = descendants(script.pid)
        commands = [command_line(pid) for pid in family]
        assert sum(f"example_web.py serve {ini}" in c for c in commands) == 1, commands
        assert sum(f"{ini} -- worker" in c for c in commands) == 3, commands  # and its two pool processes
        assert sum(f"{ini} -- beat" in c for c in commands) == 1, commands

        began = time.monotonic()
        script.send_signal(signal.SIGTERM)
        assert script.wait(30) == 143
        exited = time.monotonic() - began
        wait_for(lambda: not alive(family), timeout=10, describe=lambda: f"still running: {alive(family)}")
        print(f"run-example: script exited {exited:.2f} s after SIGTERM, "
              f"all {len(family)} processes gone after {time.monotonic() - began:.2f} s")
        assert "run-example: stopped" in output()
    finally:
        family |= descendants(script.pid) if script.poll() is None else set()
        if script.poll() is None:
            script.kill()
            script.wait(30)
        for pid in alive(family):
            os.kill(pid, signal.SIGKILL)
