"""``await task.defer_async()`` and ``await defer_async(fn)``: the sync calls' semantics, the loop never blocked.

Unit tests capture with ``task_client`` (an in-memory broker); the
integration tests send to the real Redis and let a real ``ws-celery`` worker
run what was deferred.
"""
from __future__ import annotations

import asyncio
import json
import threading
import typing as t

import pytest
import transaction
from celery.result import AsyncResult
from pyramid.scripting import prepare
from sqlalchemy import text

from tests.apps import deferred_functions, sample_tasks
from tests.conftest import queued_messages
from websauna_tasks import (
    AlreadyEnqueued,
    DeferNotAllowed,
    PayloadTooLarge,
    UndeclaredQueue,
    defer_async,
    dispatch,
    get_celery,
)
from websauna_tasks.testing import wait_for

ALLOWED = {"websauna_tasks.defer_allowed_modules": "tests.apps.deferred_functions"}


def memory_settings(**extra: str) -> dict[str, str]:
    return {"websauna.celery_config": repr({"broker_url": "memory://"}),
            "websauna.site_url": "https://example.com/app", **ALLOWED, **extra}


@pytest.fixture
def unit_app(make_app):
    return make_app(**memory_settings())


def record_task(registry):
    return get_celery(registry).tasks["tests.record"]


# -- the same semantics as the sync calls ---------------------------------------------------------

def test_outside_a_transaction_both_send_at_once_with_names_and_queues(unit_app, task_client):
    registry = unit_app.registry

    async def caller():
        task_id = await record_task(registry).defer_async("now")
        fn_id = await defer_async(deferred_functions.record, "fn", note="n", _queue="emails", _name="once",
                                  _registry=registry)
        again = await defer_async(deferred_functions.record, "fn", _name="once", _registry=registry)
        return task_id, fn_id, again

    task_id, fn_id, again = asyncio.run(caller())
    jobs = {job.id: job for job in task_client.pending_jobs}
    assert set(jobs) == {task_id, fn_id}, "the second call with the same _name sends nothing"
    assert again == fn_id
    assert jobs[task_id].task_name == "tests.record" and jobs[task_id].args == ("now",)
    assert jobs[fn_id].function == "tests.apps.deferred_functions:record"
    assert jobs[fn_id].args == ("fn",) and jobs[fn_id].kwargs == {"note": "n"}
    assert jobs[fn_id].queue_name == "emails" and jobs[fn_id].unique_name == "once"


def test_raise_if_enqueued_is_raised_from_the_await(unit_app, task_client):
    async def caller():
        await defer_async(deferred_functions.record, "a", _name="n", _registry=unit_app.registry)
        await defer_async(deferred_functions.record, "b", _name="n", _raise_if_enqueued=True,
                          _registry=unit_app.registry)

    with pytest.raises(AlreadyEnqueued):
        asyncio.run(caller())
    assert task_client.pending_job_count() == 1


def test_inside_the_threads_transaction_nothing_is_sent_before_the_commit(unit_app, task_client):
    registry = unit_app.registry

    async def caller():
        with transaction.manager:
            task_id = await record_task(registry).defer_async("on-commit")
            fn_id = await defer_async(deferred_functions.record, "fn-on-commit", _registry=registry)
            assert task_client.pending_job_count() == 0, "sent before the commit"
        return task_id, fn_id

    ids = asyncio.run(caller())
    assert [job.id for job in task_client.pending_jobs] == list(ids)


def test_abort_sends_nothing(unit_app, task_client):
    registry = unit_app.registry

    async def caller():
        with transaction.manager:
            await record_task(registry).defer_async("aborted")
            await defer_async(deferred_functions.record, "aborted", _registry=registry)
            raise RuntimeError("the coroutine failed")

    with pytest.raises(RuntimeError, match="the coroutine failed"):
        asyncio.run(caller())
    assert task_client.pending_job_count() == 0


def test_the_transaction_is_the_one_active_at_the_call(unit_app, task_client):
    # _tm= names the manager, as for defer(): a coroutine sharing its loop
    # with others need not rely on the thread's transaction.manager.
    registry = unit_app.registry
    tm = transaction.TransactionManager(explicit=True)

    async def caller():
        with tm:
            pending = asyncio.ensure_future(defer_async(deferred_functions.record, "held", _tm=tm,
                                                        _registry=registry))
            await pending
            assert task_client.pending_job_count() == 0
        await defer_async(deferred_functions.record, "sent now", _tm=tm, _registry=registry)

    asyncio.run(caller())
    assert [job.args for job in task_client.pending_jobs] == [("held",), ("sent now",)]


def test_transactional_true_without_a_transaction_is_refused(unit_app, task_client):
    async def caller():
        defer_async(deferred_functions.record, "x", _transactional=True, _registry=unit_app.registry)

    with pytest.raises(transaction.interfaces.NoTransaction, match="no transaction is active"):
        asyncio.run(caller())
    assert task_client.pending_job_count() == 0


def test_defer_sync_is_taigas_name_for_defer(unit_app, task_client):
    task = record_task(unit_app.registry)
    assert type(task).defer_sync is type(task).defer
    task_id = task.defer_sync("sync")
    assert [job.id for job in task_client.pending_jobs] == [task_id]


# -- hostile input: the sync path's refusals, raised from the await ---------------------------------

@pytest.mark.parametrize("call, error, match", [
    (lambda r: record_task(r).defer_async(object()), TypeError, "argument 1"),
    (lambda r: record_task(r).defer_async("x" * 5000), PayloadTooLarge, "max_payload_bytes"),
    (lambda r: defer_async(deferred_functions.record, {1, 2}, _registry=r), TypeError, "argument 1 \\(set\\)"),
    (lambda r: defer_async(deferred_functions.record, "x" * 5000, _registry=r), PayloadTooLarge, "max_payload_bytes"),
    (lambda r: defer_async(lambda: None, _registry=r), TypeError, "not a module-level function"),
    (lambda r: defer_async(sample_tasks.add, 1, 2, _registry=r), TypeError, "apply_async"),
    (lambda r: defer_async(json.dumps, 1, _registry=r), DeferNotAllowed, "not allowed"),
    (lambda r: defer_async(deferred_functions.record, "x", _queue="undeclared", _registry=r), UndeclaredQueue,
     "undeclared"),
    (lambda r: record_task(r).defer_async(nested(100)), TypeError, "nested more than 64 levels"),
    (lambda r: defer_async(deferred_functions.record, {"deep": nested(100)}, _registry=r), TypeError,
     "nested more than 64 levels"),
    (lambda r: record_task(r).defer_async(nested(100_000)), TypeError, "nested more than 64 levels"),
], ids=["task non-JSON", "task oversize", "fn non-JSON", "fn oversize", "lambda", "a task",
        "not allowed", "undeclared queue", "task deep", "fn deep", "task past the recursion limit"])
def test_refusals_are_raised_from_the_await_and_send_nothing(make_app, task_client, call, error, match):
    router = make_app(**memory_settings(**{
        "websauna_tasks.max_payload_bytes": "2048",
        "websauna_tasks.queues": '[{"name": "celery"}, {"name": "emails"}]'}))
    async def caller():
        awaitable = call(router.registry)
        return await awaitable

    with pytest.raises(error, match=match):
        asyncio.run(caller())
    assert task_client.pending_job_count() == 0


def nested(depth: int) -> list:
    value: t.Any = "leaf"
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("value", [float("nan"), float("inf"), [1.0, float("-inf")]], ids=["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused_from_the_await(make_app, task_client, value):
    router = make_app(**memory_settings())

    async def caller():
        return await record_task(router.registry).defer_async(value)

    with pytest.raises(ValueError):
        asyncio.run(caller())
    assert task_client.pending_job_count() == 0


@pytest.mark.parametrize("in_transaction", [True, False], ids=["on commit", "sent now"])
def test_a_call_that_does_not_fit_the_signature_is_refused_from_the_await(unit_app, task_client, in_transaction):
    async def caller():
        if in_transaction:
            with transaction.manager:
                await record_task(unit_app.registry).defer_async(1, 2, 3, nonsense=True)
        else:
            await record_task(unit_app.registry).defer_async(1, 2, 3, nonsense=True)

    with pytest.raises(TypeError, match="tests.record"):
        asyncio.run(caller())
    # The sync call is refused alike, also when a test client captures instead of Celery's apply_async.
    with pytest.raises(TypeError, match="tests.record"):
        record_task(unit_app.registry).defer(1, 2, 3, nonsense=True)
    assert task_client.pending_job_count() == 0


@pytest.mark.parametrize("call", [
    lambda r: record_task(r).defer_async("x"),
    lambda r: defer_async(deferred_functions.record, "x", _registry=r),
], ids=["task.defer_async", "defer_async"])
def test_without_a_running_loop_the_call_itself_fails_clearly(unit_app, task_client, call):
    with pytest.raises(RuntimeError, match="needs a running event loop.*in sync code call"):
        call(unit_app.registry)
    assert task_client.pending_job_count() == 0


# -- the loop is not blocked --------------------------------------------------------------------------

class SlowSink:
    """Captures a message only once the event loop has ticked since the send began.

    On the loop's own thread this would wait forever: the loop cannot tick
    while it is blocked in the send. The wait is bounded, so such a send
    fails the test instead of hanging it.
    """

    def __init__(self, ticks: list[int]):
        self.ticks = ticks
        self.captured: list[tuple[str, int]] = []

    def capture(self, message) -> None:
        seen = len(self.ticks)
        wait_for(lambda: len(self.ticks) > seen, timeout=5, interval=0.002,
                 describe=lambda: "the event loop did not run while the message was published")
        self.captured.append((threading.current_thread().name, len(self.ticks)))


def test_a_send_now_leaves_the_loop_running(unit_app):
    app = get_celery(unit_app.registry)
    ticks: list[int] = []
    sink = SlowSink(ticks)
    previous = dispatch.set_publisher(dispatch.CapturingPublisher(sink), app)

    async def ticking(stop: asyncio.Event) -> None:
        while not stop.is_set():
            ticks.append(1)
            await asyncio.sleep(0.001)

    async def caller():
        stop = asyncio.Event()
        ticker = asyncio.ensure_future(ticking(stop))
        try:
            await asyncio.gather(*(record_task(unit_app.registry).defer_async(i) for i in range(20)))
            await defer_async(deferred_functions.record, "fn", _registry=unit_app.registry)
        finally:
            stop.set()
            await ticker

    try:
        asyncio.run(caller())
    finally:
        dispatch.set_publisher(previous, app)
    assert len(sink.captured) == 21
    assert {name for name, _ in sink.captured} == {"websauna_tasks-async-publisher"}
    assert len({tick for _, tick in sink.captured}) == 21, "each send saw the loop tick again"


# -- real Redis, a real worker --------------------------------------------------------------------------

def redis_settings(redis_url: str, database_url: str, queue_name: str) -> dict[str, str]:
    celery = {"broker_url": redis_url, "task_default_queue": queue_name, "result_backend": redis_url,
              "result_expires": 600}
    return {"websauna.celery_config": repr(celery), "sqlalchemy.url": database_url,
            "websauna.site_url": "https://example.com/app", **ALLOWED}


def effects(db) -> dict[str, str]:
    with db.connect() as conn:
        return dict(conn.execute(text("SELECT task_id, value FROM ws_test_effects")).all())


def test_dispatches_interleave_with_the_loop_on_real_redis(make_app, redis_url, database_url, queue_name, db,
                                                           redis_client):
    registry = make_app(**redis_settings(redis_url, database_url, queue_name)).registry
    task = record_task(registry)
    ticks: list[int] = []
    done_at: list[int] = []

    async def ticking(stop: asyncio.Event) -> None:
        while not stop.is_set():
            ticks.append(1)
            await asyncio.sleep(0.001)

    async def one(index: int) -> None:
        await task.defer_async(index)
        done_at.append(len(ticks))

    async def batch(dispatch_all) -> int:
        stop = asyncio.Event()
        ticks.clear()
        done_at.clear()
        ticker = asyncio.ensure_future(ticking(stop))
        await asyncio.sleep(0)
        await dispatch_all()
        stop.set()
        await ticker
        return len(ticks)

    async def in_loop() -> None:
        for index in range(200):
            task.defer(index)
            done_at.append(len(ticks))

    async def off_loop() -> None:
        await asyncio.gather(*(one(index) for index in range(200)))

    # The contrast that shows the probe can tell: sync sends hold the loop for the whole batch.
    asyncio.run(batch(in_loop))
    assert len(set(done_at)) == 1, "the loop ran between sync sends?"
    asyncio.run(batch(off_loop))
    assert len(set(done_at)) > 10, f"the loop ran only {len(set(done_at))} times while 200 messages were sent"
    assert len(queued_messages(redis_client, queue_name)) == 400


def test_with_compression_the_limit_counts_the_inflated_arguments(make_app, redis_url, database_url, queue_name,
                                                                   db, redis_client):
    """A bomb (5 MB of spaces gzips to a few KB) is refused from the await; a small compressed send goes out."""
    settings = redis_settings(redis_url, database_url, queue_name)
    celery = {"broker_url": redis_url, "task_default_queue": queue_name, "task_compression": "gzip"}
    registry = make_app(**{**settings, "websauna.celery_config": repr(celery)}).registry
    task = record_task(registry)

    async def send(value: str) -> str:
        return await task.defer_async(value)

    async def send_fn(value: str) -> str:
        return await defer_async(deferred_functions.record, value, _registry=registry)

    for sender in (send, send_fn):
        with pytest.raises(PayloadTooLarge, match="max_payload_bytes"):
            asyncio.run(sender(" " * (5 * 1024 * 1024)))
    assert queued_messages(redis_client, queue_name) == []
    task_id = asyncio.run(send("small"))
    [message] = queued_messages(redis_client, queue_name)
    assert message["headers"]["id"] == task_id and message["headers"]["compression"] == "application/x-gzip"


def test_a_real_worker_runs_what_was_deferred_after_the_request_commits(
        make_app, redis_url, database_url, queue_name, db, redis_client, write_ini, ws_celery_worker_factory):
    settings = redis_settings(redis_url, database_url, queue_name)
    registry = make_app(**settings).registry
    celery_app = get_celery(registry)
    task = record_task(registry)

    async def in_a_request(fail: bool) -> tuple[str, str]:
        env = prepare(registry=registry)
        request = env["request"]
        before = len(queued_messages(redis_client, queue_name))
        try:
            with request.tm:
                task_id = await task.defer_async("task-on-commit" + ("-aborted" if fail else ""))
                fn_id = await defer_async(deferred_functions.record, "fn-on-commit" + ("-aborted" if fail else ""))
                assert len(queued_messages(redis_client, queue_name)) == before, "sent before the commit"
                if fail:
                    raise RuntimeError("the request failed")
        finally:
            env["closer"]()
        return task_id, fn_id

    task_id, fn_id = asyncio.run(in_a_request(fail=False))
    with pytest.raises(RuntimeError):
        asyncio.run(in_a_request(fail=True))
    assert [m["headers"]["id"] for m in queued_messages(redis_client, queue_name)] == [task_id, fn_id]

    async def outside() -> tuple[str, str]:
        return (await task.defer_async("task-now"),
                await defer_async(deferred_functions.record, "fn-now", _registry=registry))

    now_ids = asyncio.run(outside())
    ws_celery_worker_factory(write_ini(settings), "worker", "-c", "2")
    for each in (task_id, fn_id, *now_ids):
        AsyncResult(each, app=celery_app).get(timeout=30)
    seen = wait_for(lambda: effects(db) if len(effects(db)) >= 4 else None, timeout=30)
    assert seen[task_id] == "task-on-commit" and seen[now_ids[0]] == "task-now"
    values = {json.loads(v)["value"] for k, v in seen.items() if k.startswith("fn")}
    assert values == {"fn-on-commit", "fn-now"}
    assert not any("aborted" in key or "aborted" in value for key, value in seen.items())


# -- inside an async task body: the run's transaction, found through a context variable -----------------

@pytest.mark.parametrize("fail", [False, True], ids=["commits", "fails"])
def test_an_async_body_defers_after_its_runs_commit(make_app, task_client, fail):
    from websauna_tasks.testing import DrainLimitExceeded

    router = make_app(**memory_settings(**{"tests.scan": "tests.apps.async_defer_tasks"}))
    parent = get_celery(router.registry).tasks["tests.async_defer.fan_out"]
    parent.apply_async((3,), {"fail": fail}, tm=None)
    if fail:
        # The run's transaction aborts: what its body deferred is dropped with it.
        task_client.drain_pending_jobs(None, max_runs=1, failure_behaviour="continue")
        assert [job.task_name for job in task_client.failed_jobs] == ["tests.async_defer.fan_out"]
        assert task_client.pending_jobs == []
        return
    with pytest.raises(DrainLimitExceeded):
        task_client.drain_pending_jobs(None, max_runs=1)
    (run,) = task_client.succeeded_jobs
    children = task_client.pending_jobs
    assert sorted(job.args[0] for job in children) == ["child-0", "child-1", "child-2", "child-fn"]
    assert {job.id for job in children} == set(run.result), "the ids the body was given are the ones sent"
