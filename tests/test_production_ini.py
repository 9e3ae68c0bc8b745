"""conf/production.ini as shipped, on this machine: PasteDeploy variables on the command line, no edits.

The test makes a PostgreSQL database of its own (dropped afterwards) and uses a Redis database
number of its own, then runs ``ws-celery conf/production.ini VARS -- init`` (when the INI asks for
its tables to be made beforehand), ``pserve conf/production.ini VARS`` and a real
``ws-celery conf/production.ini VARS -- worker``: a message posted to the web app is processed by
the worker through the task sent on commit.
"""
from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
import uuid

import pytest
import redis
import sqlalchemy
from sqlalchemy import text

from tests.servers import free_port
from websauna_tasks.testing import wait_for

ROOT = pathlib.Path(__file__).resolve().parent.parent
PRODUCTION_INI = str(ROOT / "conf" / "production.ini")
BIN = pathlib.Path(sys.executable).parent
#: Redis database of this test: the INI's default queue name ("celery") stays out of the other tests' db.
REDIS_DB = 13
ROW = re.compile(r'<tr id="message-(\d+)" data-state="(\w+)">')


class Service:
    """A process of the test's own, in its own session, output in a log file; stopped by its PID."""

    def __init__(self, argv: list[str], log_path: pathlib.Path, cwd: pathlib.Path):
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd,
                                        start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self._log.close()


@pytest.fixture
def services(tmp_path):
    started: list[Service] = []

    def start(name: str, argv: list[str]) -> Service:
        service = Service(argv, tmp_path / f"{name}.log", tmp_path)
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()


@pytest.fixture
def own_database(database_url):
    """A database of the test's own on the machine's PostgreSQL: its URL; dropped afterwards."""
    name = f"ws_production_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(database_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield sqlalchemy.make_url(database_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def own_redis(redis_url):
    """The machine's Redis, database REDIS_DB; what Celery left there is deleted afterwards."""
    url = str(sqlalchemy.make_url(redis_url).set(database=str(REDIS_DB)))
    client = redis.Redis.from_url(url)
    patterns = ("celery", "unacked*", "_kombu.*", "celery-task-meta-*", "websauna_tasks*")

    def clean() -> None:
        for pattern in patterns:
            for key in client.scan_iter(match=pattern):
                client.delete(key)

    clean()
    yield url
    clean()
    client.close()


def variables(db_url: str, redis_url: str, **more: str) -> list[str]:
    return [f"db_url={db_url}", f"broker_url={redis_url}", f"result_url={redis_url}",
            *(f"{name}={value}" for name, value in more.items())]


def http(url: str, form: dict[str, str] | None = None) -> str:
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    with urllib.request.urlopen(url, data=data, timeout=10) as response:
        return response.read().decode()


def answers(url: str) -> bool:
    try:
        http(url)
    except OSError:
        return False
    return True


@pytest.mark.slow
def test_production_ini_runs_with_variables_against_this_machines_services(own_database, own_redis, services,
                                                                            tmp_path):
    port = free_port()
    schedule = tmp_path / "beat" / "schedule"
    given = variables(own_database, own_redis, listen=f"127.0.0.1:{port}", beat_schedule=str(schedule))
    if "websauna_tasks.create_tables = never" in pathlib.Path(PRODUCTION_INI).read_text():
        made = subprocess.run([str(BIN / "ws-celery"), PRODUCTION_INI, *given, "--", "init"], capture_output=True,
                              text=True, timeout=120, cwd=tmp_path)
        assert made.returncode == 0, made.stdout + made.stderr

    web = services("web", [str(BIN / "pserve"), PRODUCTION_INI, *given])
    worker = services("worker", [str(BIN / "ws-celery"), PRODUCTION_INI, *given, "--", "worker", "-c", "1", "-l",
                                 "info", "--without-gossip", "--without-mingle"])
    beat = services("beat", [str(BIN / "ws-celery"), PRODUCTION_INI, *given, "--", "beat", "-l", "info"])
    site = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: answers(site + "/") or web.process.poll() is not None, timeout=60)
        assert web.process.poll() is None, web.output()
        wait_for(lambda: "ready." in worker.output() or worker.process.poll() is not None, timeout=60)
        assert worker.process.poll() is None, worker.output()
    except AssertionError:
        raise AssertionError(f"web:\n{web.output()[-3000:]}\nworker:\n{worker.output()[-3000:]}") from None
    # The worker and beat took the Redis database and schedule file given on the command line.
    assert f"/{REDIS_DB}" in worker.output()
    wait_for(lambda: list(schedule.parent.glob("schedule*")) or beat.process.poll() is not None, timeout=30)
    assert beat.process.poll() is None, beat.output()

    page = http(site + "/messages", {"text": "hello production"})  # 303 to the home page
    rows = ROW.findall(page)
    assert len(rows) == 1, page  # a database of its own: the only message
    message_id = rows[0][0]

    def processed() -> bool:
        return dict(ROW.findall(http(site + "/"))).get(message_id) == "processed"

    try:
        wait_for(processed, timeout=60)
    except AssertionError:
        raise AssertionError(f"message {message_id} not processed:\n{worker.output()[-4000:]}") from None
    assert "HELLO PRODUCTION" in http(site + "/")
    # In this test's database, through the outbox.
    engine = sqlalchemy.create_engine(own_database)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM websauna_tasks_outbox WHERE sent_at IS NOT NULL")
                                ).scalar_one() >= 1
    finally:
        engine.dispose()


def test_a_missing_role_is_one_line_for_pserve_and_ws_celery(database_url, tmp_path):
    missing = sqlalchemy.make_url(database_url).set(username="ws_no_such_role", password="s3cret",
                                                    database="ws_no_such_db")
    db_url = missing.render_as_string(hide_password=False)
    shown = missing.render_as_string(hide_password=True).replace("***", "**")
    given = variables(db_url, "redis://127.0.0.1:1/0", listen=f"127.0.0.1:{free_port()}")
    for argv in ([str(BIN / "pserve"), PRODUCTION_INI, *given],
                 [str(BIN / "ws-celery"), PRODUCTION_INI, *given, "--", "worker"],
                 [str(BIN / "ws-celery"), PRODUCTION_INI, *given, "--", "init"]):
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert result.returncode == 1, (argv, result.stdout, result.stderr)
        lines = (result.stdout + result.stderr).strip().splitlines()
        assert len(lines) == 1, result.stdout + result.stderr
        assert f"cannot use the database {shown}: " in lines[0]
        assert 'role "ws_no_such_role" does not exist' in lines[0]
        assert "s3cret" not in lines[0]
        assert "docs/running.md#production-on-one-machine" in lines[0] and "db_url=" in lines[0]
