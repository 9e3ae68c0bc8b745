"""The example application (conf/websauna_tasks_example) and the newcomer's paths to run it.

- development.ini: eager mode on SQLite, in-process with WebTest (results stored with
  task_store_eager_result, defer() running right after the commit);
- conf/example.ini: a real ws-celery worker and beat on the embedded SQLite broker and result
  backend (on-commit task, defer() with _name, /tasks/{id}, the INI's periodic task and the one
  declared in code, run_after_response);
- conf/production.ini: parsed, then run on the real Redis and PostgreSQL;
- scripts/run-example: the one command, started and stopped like a user would.

Every INI is copied into tmp_path before use: the files locate var/ with %(here)s,
so a copy puts the SQLite files (data and broker) in the test's own directory.
"""
from __future__ import annotations

import html
import json
import logging
import os
import pathlib
import re
import signal
import subprocess
import sys
import typing as t
import urllib.parse
import urllib.request

import pytest
import sqlalchemy
import webtest
from celery.schedules import crontab
from pyramid.paster import get_app, get_appsettings

from tests.servers import free_port
from websauna_tasks.app import make_celery
from websauna_tasks.config import celery_config_from_settings
from websauna_tasks.dispatch import EagerTaskError
from websauna_tasks.testing import wait_for

ROOT = pathlib.Path(__file__).resolve().parent.parent
ROW = re.compile(r'<tr id="message-(\d+)" data-state="(\w+)">')
BEATS = re.compile(r'id="heartbeat" data-beats="(\d+)"')
STATS_RUNS = re.compile(r'id="message-stats" data-runs="(\d+)"')
AFTER_RESPONSE = re.compile(r'id="after-response" data-count="(\d+)"')
WORD_COUNT = re.compile(r'class="word-count" data-words="(\d+)" data-runs="(\d+)"')
WORD_REQUEST = re.compile(r'class="word-request" data-task-id="([^"]+)" data-reused="([01])"')



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
    """The ids in the row's task id column: scheduled by the view, seen by the task."""
    cell = re.search(r'<td class="task-ids">(.*?)</td>', row, re.DOTALL).group(1)
    return re.findall(r"<code>([^<]*)</code>", cell)


def beats(page: str) -> int:
    return int(BEATS.search(page).group(1))


def stats_runs(page: str) -> int:
    return int(STATS_RUNS.search(page).group(1))


def after_response_count(page: str) -> int:
    return int(AFTER_RESPONSE.search(page).group(1))


def word_count(page: str, message_id: int) -> tuple[int, int] | None:
    """(words, runs) the deferred count_words() stored for the message, None before it ran."""
    match = WORD_COUNT.search(row_html(page, message_id))
    return (int(match.group(1)), int(match.group(2))) if match else None


def word_requests(page: str, message_id: int) -> list[tuple[str, bool]]:
    """(task id, reused) of each click on the message's "Count the words", oldest first."""
    return [(task_id, reused == "1") for task_id, reused in WORD_REQUEST.findall(row_html(page, message_id))]


def task_state(page: str) -> str:
    return re.search(r'<p id="state" data-state="(\w*)"', page).group(1)


def task_value(page: str) -> object:
    """The return value on a /tasks/{id} page (shown as JSON)."""
    return json.loads(html.unescape(re.search(r'<pre id="value">(.*?)</pre>', page, re.DOTALL).group(1)))


def task_page_when_ready(get: t.Callable[[str], str], task_id: str, timeout: float = 30) -> str:
    """/tasks/{id} once the task has run (SUCCESS or FAILURE)."""
    return wait_for(lambda: (p := get(f"/tasks/{task_id}")) and task_state(p) in ("SUCCESS", "FAILURE") and p,
                    timeout=timeout)


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


def eager_get(app: webtest.TestApp) -> t.Callable[[str], str]:
    return lambda path: app.get(path).text


def test_development_ini_runs_task_in_web_process_after_commit(eager_app, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="websauna_tasks_example")
    home = eager_app.get("/")
    assert "Eager mode" in home.text
    assert (tmp_path / "var" / "development.sqlite").exists()
    assert after_response_count(home.text) == 0

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

    # run_after_response: the POST's callback ran once its response (the redirect) was sent.
    assert after_response_count(page) == 1
    assert f"response sent for message {message_id}</li>" in page
    assert f"response sent for message {message_id}" in caplog.messages

    # Results in eager mode: task_store_eager_result puts them in the result backend.
    assert "task_store_eager_result" in (ROOT / "development.ini").read_text()
    task = eager_app.get(f"/tasks/{scheduled}").text
    assert "development-results.sqlite" in task
    assert task_state(task) == "SUCCESS"
    assert task_value(task) == "HELLO EAGER"
    assert "<code>example.process_message</code>" in task
    assert task_state(eager_app.get("/tasks/no-such-task").text) == "PENDING"


def test_development_ini_defer_runs_at_once_after_commit(eager_app):
    message_id = post_message(eager_app, "count  these four words")
    page = eager_app.get("/").text
    assert word_count(page, message_id) is None
    assert "Count the words</button>" in page  # no countdown in eager mode

    assert eager_app.post(f"/messages/{message_id}/words").status_int == 303
    page = eager_app.get("/").text
    assert word_count(page, message_id) == (4, 1)
    [(first, reused)] = word_requests(page, message_id)
    assert not reused
    task = eager_app.get(f"/tasks/{first}").text
    assert task_state(task) == "SUCCESS" and task_value(task) == 4
    assert "<code>websauna_tasks.deferred</code>" in task

    # The first task has already run (eagerly, after the commit) and freed its name:
    # a second click sends a new task. With a worker it would still be pending (see below).
    eager_app.post(f"/messages/{message_id}/words")
    page = eager_app.get("/").text
    assert word_count(page, message_id) == (4, 2)
    [_, (second, reused)] = word_requests(page, message_id)
    assert second != first and not reused

    eager_app.post("/messages/999/words", status=404)


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

    def get(path: str) -> str:
        return app.get(path).text

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

    # The message's task page: state and return value from the SQLite result backend.
    task = task_page_when_ready(get, scheduled)
    assert "results.sqlite" in task and (tmp_path / "var" / "results.sqlite").exists()
    assert task_state(task) == "SUCCESS" and task_value(task) == "HELLO WORKER"
    assert "<code>example.process_message</code>" in task
    heartbeat_page = task_page_when_ready(get, heartbeat_task)
    assert task_state(heartbeat_page) == "SUCCESS" and isinstance(task_value(heartbeat_page), int)

    # run_after_response ran in this (web) process after the POST's response.
    assert after_response_count(page) == 1
    assert f"response sent for message {message_id}</li>" in page

    # example.count_messages: @task(periodic=timedelta(seconds=10)) in tasks.py, in no INI.
    assert set(celery_config_from_settings(get_appsettings(ini))["beat_schedule"]) == {"heartbeat"}
    page = wait_for(lambda: (p := get("/")) and stats_runs(p) >= 1 and p)
    assert "Sending due task example.count_messages (example.count_messages)" in beat.output()
    figures = re.search(r'id="stats-figures" data-messages="(\d+)" data-processed="(\d+)"', page).groups()
    assert figures == ("1", "1")
    stats_task = re.search(r'id="message-stats".*?<code>([^<]+)</code>', page, re.DOTALL).group(1)
    assert stats_task in worker.output()
    # An async def body: its result is the coroutine's return value.
    stats_page = task_page_when_ready(get, stats_task)
    assert task_state(stats_page) == "SUCCESS"
    assert task_value(stats_page) == {"messages": 1, "processed": 1}

    # In worker mode a failing task does not break the page; its traceback is in the worker log,
    # and the browser is sent to the task's page, which shows the error once the worker ran it.
    response = app.post("/fail")
    assert response.status_int == 303
    failed_id = re.fullmatch(r"http://localhost/tasks/([\w-]+)", response.location).group(1)
    wait_for(lambda: "RuntimeError: example.fail_on_purpose failed on purpose" in worker.output())
    failed = task_page_when_ready(get, failed_id)
    assert task_state(failed) == "FAILURE"
    assert "RuntimeError(&#x27;example.fail_on_purpose failed on purpose&#x27;)" in failed
    assert "in fail_on_purpose" in failed  # the traceback
    assert worker.process.poll() is None and beat.process.poll() is None


def deferred_runs(worker_log: str) -> list[str]:
    """Ids of the websauna_tasks.deferred tasks the worker received."""
    return re.findall(r"Task websauna_tasks\.deferred\[([\w-]+)\] received", worker_log)


@pytest.mark.slow
def test_example_ini_defer_with_name_sends_one_task_for_two_clicks(tmp_path, ws_celery_worker_factory):
    ini = copy_ini("conf/example.ini", tmp_path)
    app = webtest.TestApp(get_app(ini))
    worker = ws_celery_worker_factory(ini, "worker", "-c", "2", "-l", "info")

    def get(path: str) -> str:
        return app.get(path).text

    message_id = post_message(app, "one two three")
    assert "Count the words in 3 s" in get("/")

    # A double click: the first task waits 3 s (_countdown), so it is still pending at the second.
    assert app.post(f"/messages/{message_id}/words").status_int == 303
    assert app.post(f"/messages/{message_id}/words").status_int == 303
    page = get("/")
    [(first, first_reused), (second, second_reused)] = word_requests(page, message_id)
    assert second == first and not first_reused and second_reused
    assert "reused task</strong>" in row_html(page, message_id)
    assert word_count(page, message_id) is None  # not before the countdown

    page = wait_for(lambda: (p := get("/")) and word_count(p, message_id) and p)
    assert word_count(page, message_id) == (3, 1)
    task = task_page_when_ready(get, first)
    assert task_state(task) == "SUCCESS" and task_value(task) == 3
    assert "<code>websauna_tasks.deferred</code>" in task
    assert "counted 3 words in message" in worker.output()

    # Once it has run the name is free: a third click sends a new task.
    app.post(f"/messages/{message_id}/words")
    [*_, (third, third_reused)] = word_requests(get("/"), message_id)
    assert third != first and not third_reused
    wait_for(lambda: word_count(get("/"), message_id) == (3, 2))
    # By now a duplicate of the double click would have run too: one task per pending name.
    assert deferred_runs(worker.output()) == [first, third]
    assert word_count(get("/"), message_id) == (3, 2)


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
    assert settings["websauna_tasks.outbox"] == "true"
    assert app.conf.result_backend == "redis://127.0.0.1:6379/4"
    assert app.conf.result_expires == 86400


@pytest.mark.slow
def test_production_ini_with_real_redis_postgresql_and_worker(tmp_path, redis_url, database_url, queue_name,
                                                              redis_client, ws_celery_worker_factory, run_cli):
    ini = copy_ini("conf/production.ini", tmp_path, {
        "db_url = postgresql+psycopg://example@127.0.0.1:5432/example": f"db_url = {database_url}",
        "broker_url = redis://127.0.0.1:6379/3": f"broker_url = {redis_url}",
        "result_url = redis://127.0.0.1:6379/4": f"result_url = {redis_url}",
        # A private queue: other test runs share this Redis.
        "websauna_tasks.outbox = true": f"websauna_tasks.outbox = true\ncelery.task_default_queue = {queue_name}",
        '"result_expires": 24 * 60 * 60,': '"result_expires": 600,',
    })
    # websauna_tasks.create_tables = never: the tables come from init, as in a deploy.
    made = run_cli(ini, "init")
    assert made.returncode == 0, made.stdout + made.stderr
    app = webtest.TestApp(get_app(ini))
    ws_celery_worker_factory(ini, "worker", "-c", "2", "-l", "info")
    message_id = post_message(app, "hello postgres")
    page = wait_for(lambda: (p := app.get("/").text) and message_states(p)[message_id] == "processed" and p)
    assert "HELLO POSTGRES" in row_html(page, message_id)
    assert f'href="https://example.com/messages/{message_id}"' in row_html(page, message_id)
    # The result is in Redis.
    scheduled, _ = task_ids(row_html(page, message_id))
    task = task_page_when_ready(lambda path: app.get(path).text, scheduled)
    assert "result backend: <code>redis://" in task
    assert task_state(task) == "SUCCESS" and task_value(task) == "HELLO POSTGRES"
    assert redis_client.exists(f"celery-task-meta-{scheduled}")
    # It travelled through the outbox: the row of that id, marked sent.
    engine = sqlalchemy.create_engine(database_url)
    try:
        with engine.connect() as conn:
            sent_at = conn.execute(sqlalchemy.text("SELECT sent_at FROM websauna_tasks_outbox WHERE id = :id"),
                                   {"id": scheduled}).scalar_one()
        assert sent_at is not None
    finally:
        engine.dispose()


# -- scripts/run-example: the one command ---------------------------------------------------------

def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def http_post(url: str, form: dict[str, str]) -> str:
    data = urllib.parse.urlencode(form).encode()
    with urllib.request.urlopen(url, data=data, timeout=10) as response:
        return response.read().decode()


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
@pytest.mark.integration(reason="the example's web, worker and beat processes: too slow for the unit tier")
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
        page = wait_for(lambda: (p := http_get(url)) and message_states(p)[message_id] == "processed" and p)
        # The result page, through waitress.
        scheduled, _ = task_ids(row_html(page, message_id))
        task = task_page_when_ready(lambda path: http_get(url + path), scheduled)
        assert task_value(task) == "HELLO SCRIPT"
        # run_after_response ran in the web server after waitress had sent the redirect.
        assert f"[websauna_tasks_example.views] response sent for message {message_id}" in log_path.read_text()
        assert after_response_count(page) == 1
        # defer() through the web server to the worker.
        http_post(f"{url}/messages/{message_id}/words", {})
        wait_for(lambda: word_count(http_get(url), message_id) == (2, 1))

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
