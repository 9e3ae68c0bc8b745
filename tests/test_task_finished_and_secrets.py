"""``TaskFinished`` after every run (events.py) and Websauna's ``get_secrets`` (secrets.py): issue 16, point 7.

The app is tests/apps/events_app.py.
"""
from __future__ import annotations

import json
import os
import textwrap

import pytest
from pyramid.exceptions import ConfigurationError

from tests.apps import events_app
from websauna_tasks import TaskFinished, get_secrets
from websauna_tasks.events import run_state
from websauna_tasks.secrets import MAX_SECRETS_BYTES, Secrets, read_secrets
from websauna_tasks.testing import wait_for

EAGER = {"websauna.celery_config": "{'broker_url': 'memory://', 'task_always_eager': True}"}


@pytest.fixture
def eager_app(built_apps):
    events_app.RECORDED.clear()

    def build(**extra: str):
        router = events_app.main({}, **EAGER, **extra)
        built_apps.append(router)
        return router

    yield build
    events_app.RECORDED.clear()


# -- TaskFinished ----------------------------------------------------------------------------------------------

def test_a_successful_run_notifies_its_task_id_state_result_and_open_request(eager_app):
    eager_app()
    result = events_app.succeeds.apply_async(args=(21,), tm=None)
    assert result.get() == 42
    [event] = events_app.RECORDED
    assert event == {"task": "events_app.succeeds", "id": result.id, "state": "SUCCESS", "result": 42,
                     "exception": None, "is_run_request": True}


def test_a_failed_run_notifies_failure_with_the_exception(eager_app):
    eager_app()
    result = events_app.fails.apply_async(tm=None)
    with pytest.raises(ValueError):
        result.get()
    [event] = events_app.RECORDED
    assert (event["state"], event["exception"], event["result"]) == ("FAILURE", "ValueError", None)


def test_a_retried_run_notifies_retry_then_success(eager_app):
    eager_app()
    assert events_app.retries_once.apply_async(tm=None).get() == "second attempt"
    assert [event["state"] for event in events_app.RECORDED] == ["RETRY", "SUCCESS"]


def test_an_ignored_run_notifies_ignored(eager_app):
    eager_app()
    events_app.ignored.apply_async(tm=None)
    assert [event["state"] for event in events_app.RECORDED] == ["IGNORED"]


def test_a_direct_call_notifies_without_a_task_id(eager_app):
    eager_app()
    assert events_app.succeeds(5) == 10
    [event] = events_app.RECORDED
    assert (event["id"], event["state"], event["result"]) == (None, "SUCCESS", 10)


def test_a_failing_subscriber_is_logged_and_leaves_the_outcome_alone(eager_app, caplog):
    eager_app(**{"events_app.failing_subscriber": "true"})
    assert events_app.succeeds.apply_async(args=(1,), tm=None).get() == 2
    assert "a TaskFinished subscriber failed" in caplog.text
    assert [event["state"] for event in events_app.RECORDED] == ["SUCCESS"]


@pytest.mark.parametrize(("exc", "state"), [
    (None, "SUCCESS"), (ValueError(), "FAILURE"), (KeyboardInterrupt(), "FAILURE"),
])
def test_run_state_names_the_outcome(exc, state):
    assert run_state(exc) == state


def test_task_finished_is_public_and_has_websaunas_attributes():
    import websauna_tasks

    assert websauna_tasks.TaskFinished is TaskFinished
    assert {"request", "task"} <= set(TaskFinished.__slots__)


def test_task_finished_in_a_real_worker(redis_url, database_url, queue_name, db, redis_client, built_apps,
                                        tmp_path, ws_celery_worker_factory, subprocess_env):
    key = f"{queue_name}:events"
    secrets = tmp_path / "secrets.ini"
    secrets.write_text("[api]\ntoken = $EVENTS_APP_TOKEN\n")
    celery = {"broker_url": redis_url, "result_backend": redis_url, "task_default_queue": queue_name}
    settings = {"websauna.celery_config": repr(celery), "sqlalchemy.url": database_url,
                "websauna.secrets_file": str(secrets), "events_app.record": f"redis:{key}"}
    ini = tmp_path / "events.ini"
    ini.write_text("[app:main]\nuse = call:tests.apps.events_app:main\n" + "".join(
        f"{name} = {value.replace('%', '%%')}\n" for name, value in settings.items()))
    os.environ["EVENTS_APP_TOKEN"] = "sending-side"
    try:
        built_apps.append(events_app.main({}, **settings))
    finally:
        del os.environ["EVENTS_APP_TOKEN"]
    ws_celery_worker_factory(str(ini), "worker", "-c", "2", env={**subprocess_env, "EVENTS_APP_TOKEN": "s3cret"})
    redis_client.delete(key)
    try:
        ok = events_app.succeeds.apply_async(args=(4,), tm=None)
        failed = events_app.fails.apply_async(tm=None)
        retried = events_app.retries_once.apply_async(tm=None)
        secret = events_app.reads_secret.apply_async(args=("api.token",), tm=None)
        wait_for(lambda: redis_client.llen(key) >= 5, timeout=60)
        events = [json.loads(raw) for raw in redis_client.lrange(key, 0, -1)]
    finally:
        redis_client.delete(key)
    by_id: dict[str, list[dict]] = {}
    for event in events:
        by_id.setdefault(event["id"], []).append(event)
    assert [(e["state"], e["result"], e["db"], e["is_run_request"]) for e in by_id[ok.id]] == [
        ("SUCCESS", 8, 42, True)]
    assert [(e["state"], e["exception"]) for e in by_id[failed.id]] == [("FAILURE", "ValueError")]
    # Celery publishes the retry before the first run ends: with -c 2 the other child may finish the
    # retry (and record SUCCESS) before the first one records its RETRY, so only the set is certain.
    assert sorted(e["state"] for e in by_id[retried.id]) == ["RETRY", "SUCCESS"]
    # The worker read the secret from its own environment at startup.
    assert [(e["state"], e["result"]) for e in by_id[secret.id]] == [("SUCCESS", "s3cret")]
    assert secret.get(timeout=10) == "s3cret"


# -- get_secrets -----------------------------------------------------------------------------------------------

def write(tmp_path, body: str | bytes, name: str = "secrets.ini"):
    path = tmp_path / name
    path.write_bytes(body if isinstance(body, bytes) else textwrap.dedent(body).encode())
    return path


def test_secrets_are_section_dot_key_and_values_keep_percent_signs(tmp_path, monkeypatch):
    monkeypatch.setenv("WS_SECRET_TOKEN", "from-env")
    path = write(tmp_path, """\
        [slack]
        token = xoxb-1%2
        [api]
        Key = ${WS_SECRET_TOKEN}
        plain = $WS_SECRET_TOKEN and more
        """)
    secrets = read_secrets(str(path))
    assert dict(secrets) == {"slack.token": "xoxb-1%2", "api.key": "from-env", "api.plain": "$WS_SECRET_TOKEN and more"}
    assert "xoxb" not in repr(secrets) and "from-env" not in repr(secrets)


def test_get_secrets_from_the_setting_on_a_registry_or_a_request(eager_app, tmp_path):
    path = write(tmp_path, "[slack]\ntoken = abc\n")
    router = eager_app(**{"websauna.secrets_file": f"file://{path}"})
    assert get_secrets(router.registry)["slack.token"] == "abc"
    request = type("R", (), {"registry": router.registry})()
    assert get_secrets(request) is get_secrets(router.registry)
    with pytest.raises(KeyError, match="'slack.missing' is not in the secrets file"):
        get_secrets(router.registry)["slack.missing"]


def test_no_secrets_file_means_empty_secrets_saying_so(eager_app):
    router = eager_app()
    secrets = get_secrets(router.registry)
    assert len(secrets) == 0
    with pytest.raises(KeyError, match="websauna.secrets_file is not set"):
        secrets["slack.token"]


def test_get_secrets_refuses_something_that_is_no_request(eager_app):
    with pytest.raises(TypeError, match="get_secrets"):
        get_secrets("registry")


def test_a_resource_path_is_found_in_its_package(eager_app):
    router = eager_app(**{"websauna.secrets_file": "resource://tests/apps/events_secrets.ini"})
    assert get_secrets(router.registry)["demo.value"] == "from-a-package"


@pytest.mark.parametrize(("body", "message"), [
    ("[slack]\ntoken = a\ntoken = b\n", "already exists"),
    ("token = outside any section\n", "no section header"),
    (b"[s]\nk = \xff\xfe\n", "not UTF-8"),
    ("[s]\nk = $WS_NOT_SET_ANYWHERE\n", r"\[s\] k is \$WS_NOT_SET_ANYWHERE, and the environment has no"),
])
def test_a_malformed_secrets_file_stops_startup(eager_app, tmp_path, body, message):
    path = write(tmp_path, body)
    with pytest.raises(ConfigurationError, match=message):
        eager_app(**{"websauna.secrets_file": str(path)})


def test_an_oversize_secrets_file_is_refused(tmp_path):
    path = write(tmp_path, b"[s]\nk = " + b"x" * MAX_SECRETS_BYTES + b"\n")
    with pytest.raises(ConfigurationError, match="larger than"):
        read_secrets(str(path))


@pytest.mark.parametrize("value", ["/nonexistent/secrets.ini", "resource://no_such_package_xyz/s.ini",
                                   "resource://tests", "file:///nonexistent.ini"])
def test_a_secrets_file_that_is_not_there_stops_startup(eager_app, value):
    with pytest.raises(ConfigurationError, match="websauna.secrets_file"):
        eager_app(**{"websauna.secrets_file": value})


def test_secrets_mapping_is_read_only():
    secrets = Secrets({"a.b": "c"}, "/x")
    with pytest.raises(TypeError):
        secrets["a.b"] = "d"  # type: ignore[index]
