"""ScheduleOnCommitTask: messages reach the broker (real Redis) only after commit."""
from __future__ import annotations

import logging

import pytest
import transaction
import webtest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from tests.apps import sample_tasks
from tests.conftest import queued_messages


@pytest.fixture
def app(make_app, redis_url, database_url, queue_name, db):
    config = {"broker_url": redis_url, "task_default_queue": queue_name}
    return make_app(**{"websauna.celery_config": repr(config), "sqlalchemy.url": database_url, "retry.attempts": "3"})


@pytest.fixture
def tm():
    return transaction.TransactionManager(explicit=True)


def sent_ids(redis_client, queue_name):
    return [m["headers"]["id"] for m in queued_messages(redis_client, queue_name)]


def test_sent_only_after_commit_with_the_returned_id(app, tm, redis_client, queue_name):
    with tm:
        result = sample_tasks.add.apply_async(args=(1, 2), tm=tm)
        assert result.id
        assert sent_ids(redis_client, queue_name) == []
    messages = queued_messages(redis_client, queue_name)
    assert [m["headers"]["id"] for m in messages] == [result.id]
    assert messages[0]["headers"]["task"] == "tests.add"


def test_nothing_sent_on_abort(app, tm, redis_client, queue_name):
    with pytest.raises(ValueError):
        with tm:
            sample_tasks.add.apply_async(args=(1, 2), tm=tm)
            raise ValueError("view failed")
    assert sent_ids(redis_client, queue_name) == []


def test_nothing_sent_when_doomed(app, tm, redis_client, queue_name):
    tm.begin()
    sample_tasks.add.apply_async(args=(1, 2), tm=tm)
    tm.doom()
    with pytest.raises(transaction.interfaces.DoomedTransaction):
        tm.commit()
    tm.abort()
    assert sent_ids(redis_client, queue_name) == []


def test_nothing_sent_when_commit_fails_with_integrity_error(app, tm, redis_client, queue_name):
    router = app
    from pyramid.scripting import prepare

    from websauna_tasks.request import make_task_request

    request = make_task_request(router.registry)
    env = prepare(request=request, registry=router.registry)
    try:
        with request.tm:
            request.dbsession.execute(text("INSERT INTO ws_test_rows (value) VALUES ('dup')"))
        with pytest.raises(IntegrityError):
            with request.tm:
                sample_tasks.add.apply_async(args=(1, 2), tm=request.tm)
                # The duplicate only fails when the transaction commits.
                request.dbsession.execute(text("INSERT INTO ws_test_rows (value) VALUES ('dup')"))
    finally:
        env["closer"]()
    assert sent_ids(redis_client, queue_name) == []


def test_savepoint_rollback_drops_messages_queued_after_it(app, tm, redis_client, queue_name):
    with tm:
        kept = sample_tasks.add.apply_async(args=(1, 1), tm=tm)
        savepoint = tm.savepoint()
        sample_tasks.add.apply_async(args=(2, 2), tm=tm)
        savepoint.rollback()
        also_kept = sample_tasks.add.apply_async(args=(3, 3), tm=tm)
    assert sent_ids(redis_client, queue_name) == [kept.id, also_kept.id]


def test_savepoint_taken_before_the_first_message(app, tm, redis_client, queue_name):
    with tm:
        savepoint = tm.savepoint()
        sample_tasks.add.apply_async(args=(2, 2), tm=tm)
        savepoint.rollback()
    assert sent_ids(redis_client, queue_name) == []


def test_missing_tm_is_a_clear_error_and_tm_none_sends_now(app, redis_client, queue_name):
    with pytest.raises(TypeError, match="tm=request.tm"):
        sample_tasks.add.apply_async(args=(1, 2))
    with pytest.raises(TypeError, match="tm=request.tm"):
        sample_tasks.add.delay(1, 2)
    result = sample_tasks.add.apply_async(args=(1, 2), tm=None)
    assert sent_ids(redis_client, queue_name) == [result.id]


def test_beat_style_call_with_producer_needs_no_tm(app, redis_client, queue_name):
    celery_app = sample_tasks.add.app
    with celery_app.producer_or_acquire() as producer:
        result = sample_tasks.add.apply_async((1, 2), {}, producer=producer)
    assert sent_ids(redis_client, queue_name) == [result.id]


def test_wrong_arguments_fail_at_call_time_not_after_commit(app, tm, redis_client, queue_name):
    with pytest.raises(TypeError, match="tests.add"):
        with tm:
            sample_tasks.add.apply_async(args=(1, 2, 3), tm=tm)
    assert sent_ids(redis_client, queue_name) == []


def test_many_messages_published_in_one_round(app, tm, redis_client, queue_name):
    celery_app = sample_tasks.add.app
    acquired = []
    original = celery_app.producer_pool.acquire

    def counting_acquire(*args, **kwargs):
        acquired.append(1)
        return original(*args, **kwargs)

    celery_app.producer_pool.acquire = counting_acquire
    try:
        with tm:
            ids = [sample_tasks.add.apply_async(args=(i, i), tm=tm).id for i in range(50)]
    finally:
        celery_app.producer_pool.acquire = original
    assert sent_ids(redis_client, queue_name) == ids
    assert len(acquired) == 1


def test_view_commit_sends_view_error_does_not(app, redis_client, queue_name, db):
    testapp = webtest.TestApp(app)
    task_id = testapp.get("/write/one").text
    assert sent_ids(redis_client, queue_name) == [task_id]
    with pytest.raises(RuntimeError):
        testapp.get("/write-fail/two")
    assert sent_ids(redis_client, queue_name) == [task_id]
    with db.connect() as conn:
        assert conn.execute(text("SELECT value FROM ws_test_rows")).scalars().all() == ["one"]


def test_failed_pyramid_retry_attempt_does_not_publish(app, redis_client, queue_name):
    testapp = webtest.TestApp(app)
    task_id = testapp.get("/flaky/x").text
    messages = queued_messages(redis_client, queue_name)
    assert [m["headers"]["id"] for m in messages] == [task_id]
    # The message is the one queued by the second attempt (retry_attempt == 1).
    assert messages[0]["headers"]["argsrepr"] == "('x', 1)"


def test_publish_error_after_commit_is_logged_with_task_details(make_app, tm, caplog):
    config = {
        "broker_url": "redis://127.0.0.1:1/0",  # nothing listens on port 1
        "task_publish_retry": False,
        "broker_connection_timeout": 0.5,
        "broker_connection_retry": False,
    }
    make_app(**{"websauna.celery_config": repr(config)})
    with caplog.at_level(logging.ERROR, logger="websauna_tasks"):
        with tm:
            result = sample_tasks.add.apply_async(args=(40, 2), tm=tm)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and r.name.startswith("websauna_tasks")]
    assert errors, "a failed publish must be logged"
    message = errors[0].getMessage()
    assert "tests.add" in message and result.id in message and "(40, 2)" in message


def test_plain_websauna_task_sends_now_or_after_commit_when_given_tm(app, tm, redis_client, queue_name):
    now = sample_tasks.route_url.apply_async()
    assert sent_ids(redis_client, queue_name) == [now.id]
    with tm:
        later = sample_tasks.route_url.apply_async(tm=tm)
        assert sent_ids(redis_client, queue_name) == [now.id]
    assert sent_ids(redis_client, queue_name) == [now.id, later.id]


def test_group_with_tm_waits_for_commit_and_is_dropped_on_abort(app, tm, redis_client, queue_name):
    from celery import group

    with pytest.raises(ValueError):
        with tm:
            group(sample_tasks.add.s(1, 1), sample_tasks.add.s(2, 2)).apply_async(tm=tm)
            assert sent_ids(redis_client, queue_name) == []
            raise ValueError("abort")
    assert sent_ids(redis_client, queue_name) == []
    with tm:
        group(sample_tasks.add.s(1, 1), sample_tasks.add.s(2, 2)).apply_async(tm=tm)
        assert sent_ids(redis_client, queue_name) == []
    assert len(sent_ids(redis_client, queue_name)) == 2


def test_signature_sends_now_with_tm_none_set_on_it(app, redis_client, queue_name):
    result = sample_tasks.add.s(1, 2).set(tm=None).apply_async()
    assert sent_ids(redis_client, queue_name) == [result.id]


def test_link_may_be_given_by_position_as_in_celery(app, tm, redis_client, queue_name):
    import base64
    import json

    with tm:
        sample_tasks.add.apply_async((1, 2), None, None, None, sample_tasks.add.s(10), tm=tm)
    (message,) = queued_messages(redis_client, queue_name)
    _args, _kwargs, embed = json.loads(base64.b64decode(message["body"]))
    assert [callback["task"] for callback in embed["callbacks"]] == ["tests.add"]


def test_savepoint_rolled_back_after_late_join_keeps_covering_later_messages(app, tm, redis_client, queue_name):
    with tm:
        first = tm.savepoint()               # taken before the queue joined
        sample_tasks.add.apply_async(args=(1, 1), tm=tm)
        first.rollback()                     # transaction unjoins the queue here
        kept = sample_tasks.add.apply_async(args=(2, 2), tm=tm)
        second = tm.savepoint()
        sample_tasks.add.apply_async(args=(3, 3), tm=tm)
        second.rollback()
    assert sent_ids(redis_client, queue_name) == [kept.id]


def test_scheduled_from_an_after_commit_hook_is_sent(app, tm, redis_client, queue_name):
    scheduled = []

    def hook(status):
        scheduled.append(sample_tasks.add.apply_async(args=(9, 9), tm=tm).id)

    with tm:
        tm.get().addAfterCommitHook(hook)          # before any message: no queue yet
        first = sample_tasks.add.apply_async(args=(1, 1), tm=tm)
        tm.get().addAfterCommitHook(hook)          # after the queue has published
    assert set(sent_ids(redis_client, queue_name)) == {first.id, *scheduled}
    assert len(scheduled) == 2


def test_tm_without_transaction_is_a_clear_error(app):
    explicit = transaction.TransactionManager(explicit=True)
    with pytest.raises(transaction.interfaces.NoTransaction, match="tests.add"):
        sample_tasks.add.apply_async(args=(1, 1), tm=explicit)


def test_two_apps_in_one_process_send_to_their_own_queues(make_app, redis_url, redis_client, queue_name, tm):
    from pyramid.threadlocal import manager

    other_queue = queue_name + "-other"
    first = make_app(**{"websauna.celery_config": repr({"broker_url": redis_url, "task_default_queue": queue_name})})
    second = make_app(**{"websauna.celery_config": repr({"broker_url": redis_url,
                                                          "task_default_queue": other_queue})})
    try:
        # Inside the first app's request, the proxy is the first app's task.
        manager.push({"registry": first.registry, "request": None})
        try:
            in_first = sample_tasks.add.apply_async(args=(1, 1), tm=None)
        finally:
            manager.pop()
        # One transaction holding tasks of both apps: each to its own broker queue.
        first_task = get_celery_task(first, "tests.add")
        second_task = get_celery_task(second, "tests.add")
        with tm:
            a = first_task.apply_async(args=(2, 2), tm=tm)
            b = second_task.apply_async(args=(3, 3), tm=tm)
        assert sent_ids(redis_client, queue_name) == [in_first.id, a.id]
        assert sent_ids(redis_client, other_queue) == [b.id]
    finally:
        redis_client.delete(other_queue, f"_kombu.binding.{other_queue}")


def get_celery_task(router, name):
    from websauna_tasks import get_celery

    return get_celery(router.registry).tasks[name]


def test_task_proxy_pickles_by_reference(app):
    import copy
    import pickle

    assert pickle.loads(pickle.dumps(sample_tasks.add)) is sample_tasks.add
    assert copy.deepcopy(sample_tasks.add) is sample_tasks.add
