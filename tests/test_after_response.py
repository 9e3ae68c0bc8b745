"""run_after_response: callbacks after the response is sent, per request, only after a commit."""
from __future__ import annotations

import http.client
import logging
import threading

import pytest
import waitress.server
import webtest
from pyramid.interfaces import ITweens
from pyramid.request import Request
from pyramid.testing import DummyRequest

from tests.apps.after_response_app import BARRIER, EVENTS, RECORD, make_app
from websauna_tasks import run_after_response
from websauna_tasks.after_response import after_response_tween_factory

TWEEN = "websauna_tasks.after_response.after_response_tween_factory"


def record(app) -> list:
    return app.registry[RECORD]


@pytest.fixture
def app():
    return make_app()


def test_all_forms_run_in_registration_order_after_the_view(app):
    res = webtest.TestApp(app).get("/forms")
    assert res.text == "forms"
    assert record(app) == [
        ("returned unchanged", True, "decorated", "decorated_always"),
        "view returned",
        "function",
        "decorator",
        "decorator always",
        "explicit request",
    ]


def test_content_length_survives_the_wrapping(app):
    # Called as a server would (webtest fills Content-Length in by itself):
    # without the header waitress answers chunked and ends the body only after
    # the callbacks.
    headers = []
    body_iter = app(Request.blank("/forms").environ, lambda status, response_headers: headers.extend(response_headers))
    try:
        assert b"".join(body_iter) == b"forms"
        assert record(app)[-1] == "view returned"  # nothing ran before close()
    finally:
        body_iter.close()
    assert ("Content-Length", "5") in headers
    assert record(app)[-1] == "explicit request"


def test_a_failing_callback_is_logged_and_the_others_still_run(app, caplog):
    with caplog.at_level(logging.ERROR, logger="websauna_tasks.after_response"):
        webtest.TestApp(app).get("/failing-callback")
    assert record(app) == ["view returned", "first", "third"]
    [entry] = [r for r in caplog.records if r.name == "websauna_tasks.after_response"]
    assert entry.levelno == logging.ERROR
    assert "failing_callback.<locals>.broken_callback" in entry.getMessage()
    assert entry.exc_info[0] is ValueError and str(entry.exc_info[1]) == "callback broke"


def test_view_that_raises_runs_only_always_callbacks(app):
    with pytest.raises(RuntimeError, match="view failed"):
        webtest.TestApp(app).get("/raises")
    assert record(app) == ["always"]


@pytest.mark.parametrize("tm", [True, False], ids=["pyramid_tm", "no-tm"])
def test_exception_view_response_runs_only_always_callbacks(tm):
    app = make_app(tm=tm)
    res = webtest.TestApp(app).get("/raises-handled", status=500)
    assert res.text == "handled Handled"
    assert record(app) == ["always"]


def test_without_pyramid_tm_plain_callbacks_run_when_the_request_succeeds():
    app = make_app(tm=False)
    webtest.TestApp(app).get("/forms")
    assert record(app)[2:] == ["function", "decorator", "decorator always", "explicit request"]


def test_doomed_transaction_runs_only_always_callbacks(app):
    assert webtest.TestApp(app).get("/doomed").text == "doomed"
    assert record(app) == ["always"]


def test_failed_commit_runs_only_always_callbacks(app):
    # The commit fails in the vote, after the view returned normally; the
    # after-commit hook gets status False.
    res = webtest.TestApp(app).get("/commit-fails", status=500)
    assert res.text == "commit failed"
    assert record(app) == ["always"]


def test_each_callback_follows_the_transaction_it_was_registered_in(app):
    webtest.TestApp(app).get("/two-transactions")
    assert record(app) == ["first transaction"]


def test_nothing_leaks_into_the_next_request(app):
    testapp = webtest.TestApp(app)
    with pytest.raises(RuntimeError, match="view failed"):
        testapp.get("/raises")
    testapp.get("/nothing")
    testapp.get("/doomed")
    testapp.get("/nothing")
    assert record(app) == ["always", "always"]


def test_concurrent_requests_keep_their_own_callbacks(app):
    app.registry[BARRIER] = threading.Barrier(2, timeout=10)
    errors = []

    def client(name):
        try:
            webtest.TestApp(app).get("/concurrent", {"name": name})
        except Exception as exc:  # reported below; a thread's exception would be lost
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(name,), name=f"client-{name}") for name in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(15)
    assert not errors
    # Each callback ran once, in its own request's thread (webtest runs the app
    # in the caller's thread), after that request's own earlier callback.
    assert sorted(record(app)) == [("a", 1, "client-a"), ("a", 2, "client-a"),
                                   ("b", 1, "client-b"), ("b", 2, "client-b")]
    for name in "ab":
        assert [step for n, step, _thread in record(app) if n == name] == [1, 2]


def test_registering_from_a_callback_is_too_late(app):
    webtest.TestApp(app).get("/too-late")
    [message] = record(app)
    assert message.startswith("RuntimeError: run_after_response() is too late")


def test_callbacks_see_their_request_in_thread_locals(app):
    webtest.TestApp(app).get("/thread-locals")
    assert record(app) == [(True, True)]


def test_a_thread_of_the_view_is_refused_with_the_thread_local_manager(app):
    # pyramid_tm's default manager is thread-local: from another thread the
    # request's transaction is invisible, so registering must fail loudly.
    webtest.TestApp(app).get("/from-thread")
    implicit, passed = record(app)
    assert implicit.startswith("implicit: RuntimeError: run_after_response() was called outside a Pyramid request")
    assert passed.startswith("passed request: RuntimeError: run_after_response() was called from another thread")
    assert "tm.manager_hook = pyramid_tm.explicit_manager" in passed


@pytest.mark.parametrize("doom", [False, True])
def test_a_thread_of_the_view_can_pass_the_request_with_an_explicit_manager(doom):
    app = make_app(**{"tm.manager_hook": "pyramid_tm.explicit_manager"})
    webtest.TestApp(app).get("/from-thread", {"doom": "1"} if doom else {})
    implicit, *ran = record(app)
    assert implicit.startswith("implicit: RuntimeError: run_after_response() was called outside a Pyramid request")
    # It joined the request's transaction: runs after its commit, not after its abort.
    assert ran == ([] if doom else ["passed request"])


def test_outside_a_request_is_an_error_naming_the_fix():
    with pytest.raises(RuntimeError, match="outside a Pyramid request.*request="):
        run_after_response(lambda: None)
    with pytest.raises(RuntimeError, match="outside a Pyramid request"):
        run_after_response(always=True)(lambda: None)


def test_a_request_that_skipped_the_tween_is_an_error_naming_the_fix():
    with pytest.raises(RuntimeError, match=r"config.include\('websauna_tasks'\)"):
        run_after_response(lambda: None, request=DummyRequest())


def test_an_app_without_websauna_tasks_raises_instead_of_dropping():
    app = make_app(include=False)
    with pytest.raises(RuntimeError, match=r"did not pass through it: add config.include\('websauna_tasks'\)"):
        webtest.TestApp(app).get("/forms")


def test_a_non_callable_is_refused(app):
    with pytest.raises(TypeError, match="callable"):
        run_after_response("not a function")


def test_an_existing_body_is_closed_before_the_callbacks(app):
    res = webtest.TestApp(app).get("/closing-body")
    assert res.body == b"part one, part two"
    assert record(app) == ["body closed", "callback"]


def test_head_request_runs_callbacks(app):
    webtest.TestApp(app).head("/forms")
    assert record(app)[2:] == ["function", "decorator", "decorator always", "explicit request"]


@pytest.mark.parametrize("eager", [False, True])
@pytest.mark.parametrize("tm_first", [True, False])
def test_the_tween_is_outermost_above_pyramid_tm(eager, tm_first):
    from pyramid.config import Configurator

    config = Configurator(settings={"websauna.celery_config": repr({"broker_url": "memory://",
                                                                      "task_always_eager": eager})})
    for name in (["pyramid_tm", "websauna_tasks"] if tm_first else ["websauna_tasks", "pyramid_tm"]):
        config.include(name)
    names = [name for name, _factory in config.make_wsgi_app().registry.queryUtility(ITweens).implicit()]
    assert names[0] == TWEEN
    assert names.index(TWEEN) < names.index("pyramid_tm.tm_tween_factory")
    assert after_response_tween_factory is config.maybe_dotted(TWEEN)


# --- pyramid_retry: each attempt is a new request; a failed attempt's callbacks never run.

@pytest.mark.parametrize("rendered", [False, True], ids=["raised", "exception-view"])
def test_retried_attempt_callbacks_do_not_run(rendered):
    settings = {"after_response_test.render_transient": "1"} if rendered else {}
    app = make_app(retry=True, **settings)
    res = webtest.TestApp(app).get("/flaky")
    assert res.text == "attempt 1"
    assert record(app) == ["plain 1", "always 1"]


def test_last_failed_attempt_runs_its_always_callbacks_only():
    app = make_app(retry=True, **{"retry.attempts": "2"})
    with pytest.raises(Exception, match="attempt 1 conflicts"):
        webtest.TestApp(app).get("/flaky", {"fail": "always"})
    assert record(app) == ["always 1"]


# --- A real server: the client has the whole response while the callback still runs.

@pytest.fixture
def served_app():
    app = make_app()
    socket_map: dict = {}
    server = waitress.server.create_server(app, map=socket_map, host="127.0.0.1", port=0, threads=2)
    runner = threading.Thread(target=server.run, name="waitress", daemon=True)
    runner.start()
    yield app, server.effective_port
    # Closing every dispatcher empties the map, which ends the loop in run().
    for dispatcher in list(socket_map.values()):
        dispatcher.handle_close()
    server.task_dispatcher.shutdown()
    runner.join(5)


def test_client_has_the_response_while_the_callback_is_still_blocked(served_app):
    app, port = served_app
    events = app.registry[EVENTS]
    events.update(started=threading.Event(), release=threading.Event(), finished=threading.Event())
    # Shorter than the callback's own wait: if the response waited for the
    # callback, reading it times out here instead of passing late.
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/slow-callback")
        response = connection.getresponse()
        body = response.read()
        assert response.status == 200
        assert body == b"x" * 100_000
        assert response.getheader("Content-Length") == "100000"
        # The callback is running (after the body was written) and still blocked.
        assert events["started"].wait(5)
        assert not events["finished"].is_set()
    finally:
        events["release"].set()
        connection.close()
    assert events["finished"].wait(5)
    assert events["released"] is True
