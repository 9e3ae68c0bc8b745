"""The example application (conf/websauna_tasks_example) and the newcomer's paths to run it.

- development.ini: eager mode on SQLite, in-process with WebTest;
- conf/example.ini: a real ws-celery worker and beat on the embedded SQLite broker;
- conf/production.ini: parsed, then run on the real Redis and PostgreSQL;
- scripts/run-example: the one command, started and stopped like a user would.

Every INI is copied into tmp_path before use: the files locate var/ with %(here)s,
so a copy puts the SQLite files (data and broker) in the test's own directory.
"""
from __future__ import annotations

import logging
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import urllib.parse
import urllib.request

import pytest
import webtest
from celery.schedules import crontab
from pyramid.paster import get_app, get_appsettings

from websauna_tasks.app import make_celery
from websauna_tasks.config import celery_config_from_settings
from websauna_tasks.dispatch import EagerTaskError
from websauna_tasks.testing import wait_for

ROOT = pathlib.Path(__file__).resolve().parent.parent
ROW = re.compile(r'<tr id="message-(\d+)" data-state="(\w+)">')
BEATS = re.compile(r'id="heartbeat" data-beats="(\d+)"')




def copy_ini(source: str, tmp_path: pathlib.Path, replace: dict[str, str] | None = None) -> str:
    """Copy an INI keeping its depth below tmp_path, so %(here)s/../var lands in tmp_path/var."""
    source_path = ROOT / source
    target = tmp_path / source_path.relative_to(ROOT)
    target.parent.mkdir(parents=True, exist_ok=True)
    text = source_path.read_text()
    for old, new in (replace or {}).items():
        assert old in text, f"{old!r} not in {source}"
        text = text.replace(old, new)
    target.write_text(text)
    return str(target)


def message_states(page: str) -> dict[int, str]:
    return {int(id_): state for id_, state in ROW.findall(page)}


def row_html(page: str, message_id: int) -> str:
    match = re.search(rf'<tr id="message-{message_id}".*?</tr>', page, re.DOTALL)
    assert match, page
    return match.group(0)


def task_ids(row: str) -> list[str]:
    return re.findall(r"<code>([^<]*)</code>", row)


def beats(page: str) -> int:
    return int(BEATS.search(page).group(1))


def post_message(app: webtest.TestApp, text: str) -> int:
    """Post the form; return the new message's id as the page lists it."""
    before = set(message_states(app.get("/").text))
    response = app.get("/").forms[0]
    response["text"] = text
    assert response.submit().status_int == 303
    new = set(message_states(app.get("/").text)) - before
    assert len(new) == 1, new
    return new.pop()


# -- development.ini: eager mode ------------------------------------------------------------

@pytest.fixture
def eager_app(tmp_path) -> webtest.TestApp:
    return webtest.TestApp(get_app(copy_ini("development.ini", tmp_path)))


def test_development_ini_runs_task_in_web_process_after_commit(eager_app, tmp_path):
    home = eager_app.get("/")
    assert "Eager mode" in home.text
    assert (tmp_path / "var" / "development.sqlite").exists()

    message_id = post_message(eager_app, "hello eager")

    # No worker anywhere: the task already ran when the redirect came back.
    page = eager_app.get("/").text
    assert message_states(page) == {message_id: "processed"}
    row = row_html(page, message_id)
    assert "HELLO EAGER" in row
    # route_url() inside the task uses websauna.site_url.
    assert f'href="http://127.0.0.1:6543/messages/{message_id}"' in row
    scheduled, seen = task_ids(row)
    assert scheduled and scheduled == seen
    detail = eager_app.get(f"/messages/{message_id}")
    assert "hello eager" in detail.text and "processed at" in detail.text


def test_development_ini_refuses_empty_message(eager_app):
    response = eager_app.post("/messages", {"text": "   "}, status=400)
    assert "Write a message first." in response.text
    assert message_states(eager_app.get("/").text) == {}
    eager_app.get("/messages/999", status=404)


def test_development_ini_failing_task_is_logged_with_traceback_and_raised(eager_app, caplog):
    caplog.set_level(logging.ERROR, logger="websauna_tasks")
    with pytest.raises(EagerTaskError, match="failed on purpose") as raised:
        eager_app.post("/fail")
    assert isinstance(raised.value.__cause__, RuntimeError)
    failures = [r for r in caplog.records if r.name.startswith("websauna_tasks") and r.levelno >= logging.ERROR]
    assert failures, caplog.text
    assert failures[0].exc_info is not None
    # The traceback reaches down into the task body.
    assert "in fail_on_purpose" in caplog.text
    # The web process is fine afterwards.
    assert eager_app.get("/").status_int == 200


# -- conf/example.ini: embedded broker, real worker and beat ----------------------------------

@pytest.mark.slow
def test_example_ini_real_worker_and_beat_on_sqlite(tmp_path, ws_celery_worker_factory):
    ini = copy_ini("conf/example.ini", tmp_path)
    app = webtest.TestApp(get_app(ini))
    worker = ws_celery_worker_factory(ini, "worker", "-c", "2", "-l", "info")
    beat = ws_celery_worker_factory(ini, "beat", "-l", "info", ready="beat: Starting...")
    assert "Tasks go through the broker <code>sqla+sqlite:" in app.get("/").text
    assert (tmp_path / "var" / "broker.sqlite").exists()

    message_id = post_message(app, "hello worker")
    page = wait_for(lambda: (p := app.get("/").text) and message_states(p)[message_id] == "processed" and p)
    row = row_html(page, message_id)
    assert "HELLO WORKER" in row
    assert f'href="http://127.0.0.1:6543/messages/{message_id}"' in row
    scheduled, seen = task_ids(row)
    assert scheduled and scheduled == seen
    assert scheduled in worker.output()

    # beat_schedule from the INI: every 5 s; the count comes from the worker running the task.
    page = wait_for(lambda: (p := app.get("/").text) and beats(p) >= 1 and p)
    heartbeat_task = re.search(r'id="heartbeat".*?<code>([^<]+)</code>', page, re.DOTALL).group(1)
    assert "Sending due task heartbeat (example.heartbeat)" in beat.output()
    assert heartbeat_task in worker.output()

    # In worker mode a failing task does not break the page; its traceback is in the worker log.
    assert app.post("/fail").status_int == 303
    wait_for(lambda: "RuntimeError: example.fail_on_purpose failed on purpose" in worker.output())
    assert worker.process.poll() is None and beat.process.poll() is None


# -- conf/production.ini: Redis and PostgreSQL ----------------------------------------------------

def test_production_ini_goes_through_the_safe_parser():
    settings = get_appsettings(str(ROOT / "conf/production.ini"))
    app = make_celery(celery_config_from_settings(settings))
    assert app.conf.broker_url.startswith("redis://")
    assert app.conf.task_acks_late is True
    assert app.conf.broker_transport_options == {"visibility_timeout": 3600}
    entry = app.conf.beat_schedule["heartbeat"]
    assert entry["task"] == "example.heartbeat"
    assert isinstance(entry["schedule"], crontab)  # the cron string was converted
    assert settings["sqlalchemy.isolation_level"] == "SERIALIZABLE"


@pytest.mark.slow
def test_production_ini_with_real_redis_postgresql_and_worker(tmp_path, redis_url, database_url, queue_name,
                                                              redis_client, ws_celery_worker_factory):
    ini = copy_ini("conf/production.ini", tmp_path, {
        "postgresql+psycopg://example@127.0.0.1:5432/example": database_url,
        # A private queue: other test runs share this Redis.
        '"broker_url": "redis://127.0.0.1:6379/3",':
            f'"broker_url": "{redis_url}", "task_default_queue": "{queue_name}",',
    })
    app = webtest.TestApp(get_app(ini))
    ws_celery_worker_factory(ini, "worker", "-c", "2", "-l", "info")
    message_id = post_message(app, "hello postgres")
    page = wait_for(lambda: (p := app.get("/").text) and message_states(p)[message_id] == "processed" and p)
    assert "HELLO POSTGRES" in row_html(page, message_id)
    assert f'href="https://example.com/messages/{message_id}"' in row_html(page, message_id)


# -- scripts/run-example: the one command ---------------------------------------------------------

def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def http_post(url: str, form: dict[str, str]) -> str:
    data = urllib.parse.urlencode(form).encode()
    with urllib.request.urlopen(url, data=data, timeout=10) as response:
        return response.read().decode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def processes_using(text: str) -> dict[int, int]:
    """{pid: parent pid} of the live processes whose command line contains ``text`` (Linux /proc)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = pathlib.Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            stat = pathlib.Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name in stat may contain spaces; the fields after ")" are fixed.
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if text in cmdline and state != "Z":
            found[int(entry)] = int(ppid)
    return found


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find the script's processes")
def test_run_example_serves_processes_and_stops_everything_on_ctrl_c(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ini = copy_ini("conf/example.ini", tmp_path, {
        "listen = 127.0.0.1:6543": f"listen = 127.0.0.1:{port}",
        "websauna.site_url = http://127.0.0.1:6543": f"websauna.site_url = {url}",
    })
    log_path = tmp_path / "run-example.log"
    with open(log_path, "wb") as log:
        script = subprocess.Popen([str(ROOT / "scripts/run-example"), ini], stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "EXAMPLE_URL": url})
    try:
        wait_for(lambda: f"open {url}" in log_path.read_text() or script.poll() is not None, timeout=120)
        assert script.poll() is None, log_path.read_text()
        before = set(message_states(http_get(url)))
        # urllib follows the 303 back to the page, as a browser does.
        after = message_states(http_post(f"{url}/messages", {"text": "hello script"}))
        (message_id,) = set(after) - before
        wait_for(lambda: message_states(http_get(url))[message_id] == "processed")

        family = processes_using(ini)
        family.pop(script.pid)  # the script's own command line names the INI too
        leaders = [pid for pid, parent in family.items() if parent == script.pid]
        assert len(leaders) == 3, family  # web, worker, beat
        assert len(family) == 5, family  # and the worker's two pool processes

        script.send_signal(signal.SIGINT)  # what Ctrl-C delivers
        assert script.wait(30) == 130
        output = log_path.read_text()
        assert "run-example: stopped" in output and "did not stop" not in output
        assert processes_using(ini) == {}
    finally:
        # Whatever failed above, leave nothing running: the script's own stop first.
        if script.poll() is None:
            script.terminate()
            try:
                script.wait(30)
            except subprocess.TimeoutExpired:
                script.kill()
        for pid in processes_using(ini):
            os.kill(pid, signal.SIGKILL)
