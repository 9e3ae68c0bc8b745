"""defer(): plain functions run later, arguments as JSON, only allowed functions, after the commit."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import pytest
import transaction
from celery.result import AsyncResult
from sqlalchemy import text

from tests.apps import deferred_elsewhere, deferred_functions
from tests.conftest import queued_messages
from websauna_tasks import DeferNotAllowed, defer, drop_dead_letter, get_celery, list_dead_letters
from websauna_tasks.defer import DEFERRED_TASK_NAME


def effects(db) -> list[tuple[str, dict]]:
    with db.connect() as conn:
        rows = conn.execute(text("SELECT task_id, value FROM ws_test_effects ORDER BY id")).all()
    return [(task_id, json.loads(value)) for task_id, value in rows]


def redis_settings(redis_url: str, database_url: str, queue_name: str, **extra: str) -> dict[str, str]:
    celery = {"broker_url": redis_url, "task_default_queue": queue_name, "result_backend": redis_url,
              "result_expires": 600}
    settings = {"websauna.celery_config": repr(celery), "sqlalchemy.url": database_url,
                "websauna.site_url": "https://example.com/app"}
    settings.update(extra)
    return settings


@pytest.fixture
def app(make_app, redis_url, database_url, queue_name, db):
    return make_app(**redis_settings(redis_url, database_url, queue_name))


@pytest.fixture
def eager_app(make_app, database_url, db):
    config = {"broker_url": "memory://", "task_always_eager": True}
    return make_app(**{"websauna.celery_config": repr(config), "sqlalchemy.url": database_url,
                       "websauna.site_url": "https://example.com/app"})


def sent(redis_client, queue: str) -> list[dict]:
    return queued_messages(redis_client, queue)


def body_of(message: dict) -> list:
    import base64

    return json.loads(base64.b64decode(message["body"]))


# -- what travels ------------------------------------------------------------------------

def test_message_carries_the_path_and_json_arguments(app, redis_client, queue_name):
    task_id = defer(deferred_functions.record, "v1", note="n", _registry=app.registry)
    (message,) = sent(redis_client, queue_name)
    assert message["headers"]["task"] == DEFERRED_TASK_NAME
    assert message["headers"]["id"] == task_id
    assert message["content-type"] == "application/json"
    args, kwargs, _embed = body_of(message)
    assert args == ["tests.apps.deferred_functions:record", ["v1"], {"note": "n"}]
    assert kwargs == {}


def test_static_and_class_methods_travel_by_qualified_name(app, redis_client, queue_name):
    defer(deferred_functions.Jobs.static_record, "s", _registry=app.registry)
    defer(deferred_functions.Jobs.class_record, "c", _registry=app.registry)
    paths = [body_of(m)[0][0] for m in sent(redis_client, queue_name)]
    assert paths == ["tests.apps.deferred_functions:Jobs.static_record",
                     "tests.apps.deferred_functions:Jobs.class_record"]


@pytest.mark.parametrize("args, kwargs, named", [
    ((object(),), {}, "argument 1 (object)"),
    (("fine", {1, 2}), {}, "argument 2 (set)"),
    ((), {"value": "x", "note": 1j}, "keyword argument 'note' (complex)"),
])
def test_non_json_argument_is_refused_at_defer_time_naming_it(app, redis_client, queue_name, args, kwargs, named):
    with pytest.raises(TypeError) as caught:
        defer(deferred_functions.record, *args, _registry=app.registry, **kwargs)
    assert named in str(caught.value)
    assert sent(redis_client, queue_name) == []


@pytest.mark.parametrize("fn, why", [
    (lambda: None, "not a module-level function"),
    (deferred_functions.Jobs().bound_record, "bound to an instance"),
])
def test_functions_a_worker_cannot_find_are_refused(app, fn, why):
    with pytest.raises(TypeError, match=why):
        defer(fn, _registry=app.registry)


def test_nested_function_is_refused(app):
    def inner():  # pragma: no cover - refused
        pass

    with pytest.raises(TypeError, match="not a module-level function"):
        defer(inner, _registry=app.registry)


def test_task_proxy_points_to_apply_async(app):
    from tests.apps import sample_tasks

    with pytest.raises(TypeError, match="apply_async"):
        defer(sample_tasks.add, 1, 2, _registry=app.registry)


def test_queue_countdown_and_eta(app, redis_client, queue_name, redis_url):
    other = queue_name + "-emails"
    try:
        defer(deferred_functions.record, "q", _queue=other, _registry=app.registry)
        assert [body_of(m)[0][1] for m in sent(redis_client, other)] == [["q"]]
    finally:
        redis_client.delete(other, f"_kombu.binding.{other}")
    # "default" is the app's default queue (task_default_queue here).
    defer(deferred_functions.record, "d", _registry=app.registry)
    far = datetime.now(timezone.utc) + timedelta(minutes=30)  # under the Redis visibility_timeout (docs/RELIABILITY.md)
    before = datetime.now(timezone.utc)
    defer(deferred_functions.record, "both", _countdown=600, _eta=far, _registry=app.registry)
    defer(deferred_functions.record, "eta", _eta=far, _registry=app.registry)
    messages = sent(redis_client, queue_name)
    assert [body_of(m)[0][1] for m in messages] == [["d"], ["both"], ["eta"]]
    assert messages[0]["headers"]["eta"] is None
    countdown_eta = datetime.fromisoformat(messages[1]["headers"]["eta"])
    assert timedelta(seconds=595) < countdown_eta - before < timedelta(seconds=620), "_countdown must win"
    assert abs(datetime.fromisoformat(messages[2]["headers"]["eta"]) - far) < timedelta(seconds=1)


# -- transactions --------------------------------------------------------------------------

def test_transactional_by_default_inside_a_transaction(app, redis_client, queue_name):
    tm = transaction.TransactionManager(explicit=True)
    with tm:
        task_id = defer(deferred_functions.record, "after-commit", _tm=tm, _registry=app.registry)
        assert sent(redis_client, queue_name) == []
    assert [m["headers"]["id"] for m in sent(redis_client, queue_name)] == [task_id]


def test_thread_local_transaction_is_used_when_no_tm_is_given(app, redis_client, queue_name):
    with transaction.manager:
        defer(deferred_functions.record, "thread-local", _registry=app.registry)
        assert sent(redis_client, queue_name) == []
    assert len(sent(redis_client, queue_name)) == 1
    # Outside any transaction: sent at once.
    defer(deferred_functions.record, "now", _registry=app.registry)
    assert len(sent(redis_client, queue_name)) == 2


def test_nothing_sent_on_abort_and_false_sends_now(app, redis_client, queue_name):
    tm = transaction.TransactionManager(explicit=True)
    with pytest.raises(RuntimeError):
        with tm:
            defer(deferred_functions.record, "aborted", _tm=tm, _registry=app.registry)
            immediate = defer(deferred_functions.record, "now", _tm=tm, _transactional=False,
                              _registry=app.registry)
            raise RuntimeError("the request failed")
    assert [m["headers"]["id"] for m in sent(redis_client, queue_name)] == [immediate]


def test_transactional_true_without_a_transaction_is_an_error(app, redis_client, queue_name):
    with pytest.raises(transaction.interfaces.NoTransaction, match="no transaction is active"):
        defer(deferred_functions.record, "x", _transactional=True, _registry=app.registry)
    assert sent(redis_client, queue_name) == []


def test_in_a_view_it_waits_for_pyramid_tm(app, redis_client, queue_name):
    import webtest
    from pyramid.config import Configurator
    from pyramid.response import Response

    def view(request):
        before = len(sent(redis_client, queue_name))
        task_id = defer(deferred_functions.record, request.matchdict["value"])
        assert len(sent(redis_client, queue_name)) == before, "sent before the request's commit"
        if request.matchdict["value"] == "fail":
            raise ValueError("view failed")
        return Response(task_id)

    config = Configurator(registry=app.registry)
    config.add_route("defer_view", "/defer/{value}")
    config.add_view(view, route_name="defer_view")
    config.commit()
    testapp = webtest.TestApp(config.make_wsgi_app())
    task_id = testapp.get("/defer/ok").text
    with pytest.raises(ValueError):
        testapp.get("/defer/fail")
    assert [m["headers"]["id"] for m in sent(redis_client, queue_name)] == [task_id]


# -- the allow-list --------------------------------------------------------------------------

def test_functions_outside_the_allowed_modules_are_refused_at_defer_time(make_app, redis_url, database_url,
                                                                        queue_name, redis_client, db):
    router = make_app(**redis_settings(redis_url, database_url, queue_name,
                                       **{"websauna_tasks.defer_allowed_modules": "tests.apps.deferred_functions"}))
    with pytest.raises(DeferNotAllowed, match="tests.apps.deferred_elsewhere:unmarked"):
        defer(deferred_elsewhere.unmarked, "x", _registry=router.registry)
    with pytest.raises(DeferNotAllowed, match="os:getcwd|posix:getcwd"):
        defer(os.getcwd, _registry=router.registry)
    defer(deferred_elsewhere.marked, "m", _registry=router.registry)
    defer(deferred_functions.record, "r", _registry=router.registry)
    assert [body_of(m)[0][0] for m in sent(redis_client, queue_name)] == [
        "tests.apps.deferred_elsewhere:marked", "tests.apps.deferred_functions:record"]


def test_default_allow_list_is_the_applications_package(app):
    from websauna_tasks.defer import allowed_prefixes

    assert allowed_prefixes(app.registry) == ("tests",)  # tests.apps.testapp builds the app


def test_bad_allow_list_setting_is_a_configuration_error(make_app):
    from pyramid.exceptions import ConfigurationError

    with pytest.raises(ConfigurationError, match="not a module name"):
        make_app(**{"websauna.celery_config": repr({"broker_url": "memory://"}),
                    "websauna_tasks.defer_allowed_modules": "tests os;rm"})


# -- eager mode: the function runs with a task request after the commit --------------------

def test_eager_runs_with_a_task_request_and_commits(eager_app, db):
    tm = transaction.TransactionManager(explicit=True)
    with tm:
        task_id = defer(deferred_functions.Jobs.class_record, "eager", _tm=tm, _registry=eager_app.registry)
        assert effects(db) == []
    ((row_id, report),) = effects(db)
    assert row_id == "eager" and report["note"] == "classmethod of Jobs"
    assert report["home"] == "https://example.com/app/" and report["tm_explicit"]
    assert task_id


def test_eager_failure_rolls_back_the_functions_writes(eager_app, db):
    with pytest.raises(ValueError, match="asked to fail"):
        defer(deferred_functions.record_then_fail, "rolled-back", _registry=eager_app.registry)
    assert effects(db) == []


# -- a real worker -------------------------------------------------------------------------

@pytest.mark.slow
def test_worker_runs_deferred_functions_and_refuses_forged_messages(
        make_app, redis_url, database_url, queue_name, db, write_ini, ws_celery_worker_factory,
        subprocess_env, tmp_path):
    settings = redis_settings(redis_url, database_url, queue_name,
                              **{"websauna_tasks.defer_allowed_modules": "tests.apps.deferred_functions"})
    marker = tmp_path / "imported"
    system_marker = tmp_path / "system-ran"
    env = dict(subprocess_env, WS_TEST_IMPORT_MARKER=str(marker))
    worker = ws_celery_worker_factory(write_ini(settings), "worker", "-c", "2", env=env)
    router = make_app(**settings)
    registry = router.registry

    ok = defer(deferred_functions.record, "in-worker", note="w", _registry=registry)
    static = defer(deferred_functions.Jobs.static_record, "static", _registry=registry)
    assert AsyncResult(ok, app=get_celery(registry)).get(timeout=30) == "IN-WORKER"
    assert AsyncResult(static, app=get_celery(registry)).get(timeout=30) == "STATIC"
    reports = dict(effects(db))
    assert reports["in-worker"]["note"] == "w" and reports["in-worker"]["pid"] != os.getpid()
    assert reports["in-worker"]["home"] == "https://example.com/app/"
    assert reports["static"]["note"] == "staticmethod"

    # Forged messages: the broker is writable by someone who is not us.
    app = get_celery(registry)
    forged = {
        "os:system": ["os:system", [f"touch {system_marker}"], {}],
        "attribute of an allowed module": ["tests.apps.deferred_functions:os.system", [f"touch {system_marker}"], {}],
        "dunder walk": ["tests.apps.deferred_functions:record.__globals__", [], {}],
        "import side effect": ["tests.apps.deferred_import_side_effect:harmless", [], {}],
        "malformed": [42, "not a list", None],
    }
    results = {what: app.send_task(DEFERRED_TASK_NAME, args=args) for what, args in forged.items()}
    for what, result in results.items():
        with pytest.raises(Exception) as caught:
            result.get(timeout=30)
        assert type(caught.value).__name__ == "DeferNotAllowed", (what, caught.value)
    assert not system_marker.exists(), "a forged message ran os.system"
    assert not marker.exists(), "the worker imported a module outside the allow-list"
    # The intake refused each one before it ran, with its reason (intake.py).
    letters = {letter["id"]: letter for letter in list_dead_letters(registry)}
    for what, result in results.items():
        assert letters[result.id]["kind"] == "refused_deferred", what
        drop_dead_letter(registry, result.id)
    assert "not allowed" in letters[results["os:system"].id]["reason"]
    assert "defined elsewhere" in letters[results["attribute of an allowed module"].id]["reason"]
    # The worker is still serving.
    after = defer(deferred_functions.record, "after-forgery", _registry=registry)
    assert AsyncResult(after, app=app).get(timeout=30) == "AFTER-FORGERY"
    assert worker.process.poll() is None


# -- sanity: the test module names what it needs -----------------------------------------------

def test_import_side_effect_module_really_has_one(tmp_path):
    marker = tmp_path / "marker"
    code = "import tests.apps.deferred_import_side_effect"
    root = pathlib.Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True,
                   env={**os.environ, "WS_TEST_IMPORT_MARKER": str(marker), "PYTHONPATH": str(root)})
    deadline = time.monotonic() + 5
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.read_text() == "imported"
