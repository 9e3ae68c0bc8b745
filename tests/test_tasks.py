"""@task + config.scan(), options, the registry, request.celery, eager mode."""
from __future__ import annotations

import logging

import pytest
import transaction
import webtest
from pyramid.config import Configurator
from pyramid.exceptions import ConfigurationError
from sqlalchemy import text

import websauna_tasks
from websauna_tasks import RetryableTransactionTask, ScheduleOnCommitTask, get_celery
from websauna_tasks.dispatch import EagerTaskError


def configurator(**settings):
    config = Configurator(settings={"websauna.celery_config": "{'broker_url': 'memory://'}", **settings})
    config.include("pyramid_tm")
    config.include("websauna_tasks")
    return config


def test_task_before_scan_gives_a_clear_error():
    from tests.apps import scan_target

    # A fresh proxy that no configurator has scanned.
    proxy = websauna_tasks.task(lambda: None)
    with pytest.raises(RuntimeError, match="config.scan"):
        proxy.apply_async(tm=None)
    with pytest.raises(RuntimeError, match="config.scan"):
        proxy.delay()
    assert "not scanned" in repr(proxy)
    assert callable(scan_target.bare)


def test_plain_scan_finds_tasks_with_all_options():
    config = configurator()
    config.scan("tests.apps.scan_target")  # default categories: only "pyramid"
    app = get_celery(config.registry)
    from tests.apps import scan_target

    assert scan_target.bare.name == "tests.apps.scan_target.bare"
    assert isinstance(scan_target.bare.celery_task, ScheduleOnCommitTask)
    assert app.tasks["tests.apps.scan_target.bare"] is scan_target.bare.celery_task

    task = app.tasks["scan_target.options"]
    assert isinstance(task, RetryableTransactionTask)
    assert task.queue == "special"
    assert (task.time_limit, task.soft_time_limit, task.max_retries) == (30, 20, 7)
    assert task.rate_limit == "10/s"
    assert task.retry_attempts == 9
    assert task.autoretry_for == (KeyError,)
    assert task.acks_late is True


def test_scan_without_include_is_a_configuration_error():
    config = Configurator(settings={})
    with pytest.raises(ConfigurationError, match="websauna_tasks"):
        config.scan("tests.apps.scan_target")


def test_registry_and_request_celery():
    config = configurator()
    app = get_celery(config.registry)
    router = config.make_wsgi_app()
    from pyramid.scripting import prepare

    env = prepare(registry=router.registry)
    try:
        assert env["request"].celery is app
    finally:
        env["closer"]()
    assert app.conf.broker_url == "memory://"
    assert app.conf.accept_content == ["json"]


def test_get_celery_without_include():
    with pytest.raises(ConfigurationError, match="config.include"):
        get_celery(Configurator().registry)


def test_dbsession_factory_setting_replaces_ours():
    config = configurator(**{"websauna_tasks.dbsession_factory": "tests.test_tasks:fake_session_factory"})
    router = config.make_wsgi_app()
    from pyramid.scripting import prepare

    env = prepare(registry=router.registry)
    try:
        assert env["request"].dbsession == ("custom session for", env["request"].path)
    finally:
        env["closer"]()


def fake_session_factory(request):
    return ("custom session for", request.path)


def test_dbsession_without_url_is_a_clear_error():
    router = configurator().make_wsgi_app()
    from pyramid.scripting import prepare

    env = prepare(registry=router.registry)
    try:
        with pytest.raises(ConfigurationError, match="sqlalchemy.url"):
            env["request"].dbsession
    finally:
        env["closer"]()


@pytest.fixture
def eager_app(make_app, database_url, db):
    config = {"broker_url": "memory://", "task_always_eager": True}
    return make_app(**{"websauna.celery_config": repr(config), "sqlalchemy.url": database_url})


def test_eager_task_runs_after_commit_and_sees_the_row(eager_app, db):
    testapp = webtest.TestApp(eager_app)
    task_id = testapp.get("/write/eager").text
    with db.connect() as conn:
        rows = conn.execute(text("SELECT task_id, value FROM ws_test_effects")).all()
    assert [tuple(r) for r in rows] == [(task_id, "eager")]


def test_eager_task_not_run_when_view_fails(eager_app, db):
    testapp = webtest.TestApp(eager_app)
    with pytest.raises(RuntimeError):
        testapp.get("/write-fail/eager")
    with db.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM ws_test_effects")).scalar() == 0


def test_eager_task_error_is_logged_with_traceback_and_raised(eager_app, caplog):
    testapp = webtest.TestApp(eager_app)
    with caplog.at_level(logging.ERROR, logger="websauna_tasks"):
        with pytest.raises(EagerTaskError, match="boom from an eager task") as raised:
            testapp.get("/eager-boom")
    assert isinstance(raised.value.__cause__, RuntimeError)
    logged = [r for r in caplog.records if r.name.startswith("websauna_tasks") and r.exc_info]
    assert logged and "tests.boom" in logged[0].getMessage()


def test_eager_error_outside_a_request_is_logged(eager_app, caplog):
    from tests.apps import sample_tasks

    tm = transaction.TransactionManager(explicit=True)
    with caplog.at_level(logging.ERROR, logger="websauna_tasks"):
        with tm:
            sample_tasks.boom.apply_async(tm=tm)
    assert any("tests.boom" in r.getMessage() and r.exc_info for r in caplog.records)


def test_route_url_and_site_url_inside_a_task(make_app, database_url, db):
    make_app(**{"websauna.celery_config": "{'broker_url': 'memory://', 'task_always_eager': True}",
                "websauna.site_url": "https://example.com/shop"})
    from tests.apps import sample_tasks

    assert sample_tasks.route_url.apply().get() == "https://example.com/shop/"


def test_eager_transient_error_is_not_replayed_by_pyramid_retry(eager_app, db):
    """A retryable error from an eager task must not make pyramid_retry rerun a committed view."""
    testapp = webtest.TestApp(eager_app)
    with pytest.raises(EagerTaskError) as raised:
        testapp.get("/write-then-eager-transient/once")
    assert isinstance(raised.value.__cause__, transaction.interfaces.TransientError)
    with db.connect() as conn:
        assert conn.execute(text("SELECT value FROM ws_test_rows")).scalars().all() == ["once"]
