"""``ws-celery INI -- healthcheck`` and the JSON health view (websauna_tasks/health.py).

Real Redis, PostgreSQL and ws-celery workers; a server that is down is a
closed port (a free port nobody listens on), and one that hangs is a socket
that listens but never answers. The embedded SQLite broker and the
command-line mistakes need no service.
"""
from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import time
import typing as t

import pytest
import webtest
from pyramid.authorization import ACLHelper
from pyramid.config import Configurator
from pyramid.security import NO_PERMISSION_REQUIRED
from sqlalchemy import text

from tests.apps import sample_tasks
from websauna_tasks import get_celery
from websauna_tasks.health import (
    FAILED,
    NOT_CHECKABLE,
    OK,
    SKIPPED,
    add_health_views,
    check_health,
)
from websauna_tasks.operator_commands import healthcheck
from websauna_tasks.request import task_request


def free_port() -> int:
    """A TCP port nobody listens on once this returns: connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def silent_server() -> t.Iterator[int]:
    """A port that takes connections (the kernel's backlog) and never answers a byte."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


def failed_lines(result: subprocess.CompletedProcess) -> list[str]:
    """The one-line reports of failed checks, which must be all of stderr, without a traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert all(line.startswith("ws-celery: healthcheck: ") for line in lines), result.stderr
    return lines


def report(result: subprocess.CompletedProcess) -> dict[str, t.Any]:
    return json.loads(result.stdout)


@pytest.fixture
def settings(redis_url, database_url, queue_name):
    config = {"broker_url": redis_url, "task_default_queue": queue_name}
    return {"websauna.celery_config": repr(config), "sqlalchemy.url": database_url,
            "websauna_tasks.app_name": f"health-{queue_name}"}


@pytest.fixture
def sqlite_settings(tmp_path):
    """conf/example.ini's way: SQLite for the data and, through kombu's SQLAlchemy transport, the broker."""
    config = {"broker_url": f"sqla+sqlite:///{tmp_path}/broker.sqlite"}
    return {"websauna.celery_config": repr(config), "sqlalchemy.url": f"sqlite:///{tmp_path}/app.sqlite",
            "websauna_tasks.outbox": "true"}


# -- the command ------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_healthy_app_with_a_worker_answering_exits_0(settings, write_ini, run_cli, queue_name,
                                                         ws_celery_worker_factory, subprocess_env):
    ini = write_ini(settings)
    node = f"{queue_name}@healthhost"
    worker = ws_celery_worker_factory(ini, "worker", "-c", "1", "-n", node, "--without-gossip", "--without-mingle",
                                      env=subprocess_env)

    # A generous timeout: a pong ends the wait, so it costs nothing when the worker answers.
    result = run_cli(ini, "healthcheck", "--worker", node, "--json", "--timeout", "20")
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert result.stderr == ""
    found = report(result)
    assert (found["healthy"], found["probe"], found["app"]) == (True, "readiness", f"health-{queue_name}")
    checks = found["checks"]
    assert {name: check["status"] for name, check in checks.items()} == {
        "broker": OK, "database": OK, "outbox": SKIPPED, "worker": OK}
    assert checks["worker"]["workers"] == [node]
    assert checks["outbox"]["detail"] == "the outbox is off"

    text_result = run_cli(ini, "healthcheck", "--worker", node, "--timeout", "20")
    assert text_result.returncode == 0, text_result.stderr
    lines = text_result.stdout.splitlines()
    assert lines[3] == f"worker    ok: {node} answered a ping"
    assert lines[-1].startswith("healthy (readiness, ")
    # A worker pod's own liveness probe: the worker named is pinged, the outbox left out.
    liveness = report(run_cli(ini, "healthcheck", "--liveness", "--worker", node, "--json", "--timeout", "20"))
    assert liveness["healthy"] is True and sorted(liveness["checks"]) == ["broker", "database", "worker"]

    # The same check fails once that worker is gone.
    worker.stop()
    gone = run_cli(ini, "healthcheck", "--worker", node, "--timeout", "2")
    assert gone.returncode == 1, (gone.stdout, gone.stderr)
    assert failed_lines(gone) == [f"ws-celery: healthcheck: worker failed: worker {node} did not answer a ping "
                                  f"within 2 s"]


def test_liveness_needs_no_worker_and_checks_the_broker_and_the_database_only(settings, write_ini, run_cli):
    result = run_cli(write_ini(settings), "healthcheck", "--liveness", "--json")
    assert result.returncode == 0, (result.stdout, result.stderr)
    found = report(result)
    assert found["probe"] == "liveness" and found["healthy"] is True
    assert sorted(found["checks"]) == ["broker", "database"]
    assert found["checks"]["database"]["detail"].endswith(" answers")


def test_a_broker_that_is_down_exits_1_naming_it_with_the_password_masked(settings, write_ini, run_cli, queue_name):
    port = free_port()
    broker = f"redis://:broker-secret@127.0.0.1:{port}/0"
    ini = write_ini(dict(settings, **{"websauna.celery_config": repr(
        {"broker_url": broker, "task_default_queue": queue_name})}))

    for probe in ("--liveness", "--readiness"):
        result = run_cli(ini, "healthcheck", probe, "--timeout", "3")
        assert result.returncode == 1, (probe, result.stdout, result.stderr)
        lines = failed_lines(result)
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"ws-celery: healthcheck: broker failed: cannot reach the broker "
                                   f"redis://:**@127.0.0.1:{port}/0: "), lines[0]
        assert "refused" in lines[0].lower()
        assert "broker-secret" not in result.stdout + result.stderr
    # Readiness does not blame the workers for a broker it could not reach.
    checks = report(run_cli(ini, "healthcheck", "--json"))["checks"]
    assert (checks["broker"]["status"], checks["database"]["status"], checks["worker"]["status"]) == (
        FAILED, OK, SKIPPED)


def test_a_database_that_is_down_exits_1_naming_it_with_the_password_masked(settings, write_ini, run_cli):
    port = free_port()
    ini = write_ini(dict(settings, **{"sqlalchemy.url": f"postgresql+psycopg://app:db-secret@127.0.0.1:{port}/app"}))
    result = run_cli(ini, "healthcheck", "--liveness")
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = failed_lines(result)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"ws-celery: healthcheck: database failed: cannot use the database "
                               f"postgresql+psycopg://app:**@127.0.0.1:{port}/app: "), lines[0]
    assert "db-secret" not in result.stdout + result.stderr
    assert "broker    ok: " in result.stdout


@pytest.fixture
def outbox_settings(settings, db):
    return dict(settings, **{"websauna_tasks.outbox": "true", "websauna_tasks.outbox_publish_on_commit": "false",
                             "websauna_tasks.health_outbox_max_rows": "2"})


def write_unsent_rows(router, count: int) -> list[str]:
    """Commit ``count`` messages to the outbox of the app; nothing publishes them (no relay, no fast path)."""
    with task_request(router.registry) as request:
        with request.tm:
            return [sample_tasks.add.apply_async(args=(n, n), tm=request.tm).id for n in range(count)]


def test_an_outbox_backlog_over_the_row_threshold_fails_readiness_but_not_liveness(outbox_settings, make_app,
                                                                                   write_ini, run_cli):
    router = make_app(**outbox_settings)
    ini = write_ini(outbox_settings)
    write_unsent_rows(router, 2)
    at_the_limit = report(run_cli(ini, "healthcheck", "--json", "--timeout", "2"))["checks"]["outbox"]
    assert (at_the_limit["status"], at_the_limit["unsent"], at_the_limit["max_rows"]) == (OK, 2, 2)

    write_unsent_rows(router, 1)
    result = run_cli(ini, "healthcheck", "--timeout", "2")
    assert result.returncode == 1, (result.stdout, result.stderr)
    outbox_line = [line for line in failed_lines(result) if " outbox failed: " in line]
    assert outbox_line == ["ws-celery: healthcheck: outbox failed: backlog: 3 unsent rows, more than 2 "
                           "(websauna_tasks.health_outbox_max_rows) -- is a relay running (a worker, or outbox-relay)?"]
    liveness = run_cli(ini, "healthcheck", "--liveness")
    assert (liveness.returncode, liveness.stderr) == (0, "")


def test_an_outbox_row_older_than_the_age_threshold_fails_readiness(outbox_settings, make_app, write_ini, run_cli,
                                                                     db):
    settings = dict(outbox_settings, **{"websauna_tasks.health_outbox_max_rows": "0",
                                        "websauna_tasks.health_outbox_max_age_seconds": "600"})
    router = make_app(**settings)
    ini = write_ini(settings)
    [oldest] = write_unsent_rows(router, 1)
    assert report(run_cli(ini, "healthcheck", "--json"))["checks"]["outbox"]["status"] == OK
    with db.begin() as conn:
        conn.execute(text("UPDATE websauna_tasks_outbox SET created_at = created_at - 1000 WHERE id = :id"),
                     {"id": oldest})
    result = run_cli(ini, "healthcheck", "--json")
    assert result.returncode == 1
    outbox = report(result)["checks"]["outbox"]
    assert outbox["status"] == FAILED and outbox["max_rows"] == 0
    assert 1000 <= outbox["oldest_unsent_age_seconds"] < 1100
    assert re.search(r"the oldest unsent row is 1[0-9]{3} s old", outbox["detail"]), outbox["detail"]
    assert "more than 600 s (websauna_tasks.health_outbox_max_age_seconds)" in outbox["detail"]


def test_the_embedded_sqlite_broker_has_no_worker_to_check_and_is_still_healthy(sqlite_settings, write_ini, run_cli):
    result = run_cli(write_ini(sqlite_settings), "healthcheck", "--json")
    assert result.returncode == 0, (result.stdout, result.stderr)
    checks = report(result)["checks"]
    assert {name: check["status"] for name, check in checks.items()} == {
        "broker": OK, "database": OK, "outbox": OK, "worker": NOT_CHECKABLE}
    assert checks["worker"]["detail"] == ("the broker's transport (sqla+sqlite) has no remote control, "
                                          "so no worker can be pinged")
    assert checks["outbox"]["unsent"] == 0


def test_a_command_line_mistake_through_the_whole_cli_is_one_line_and_exit_2(sqlite_settings, write_ini, run_cli):
    result = run_cli(write_ini(sqlite_settings), "healthcheck", "--timeout", "nan")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("ws-celery: argument --timeout: expected a number of seconds above 0")


@pytest.mark.parametrize("args, fragment", [
    (["--timeout", "nan"], "got 'nan'"),
    (["--timeout", "-1"], "got '-1'"),
    (["--timeout", "1e309"], "got '1e309'"),
    (["--timeout", "0"], "above 0"),
    (["--timeout", "301"], "at most 300"),
    (["--timeout", "soon"], "expected a number of seconds, got 'soon'"),
    (["--timeout"], "expected one argument"),
    (["--no-such-option"], "unrecognized arguments: --no-such-option"),
    (["--liveness", "--readiness"], "not allowed with argument --liveness"),
    (["extra"], "unrecognized arguments: extra"),
])
def test_command_line_mistakes_exit_2_with_one_line(capsys, args, fragment):
    # Refused before the application is used: None stands in for it.
    assert healthcheck(None, args) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("ws-celery: "), err
    assert fragment in err and "(usage: ws-celery INI -- healthcheck" in err


def test_help_needs_no_application(capsys):
    assert healthcheck(None, ["--help"]) == 0
    assert "--liveness" in capsys.readouterr().out


# -- check_health itself ----------------------------------------------------------------------------------------------

def sqlite_app(settings: dict[str, str], **extra: str) -> t.Any:
    config = Configurator(settings={**settings, **extra})
    config.include("websauna_tasks")
    return config.make_wsgi_app()


def test_a_broker_that_never_answers_is_cut_off_at_the_timeout(sqlite_settings):
    with silent_server() as port:
        router = sqlite_app(sqlite_settings, **{"websauna.celery_config": repr(
            {"broker_url": f"redis://127.0.0.1:{port}/0"})})
        started = time.monotonic()
        found = check_health(router.registry, readiness=False, timeout=1)
        elapsed = time.monotonic() - started
    assert elapsed < 3.5, elapsed  # 1 s, the grace, and a loaded machine: not the minutes a hang would take
    assert not found.healthy
    assert found.check("broker").status == FAILED
    assert found.check("broker").detail == f"the broker redis://127.0.0.1:{port}/0 did not answer within 1 s"
    assert found.check("database").status == OK


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), -1, 0, 301, "soon"])
def test_check_health_refuses_a_bad_timeout(sqlite_settings, timeout):
    router = sqlite_app(sqlite_settings)
    with pytest.raises(ValueError, match="seconds"):
        check_health(router.registry, readiness=True, timeout=timeout)


def test_check_health_takes_the_registry_the_router_or_the_celery_app(sqlite_settings):
    router = sqlite_app(sqlite_settings)
    for target in (router.registry, router, get_celery(router.registry)):
        found = check_health(target, readiness=True, timeout=2)
        assert found.healthy, found.as_dict()
        assert [check.name for check in found.checks] == ["broker", "database", "outbox", "worker"]


def test_in_eager_mode_there_is_no_worker_to_ask():
    config = Configurator(settings={"websauna.celery_config": "{'broker_url': 'memory://', 'task_always_eager': True}"})
    config.include("websauna_tasks")
    found = check_health(config.make_wsgi_app().registry, readiness=True, timeout=2)
    assert found.healthy, found.as_dict()
    assert found.check("worker").status == SKIPPED and "task_always_eager" in found.check("worker").detail
    assert found.check("database").status == SKIPPED and found.check("outbox").status == SKIPPED


def test_check_health_refuses_what_is_not_an_app():
    from pyramid.exceptions import ConfigurationError

    with pytest.raises(ConfigurationError, match="takes a Pyramid registry or a Celery app"):
        check_health(object(), readiness=False, timeout=1)
    with pytest.raises(ConfigurationError, match="no Celery app on this registry"):
        check_health(Configurator().registry, readiness=False, timeout=1)


# -- the JSON view ----------------------------------------------------------------------------------------------------

def web_app(settings: dict[str, str], permission: t.Any = NO_PERMISSION_REQUIRED, **extra: str) -> webtest.TestApp:
    config = Configurator(settings={**settings, **extra})
    config.include("websauna_tasks")
    assert add_health_views(config, "/_tasks/", permission=permission, timeout=10) == "/_tasks/health"
    return webtest.TestApp(config.make_wsgi_app())


def test_the_view_is_200_when_healthy_and_503_when_not(settings, queue_name):
    healthy = web_app(settings)
    response = healthy.get("/_tasks/health?probe=liveness")
    assert response.status_int == 200 and response.content_type == "application/json"
    assert "no-store" in response.headers["Cache-Control"]
    assert response.json["healthy"] is True and sorted(response.json["checks"]) == ["broker", "database"]

    port = free_port()
    down = web_app(settings, **{"websauna.celery_config": repr(
        {"broker_url": f"redis://:view-secret@127.0.0.1:{port}/0", "task_default_queue": queue_name})})
    response = down.get("/_tasks/health", status=503)
    assert response.json["healthy"] is False and response.json["probe"] == "readiness"
    assert response.json["checks"]["broker"]["status"] == FAILED
    assert f"redis://:**@127.0.0.1:{port}/0" in response.json["checks"]["broker"]["detail"]
    assert "view-secret" not in response.text
    assert down.get("/_tasks/health?probe=liveness", status=503).json["checks"]["database"]["status"] == OK


def test_the_view_on_the_sqlite_broker_and_a_bad_probe(sqlite_settings):
    app = web_app(sqlite_settings)
    response = app.get("/_tasks/health")
    assert response.json["checks"]["worker"]["status"] == NOT_CHECKABLE
    assert app.head("/_tasks/health").status_int == 200
    assert "probe must be liveness or readiness" in app.get("/_tasks/health?probe=deep", status=400).json["error"]
    app.post("/_tasks/health", status=404)


class DenyAll:
    """A security policy that grants nothing: the console's permission check, refused."""

    def identity(self, request: t.Any) -> None:
        return None

    def authenticated_userid(self, request: t.Any) -> None:
        return None

    def permits(self, request: t.Any, context: t.Any, permission: str) -> t.Any:
        return ACLHelper().permits(context, [], permission)

    def remember(self, request: t.Any, userid: t.Any, **kw: t.Any) -> list:
        return []

    def forget(self, request: t.Any, **kw: t.Any) -> list:
        return []


def test_the_view_is_guarded_by_the_permission_it_is_given_and_included_under_a_route_prefix(sqlite_settings):
    config = Configurator(settings=sqlite_settings)
    config.include("websauna_tasks")
    config.set_security_policy(DenyAll())
    add_health_views(config, "/guarded", permission="websauna_tasks.console", route_name="guarded")
    config.include("websauna_tasks.health", route_prefix="/ops")
    app = webtest.TestApp(config.make_wsgi_app())
    app.get("/guarded/health", status=403)
    # includeme: no permission asked, so the policy's refusal does not apply.
    assert app.get("/ops/health").json["healthy"] is True
