"""The test task client: capture what would be sent, run it in-process as a worker would.

The app's broker is a real Redis queue private to each test: that it stays
empty shows the messages were captured, not sent. Jobs write to PostgreSQL.
"""
from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta, timezone

import pytest
import transaction
import webtest
from celery import chain
from celery.signals import task_prerun
from sqlalchemy import text

from tests.apps import task_client_app as tasks
from tests.conftest import queued_messages
from websauna_tasks import defer, dispatch
from websauna_tasks.names import NAME_HEADER
from websauna_tasks.testing import (
    DrainLimitExceeded,
    Job,
    TaskClient,
    TaskFailedBehaviour,
    TaskFailedError,
)

pytest_plugins = ("pytester",)


def client_settings(broker: str, database_url: str, default_queue: str | None = None, **celery: object) -> dict:
    routes = {"tests.apps.task_client_app.routed": {"queue": "reports"}}
    config = {"broker_url": broker, "task_routes": routes, **celery}
    if default_queue is not None:
        config["task_default_queue"] = default_queue
    return {"websauna.celery_config": repr(config), "sqlalchemy.url": database_url,
            "websauna.site_url": "https://shop.example.com"}


@pytest.fixture
def build_app(built_apps):
    """Build tests.apps.task_client_app from settings (engines disposed at teardown by built_apps)."""
    def factory(**settings):
        router = tasks.main({}, **settings)
        built_apps.append(router)
        return router

    return factory


@pytest.fixture
def app(build_app, redis_url, database_url, queue_name, db, redis_client):
    return build_app(**client_settings(redis_url, database_url, queue_name))


@pytest.fixture
def registry(app):
    return app.registry


@pytest.fixture
def tm():
    return transaction.TransactionManager(explicit=True)


@pytest.fixture
def nothing_sent(redis_client, queue_name):
    """Asserts at teardown that the test's broker queue never got a message."""
    yield
    assert queued_messages(redis_client, queue_name) == [], "a message reached the broker"


def effects(db) -> dict[str, object]:
    """Committed rows of ws_test_effects, read on a connection of their own: key -> value."""
    with db.connect() as conn:
        rows = conn.execute(text("SELECT task_id, value FROM ws_test_effects ORDER BY id")).all()
    return {key: json.loads(value) for key, value in rows}


def effect_keys(db) -> list[str]:
    return list(effects(db))


def current_sink():
    """The sink in place, read through the public setter (set it to itself)."""
    sink = dispatch.set_message_sink(None)
    dispatch.set_message_sink(sink)
    return sink


# -- capture --------------------------------------------------------------------------------

def test_on_commit_dispatch_is_captured_when_the_transaction_commits(app, task_client, tm, nothing_sent,
                                                                   queue_name):
    with tm:
        result = tasks.write_row.apply_async(args=("a",), tm=tm)
        assert task_client.pending_job_count() == 0, "captured before the commit"
        assert task_client.jobs == {}
    assert task_client.pending_job_count() == 1
    (job,) = task_client.pending_jobs
    assert job.id == result.id
    assert job.task_name == "tests.apps.task_client_app.write_row"
    assert job.queue_name == queue_name
    assert job.status == "todo" and job.attempts == 0


def test_nothing_is_captured_when_the_transaction_aborts(app, task_client, tm, nothing_sent):
    with pytest.raises(RuntimeError):
        with tm:
            tasks.write_row.apply_async(args=("aborted",), tm=tm)
            raise RuntimeError("the request failed")
    tm.begin()
    tasks.write_row.apply_async(args=("doomed",), tm=tm)
    tm.doom()
    tm.abort()
    with tm:
        savepoint = tm.savepoint()
        tasks.write_row.apply_async(args=("rolled-back",), tm=tm)
        savepoint.rollback()
    assert task_client.jobs == {}
    assert task_client.pending_job_count(None) == 0


def test_views_under_pyramid_tm(app, task_client, db, nothing_sent):
    client = webtest.TestApp(app)
    with pytest.raises(RuntimeError):
        client.get("/order/fail")
    assert task_client.jobs == {}, "a failed request's task was captured"
    task_id = client.get("/order/ok").text
    assert list(task_client.jobs) == [task_id]


def test_defer_is_captured_after_the_commit_or_at_once(app, registry, task_client, tm, nothing_sent):
    with tm:
        later = defer(tasks.record, "later", _tm=tm, _registry=registry)
        assert task_client.pending_job_count() == 0
    assert list(task_client.jobs) == [later]
    now = defer(tasks.record, "now", _registry=registry)  # no transaction: sent at once
    assert list(task_client.jobs) == [later, now]
    with pytest.raises(RuntimeError):
        with tm:
            defer(tasks.record, "aborted", _tm=tm, _registry=registry)
            raise RuntimeError("abort")
    assert [job.args for job in task_client.pending_jobs] == [("later",), ("now",)]


def test_pending_counts_per_queue(app, registry, task_client, queue_name, nothing_sent):
    tasks.write_row.apply_async(args=("d",), tm=None)                    # the app's default queue
    tasks.write_row.apply_async(args=("x",), tm=None, queue="explicit")  # a call option
    tasks.send_mail.apply_async(args=("ann@example.com",), tm=None)      # the task's own queue option
    tasks.send_mail.apply_async(args=("bob@example.com",), tm=None, queue="urgent")  # the call wins
    tasks.routed.apply_async(args=("r",), tm=None)                       # task_routes
    defer(tasks.record, "e", _queue="emails", _registry=registry)
    defer(tasks.record, "dd", _registry=registry)                        # defer's "default"

    assert task_client.pending_job_count() == 2
    assert task_client.pending_job_count("default") == 2
    assert task_client.pending_job_count(queue_name) == 2, "'default' is the app's task_default_queue"
    assert task_client.pending_job_count("explicit") == 1
    assert task_client.pending_job_count("mail") == 1
    assert task_client.pending_job_count("urgent") == 1
    assert task_client.pending_job_count("reports") == 1
    assert task_client.pending_job_count("emails") == 1
    assert task_client.pending_job_count("celery") == 0
    assert task_client.pending_job_count(None) == 7
    assert {job.queue_name for job in task_client.jobs.values()} == {
        queue_name, "explicit", "mail", "urgent", "reports", "emails"}


def test_without_task_default_queue_the_default_is_celery(build_app, redis_url, database_url, db, task_client):
    router = build_app(**client_settings(redis_url, database_url))
    defer(tasks.record, "x", _registry=router.registry)
    (job,) = task_client.pending_jobs
    assert job.queue_name == "celery"
    assert task_client.pending_job_count() == task_client.pending_job_count("celery") == 1


def test_eager_apps_are_captured_instead_of_run(build_app, database_url, db, task_client):
    router = build_app(**client_settings("memory://", database_url, task_always_eager=True))
    tm = transaction.TransactionManager(explicit=True)
    with tm:
        tasks.write_row.apply_async(args=("eager-commit",), tm=tm)
    defer(tasks.record, "eager-now", _registry=router.registry)
    assert effects(db) == {}, "an eager task ran although the client was active"
    assert task_client.pending_job_count() == 2
    task_client.drain_pending_jobs()
    assert set(effects(db)) == {"eager-commit", "record:eager-now"}


# -- draining ---------------------------------------------------------------------------------

def test_drain_runs_the_body_in_a_real_task_request_and_commits(app, task_client, tm, db, nothing_sent):
    with tm:
        result = tasks.write_row.apply_async(args=("committed",), tm=tm)
    assert effects(db) == {}
    ran = task_client.drain_pending_jobs()
    report = effects(db)["committed"]
    assert report["task_id"] == result.id, "the run must see the message's task id"
    assert report["tm_explicit"] and report["is_current_request"]
    assert report["home"] == "https://shop.example.com/"
    (job,) = ran
    assert job is task_client.jobs[result.id]
    assert (job.status, job.attempts, job.result) == ("succeeded", 1, "COMMITTED")
    assert task_client.succeeded_jobs == [job] and task_client.pending_jobs == []
    assert task_client.pending_job_count() == 0


def test_drain_takes_only_its_queue(app, registry, task_client, db):
    tasks.send_mail.apply_async(args=("ann@example.com",), tm=None)
    defer(tasks.record, "stays", _registry=registry)
    ran = task_client.drain_pending_jobs("mail")
    assert [job.task_name for job in ran] == ["tests.apps.task_client_app.send_mail"]
    assert list(effects(db)) == ["mail:ann@example.com"]
    assert task_client.pending_job_count() == 1
    task_client.run_pending_jobs()
    assert set(effects(db)) == {"mail:ann@example.com", "record:stays"}


def test_jobs_scheduled_by_jobs_run_in_the_same_drain(app, task_client, tm, db, nothing_sent):
    with tm:
        tasks.chain_step.apply_async(args=(3,), tm=tm)
    assert task_client.pending_job_count() == 1
    ran = task_client.drain_pending_jobs()
    assert len(ran) == 7  # steps 3, 2, 1, 0 and three deferred calls
    assert task_client.pending_jobs == [] and len(task_client.succeeded_jobs) == 7
    keys = effect_keys(db)
    assert [key for key in keys if key.startswith("step:")] == ["step:3", "step:2", "step:1", "step:0"]
    assert {key for key in keys if key.startswith("record:")} == {
        "record:deferred-by-step-3", "record:deferred-by-step-2", "record:deferred-by-step-1"}
    deferred = [job for job in ran if job.function]
    assert {job.function for job in deferred} == {"tests.apps.task_client_app:record"}


def test_a_failed_jobs_transaction_schedules_nothing(app, task_client, db):
    tasks.schedule_then_fail.apply_async(args=("x",), tm=None)
    task_client.drain_pending_jobs(failure_behaviour=TaskFailedBehaviour.DO_NOTHING)
    (job,) = task_client.jobs.values()
    assert job.status == "failed"
    assert isinstance(job.error, ValueError)


def test_canvas_chains_and_links_continue_in_the_drain(app, task_client, tm, db):
    with tm:
        chain(tasks.add.s(1, 2), tasks.add.s(3), tasks.add.s(4)).apply_async(tm=tm)
        tasks.add.apply_async(args=(10, 20), tm=tm, link=tasks.add.s(5))
    task_client.drain_pending_jobs()
    assert effects(db) == {"add:1+2": 3, "add:10+20": 30, "add:3+3": 6, "add:30+5": 35, "add:6+4": 10}
    assert task_client.pending_job_count(None) == 0 and len(task_client.succeeded_jobs) == 5


def test_endless_scheduling_stops_with_a_clear_error(app, task_client):
    task_client.max_runs = 40
    tasks.forever.apply_async(args=(0,), tm=None)
    with pytest.raises(DrainLimitExceeded) as caught:
        task_client.drain_pending_jobs()
    message = str(caught.value)
    assert "ran 40 jobs" in message and "tests.apps.task_client_app.forever x1" in message
    assert "max_runs=" in message
    assert len(task_client.succeeded_jobs) == 40 and task_client.pending_job_count() == 1
    # A drain's own bound wins over the client's.
    with pytest.raises(DrainLimitExceeded, match="ran 3 jobs"):
        task_client.drain_pending_jobs(max_runs=3)
    assert len(task_client.succeeded_jobs) == 43


def test_arguments_arrive_as_a_worker_receives_them(app, task_client):
    sent = tasks.shape.apply_async(args=((1, 2),), kwargs={"when": datetime(2030, 1, 1, tzinfo=timezone.utc)},
                                   tm=None)
    # Refused in the caller as in production (websauna_tasks.payload), never captured.
    with pytest.raises(TypeError, match=r"argument 1 \(object\) cannot travel as JSON"):
        tasks.shape.apply_async(args=(object(),), tm=None)
    task_client.drain_pending_jobs(failure_behaviour="continue")
    assert task_client.jobs[sent.id].result == ["list", "datetime"], "tuples travel as lists"
    assert list(task_client.jobs) == [sent.id]


def test_a_running_job_is_doing(app, task_client):
    seen = {}

    def look(sender=None, task_id=None, **_):
        seen[task_id] = (task_client.jobs[task_id].status, task_client.jobs[task_id].attempts,
                         task_client.pending_job_count())

    first = tasks.write_row.apply_async(args=("one",), tm=None)
    second = tasks.write_row.apply_async(args=("two",), tm=None)
    task_prerun.connect(look, weak=False)
    try:
        task_client.drain_pending_jobs()
    finally:
        task_prerun.disconnect(look)
    assert seen == {first.id: ("doing", 1, 1), second.id: ("doing", 1, 0)}


# -- failures -----------------------------------------------------------------------------------

def test_raise_error_stops_the_drain(app, task_client, db):
    assert task_client.failure_behaviour is TaskFailedBehaviour.RAISE_ERROR
    failing = tasks.fail_always.apply_async(args=("boom",), tm=None)
    after = tasks.write_row.apply_async(args=("after",), tm=None)
    with pytest.raises(TaskFailedError) as caught:
        task_client.drain_pending_jobs()
    error = caught.value
    assert error.job is task_client.jobs[failing.id]
    assert isinstance(error.original_exception, ValueError) and error.__cause__ is error.original_exception
    assert "fail_always" in str(error) and "always fails" in str(error)
    assert error.job.status == "failed" and error.job.attempts == 1
    assert "ValueError" in error.job.traceback
    assert effects(db) == {}, "the failed run's write must be rolled back"
    assert [job.id for job in task_client.pending_jobs] == [after.id], "the drain stopped at the failure"


def test_do_nothing_records_the_failure_and_continues(app, task_client, db):
    task_client.failure_behaviour = TaskFailedBehaviour.DO_NOTHING
    failing = tasks.fail_always.apply_async(args=("boom",), tm=None)
    after = tasks.write_row.apply_async(args=("after",), tm=None)
    task_client.drain_pending_jobs()
    assert [job.id for job in task_client.failed_jobs] == [failing.id]
    assert [job.id for job in task_client.succeeded_jobs] == [after.id]
    assert isinstance(task_client.jobs[failing.id].error, ValueError)
    assert set(task_client.finished_jobs) == set(task_client.jobs.values())
    assert list(effects(db)) == ["after"]


def test_retry_puts_the_job_back_with_one_more_attempt(app, task_client, db):
    key = uuid.uuid4().hex
    flaky = tasks.flaky.apply_async(args=(key, 2), tm=None)
    tasks.write_row.apply_async(args=("between",), tm=None)
    # One run only: the failed job is pending again, its attempt counted.
    with pytest.raises(DrainLimitExceeded):
        task_client.drain_pending_jobs(failure_behaviour="retry", max_runs=1)
    job = task_client.jobs[flaky.id]
    assert (job.status, job.attempts) == ("todo", 1)
    assert isinstance(job.error, ConnectionError)
    assert [pending.task_name for pending in task_client.pending_jobs] == [
        "tests.apps.task_client_app.write_row", "tests.apps.task_client_app.flaky"], "a retried job goes to the back"
    task_client.drain_pending_jobs(failure_behaviour=TaskFailedBehaviour.RETRY_TASK)
    assert (job.status, job.attempts, job.result) == ("succeeded", 3, 3)
    assert list(effects(db)) == ["between", f"flaky:{key}"]
    assert effects(db)[f"flaky:{key}"] == {"runs": 3}


def test_retry_gives_up_after_max_attempts(app, task_client):
    task_client.failure_behaviour = TaskFailedBehaviour.RETRY_TASK
    task_client.max_attempts = 4
    key = uuid.uuid4().hex
    tasks.flaky.apply_async(args=(key, 100), tm=None)
    with pytest.raises(TaskFailedError, match="all 4 attempts") as caught:
        task_client.drain_pending_jobs()
    assert (caught.value.job.status, caught.value.job.attempts) == ("failed", 4)
    assert tasks.flaky_runs[key] == 4


def test_a_deferred_function_that_raises(app, task_client):
    task_client.failure_behaviour = "continue"
    webtest.TestApp(app).get("/defer/broken")
    task_client.drain_pending_jobs("emails")
    (job,) = task_client.failed_jobs
    assert job.function == "tests.apps.task_client_app:explode"
    assert isinstance(job.error, LookupError)


# -- records ---------------------------------------------------------------------------------------

def test_job_records(app, registry, task_client, queue_name):
    before = datetime.now(timezone.utc)
    eta = datetime(2031, 5, 6, 7, 8, 9, tzinfo=timezone(timedelta(hours=3)))
    deferred = defer(tasks.record, "v", _queue="emails", _countdown=600, _name=f"rec-{uuid.uuid4().hex}",
                     _registry=registry)
    at_eta = tasks.write_row.apply_async(args=("e",), tm=None, eta=eta)
    naive = tasks.write_row.apply_async(args=("n",), tm=None, eta=datetime(2032, 1, 1, 12, 0))
    plain = tasks.add.apply_async(args=(1,), kwargs={"b": 2}, tm=None)
    after = datetime.now(timezone.utc)
    jobs = task_client.jobs
    assert list(jobs) == [deferred, at_eta.id, naive.id, plain.id]

    job = jobs[deferred]
    assert isinstance(job, Job) and job.id == deferred
    assert job.queue_name == "emails"
    assert job.task_name == "websauna_tasks.deferred"
    assert job.function == "tests.apps.task_client_app:record"
    assert (job.args, job.kwargs) == (("v",), {})
    assert job.unique_name.startswith("rec-") and job.options["headers"][NAME_HEADER] == job.unique_name
    assert job.status == "todo" and job.attempts == 0
    assert before <= job.captured_at <= after
    assert job.scheduled_at == job.captured_at + timedelta(seconds=600)
    assert job["status"] == "todo" and job["function"] == job.function
    with pytest.raises(KeyError):
        job["message"]

    assert jobs[at_eta.id].scheduled_at == eta and jobs[at_eta.id].scheduled_at.utcoffset() == timedelta(0)
    assert jobs[naive.id].scheduled_at == datetime(2032, 1, 1, 12, 0, tzinfo=timezone.utc), \
        "a naive eta is in the app's time zone (UTC)"
    plain_job = jobs[plain.id]
    assert (plain_job.args, plain_job.kwargs, plain_job.function) == ((1,), {"b": 2}, None)
    assert plain_job.queue_name == queue_name and plain_job.unique_name is None
    assert before <= plain_job.scheduled_at == plain_job.captured_at <= after


def test_future_jobs_run_by_default_or_when_due(app, registry, task_client, db):
    soon = defer(tasks.record, "soon", _registry=registry)
    later = defer(tasks.record, "later", _countdown=3600, _registry=registry)
    ran = task_client.drain_pending_jobs(include_future=False)
    assert [job.id for job in ran] == [soon]
    assert [job.id for job in task_client.pending_jobs] == [later]
    assert task_client.drain_pending_jobs(now=datetime.now(timezone.utc) + timedelta(minutes=30)) == []
    ran = task_client.drain_pending_jobs(now=datetime.now(timezone.utc) + timedelta(hours=2))
    assert [job.id for job in ran] == [later]
    defer(tasks.record, "far", _countdown=86400, _registry=registry)
    assert len(task_client.drain_pending_jobs()) == 1, "by default every pending job runs"
    assert set(effects(db)) == {"record:soon", "record:later", "record:far"}
    with pytest.raises(ValueError, match="aware"):
        task_client.drain_pending_jobs(now=datetime(2030, 1, 1))


def test_reset_forgets_every_job_and_frees_their_names(app, registry, task_client, db):
    name = f"reset-{uuid.uuid4().hex}"
    first = defer(tasks.record, "a", _name=name, _registry=registry)
    assert defer(tasks.record, "b", _name=name, _registry=registry) == first, "the name is held"
    tasks.write_row.apply_async(args=("done",), tm=None, queue="other")
    task_client.drain_pending_jobs("other")
    assert len(task_client.finished_jobs) == 1 and len(task_client.pending_jobs) == 1
    task_client.reset()
    assert task_client.jobs == {} and task_client.pending_jobs == [] and task_client.finished_jobs == []
    assert task_client.pending_job_count(None) == 0
    second = defer(tasks.record, "c", _name=name, _registry=registry)
    assert second != first, "reset() must free the names of jobs that will never run"
    task_client.drain_pending_jobs()
    assert list(effects(db)) == ["done", "record:c"]


def test_a_drained_job_frees_its_name_and_sees_its_headers(app, registry, task_client, db):
    name = f"drain-{uuid.uuid4().hex}"
    first = defer(tasks.record, "x", _name=name, _registry=registry)
    assert defer(tasks.record, "y", _name=name, _registry=registry) == first
    task_client.drain_pending_jobs()
    again = defer(tasks.record, "z", _name=name, _registry=registry)
    assert again != first, "task_postrun did not free the name of the drained job"
    unique = tasks.write_row.apply_async(args=("unique",), tm=None, unique_name=f"u-{name}")
    task_client.drain_pending_jobs()
    assert effects(db)["unique"]["headers"][NAME_HEADER] == f"u-{name}"
    assert effects(db)["unique"]["task_id"] == unique.id


# -- the client as a sink -----------------------------------------------------------------------

def test_a_client_restores_the_previous_sink_and_frees_unrun_names(app, registry, task_client, redis_client,
                                                                    queue_name):
    assert current_sink() is task_client
    name = f"inner-{uuid.uuid4().hex}"
    with TaskClient() as inner:
        assert current_sink() is inner
        held = defer(tasks.record, "inner", _name=name, _registry=registry)
    assert current_sink() is task_client
    assert task_client.jobs == {} and list(inner.jobs) == [held]
    assert defer(tasks.record, "outer", _name=name, _registry=registry) != held
    with pytest.raises(RuntimeError, match="already active"):
        task_client.activate()


def test_without_a_client_messages_reach_the_broker(app, registry, redis_client, queue_name):
    assert current_sink() is None
    task_id = defer(tasks.record, "sent", _registry=registry)
    assert [message["headers"]["id"] for message in queued_messages(redis_client, queue_name)] == [task_id]


INNER_TESTS = '''
from websauna_tasks import dispatch


def current_sink():
    sink = dispatch.set_message_sink(None)
    dispatch.set_message_sink(sink)
    return sink


def test_fails_while_capturing(task_client):
    assert current_sink() is task_client
    raise AssertionError("this inner test fails on purpose")


def test_errors_in_setup(task_client, missing_fixture):
    pass


def test_passes(task_client):
    assert current_sink() is task_client
'''


def test_the_fixture_restores_the_sink_even_when_the_test_fails(pytester, task_client):
    pytester.makepyfile(test_inner=INNER_TESTS)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1, errors=1)
    result.stdout.fnmatch_lines(["*this inner test fails on purpose*"])
    assert current_sink() is task_client, "the inner fixture did not put the outer client back"


@pytest.mark.integration(reason="three pytest processes: too slow for the unit tier")
def test_the_plugin_comes_from_the_entry_point(pytester):
    pytester.makepyfile(test_inner=INNER_TESTS)
    listed = pytester.runpytest_subprocess("--fixtures", "-p", "no:cacheprovider")
    listed.stdout.fnmatch_lines(["*task_client*", "*ws_celery_worker_factory*"])
    ran = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-k", "passes")
    ran.assert_outcomes(passed=1)
    without = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:websauna_tasks", "-k", "passes")
    without.assert_outcomes(errors=1)
    without.stdout.fnmatch_lines(["*fixture 'task_client' not found*"])


# -- the seeds' examples, rewritten ----------------------------------------------------------------

def test_enqueue(task_client: TaskClient, app, db) -> None:
    """The Blue Alliance's FakeTaskClient example (``do_something`` is module level here)."""
    assert task_client.pending_job_count("testing") == 0

    defer(tasks.do_something, _queue="testing", _registry=app.registry)

    assert task_client.pending_job_count("testing") == 1

    task_client.drain_pending_jobs("testing")

    assert task_client.pending_job_count("testing") == 0
    assert effects(db) == {"do_something": "done"}


def test_me_success(app, task_client, db) -> None:
    """Taiga's TestTasksQueueManager example, with a webtest client."""
    client = webtest.TestApp(app)

    # Check if the tasks queue is empty
    assert len(task_client.jobs) == 0

    client.get("/defer/welcome")
    client.get("/defer/broken")
    client.get("/order/42")

    # Check if the tasks queue has...
    assert len(task_client.pending_jobs) > 0
    assert task_client.pending_job_count("emails") == 2

    # Run pending jobs; a failing one is recorded and the others still run
    task_client.run_pending_jobs(failure_behaviour=TaskFailedBehaviour.DO_NOTHING)

    assert len(task_client.finished_jobs) > 0   # failed + succeeded
    assert len(task_client.failed_jobs) > 0
    assert len(task_client.succeeded_jobs) > 0
    assert set(effects(db)) == {"record:welcome", "42"}

    # Reset all queues
    task_client.reset()
    assert len(task_client.jobs) == 0
