"""Websauna code that moves over unchanged (issue 16, points 2 to 5).

- ``self.request.request`` is the run's Pyramid request (``self.get_request()``);
- ``request.transaction_manager`` is ``request.tm``, on web and task requests;
- ``websauna_tasks.retryable(tm=...)`` runs a function in transactions of its
  own, retried on a real serialization failure, in a task and in web code;
- touching ``request.dbsession`` outside a transaction says what to do.

The tasks and views live in tests/apps/websauna_compat_app.py.
"""
from __future__ import annotations

import pytest
import sqlalchemy
import transaction
import webtest
import zope.sqlalchemy
from sqlalchemy import text
from sqlalchemy.orm import Session
from transaction.interfaces import AlreadyInTransaction, NoTransaction, TransientError

import websauna_tasks
from tests.apps import websauna_compat_app as compat
from tests.test_worker_request import HOME_URL, SITE_URL, effect_rows, worker_settings
from websauna_tasks import retryable
from websauna_tasks.db import MissingTransaction
from websauna_tasks.request import task_request
from websauna_tasks.retry import TransactionInProgress
from websauna_tasks.testing import wait_for

IN_MEMORY = {"websauna.celery_config": "{'broker_url': 'memory://'}", "websauna.site_url": SITE_URL}


@pytest.fixture
def memory_app(built_apps):
    router = compat.main({}, **IN_MEMORY)
    built_apps.append(router)
    return router


@pytest.fixture
def compat_settings(redis_url, database_url, queue_name, db) -> dict[str, str]:
    return worker_settings(redis_url, database_url, queue_name, **{"sqlalchemy.isolation_level": "SERIALIZABLE"})


@pytest.fixture
def compat_app(compat_settings, built_apps):
    """The sending side (and in-process runs) of the compat app on PostgreSQL and Redis."""
    router = compat.main({}, **compat_settings)
    built_apps.append(router)
    return router


@pytest.fixture
def compat_worker(compat_settings, compat_app, tmp_path, ws_celery_worker_factory, subprocess_env):
    lines = ["[app:main]", "use = call:tests.apps.websauna_compat_app:main"]
    # ConfigParser interpolation: percent signs in values must be doubled.
    lines += [f"{key} = {value.replace('%', '%%')}" for key, value in compat_settings.items()]
    ini = tmp_path / "websauna_compat.ini"
    ini.write_text("\n".join(lines) + "\n")
    return ws_celery_worker_factory(str(ini), "worker", "-c", "2", "-l", "info", env=subprocess_env)


def counters(db) -> dict[int, int]:
    with db.connect() as conn:
        return dict(conn.execute(text("SELECT id, value FROM ws_test_counter ORDER BY id")).all())


def insert_counters(db, *ids: int) -> None:
    with db.begin() as conn:
        for counter_id in ids:
            conn.execute(text("INSERT INTO ws_test_counter (id, value) VALUES (:id, 0)"), {"id": counter_id})


def assert_request_report(report: dict) -> None:
    assert report["same_as_get_request"], "self.request.request is not the run's request"
    assert report["alias_is_tm"], "request.transaction_manager is not request.tm on the task request"
    assert report["tm_explicit"]
    assert report["route_url"] == HOME_URL
    assert "request" not in report["custom_headers"], "the request would travel with a retry's message"


# -- 2. self.request.request ---------------------------------------------------------

def test_self_request_request_is_the_run_request_in_eager_apply(memory_app):
    assert_request_report(compat.request_of_context.apply(throw=True).get())


def test_self_request_request_when_the_task_is_called_directly(memory_app):
    assert_request_report(compat.request_of_context())
    # The context pushed for the direct call is gone: nothing keeps the closed request.
    assert compat.request_of_context.request_stack.top is None
    assert getattr(compat.request_of_context.request, "request", None) is None


def test_self_request_request_survives_a_retry_in_eager_mode(memory_app):
    report = compat.retry_once.apply().get()  # throw=True would raise the Retry itself
    assert_request_report(report)
    assert report["retries"] == 1


@pytest.mark.slow
def test_self_request_request_in_a_real_worker(compat_worker, db):
    plain = compat.request_of_context.apply_async(tm=None)
    # self.retry() republishes the message from the run's context: the request must not ride along.
    retried = compat.retry_once.apply_async(tm=None)
    transactional = compat.transactional_request.apply_async(tm=None)
    for result in (plain, retried, transactional):
        assert_request_report(result.get(timeout=30))
    assert retried.get()["retries"] == 1
    assert plain.get()["pid"] != compat_worker.pid, "ran in the worker parent, not a pool child"
    # The demo-task form, self.request.request.dbsession, wrote in the run's transaction.
    assert effect_rows(db, transactional.id) == [(transactional.id, "via self.request.request")]


# -- 3. request.transaction_manager ------------------------------------------------------

def test_transaction_manager_is_request_tm_on_web_requests(memory_app):
    response = webtest.TestApp(memory_app).get("/compat/tm-alias")
    assert response.text == "same=True follows=True"


def test_transaction_manager_is_request_tm_on_task_requests(memory_app):
    with task_request(memory_app.registry) as request:
        assert request.transaction_manager is request.tm
        replacement = transaction.TransactionManager(explicit=True)
        request.transaction_manager = replacement
        assert request.tm is replacement


def test_transaction_manager_schedules_on_commit_as_in_the_seed_view(memory_app, task_client):
    """The seed's view: apply_async(..., tm=request.transaction_manager) waits for that commit."""
    with task_request(memory_app.registry) as request:
        with request.transaction_manager:
            compat.request_of_context.apply_async(tm=request.transaction_manager)
            assert task_client.pending_job_count() == 0
        assert task_client.pending_job_count() == 1


# -- 4. retryable -------------------------------------------------------------------------

class RecordingDataManager:
    """A data manager that only records how its transaction ended."""

    def __init__(self, tm: transaction.TransactionManager, outcomes: list[str]):
        self.transaction_manager = tm
        self.outcomes = outcomes

    def abort(self, txn):
        self.outcomes.append("abort")

    def tpc_begin(self, txn):
        pass

    def commit(self, txn):
        pass

    def tpc_vote(self, txn):
        pass

    def tpc_finish(self, txn):
        self.outcomes.append("commit")

    def tpc_abort(self, txn):
        self.outcomes.append("abort")

    def sortKey(self):  # noqa: N802 - the IDataManager interface
        return "recording"


def test_retryable_is_public():
    assert "retryable" in websauna_tasks.__all__
    assert websauna_tasks.retryable is retryable


def test_retryable_runs_each_call_in_its_own_transaction_retrying_transient_errors():
    tm = transaction.TransactionManager(explicit=True)
    outcomes: list[str] = []
    calls = []

    @retryable(tm=tm, attempts=4)
    def step(value):
        tm.get().join(RecordingDataManager(tm, outcomes))
        calls.append(value)
        if len(calls) < 3:
            raise TransientError(f"conflict {len(calls)}")
        return value * 2

    assert step(21) == 42
    assert calls == [21, 21, 21]
    assert outcomes == ["abort", "abort", "commit"]
    with pytest.raises(NoTransaction):
        tm.get()  # committed and ended: no transaction left open


def test_retryable_gives_up_after_its_attempts_and_does_not_retry_other_errors():
    tm = transaction.TransactionManager(explicit=True)
    calls = []

    @retryable(tm=tm, attempts=2)
    def conflicting():
        calls.append("conflict")
        raise TransientError("always")

    @retryable(tm=tm, attempts=5)
    def broken():
        calls.append("broken")
        raise ValueError("not a conflict")

    with pytest.raises(TransientError):
        conflicting()
    with pytest.raises(ValueError):
        broken()
    assert calls == ["conflict", "conflict", "broken"]


def test_retryable_block_form_retries_the_block():
    tm = transaction.TransactionManager(explicit=True)
    outcomes: list[str] = []
    runs = 0
    for attempt in retryable(tm=tm, attempts=3):
        with attempt:
            tm.get().join(RecordingDataManager(tm, outcomes))
            runs += 1
            if runs == 1:
                raise TransientError("first run conflicts")
    assert runs == 2
    assert outcomes == ["abort", "commit"]


def test_retryable_refuses_a_manager_already_in_a_transaction(memory_app):
    # A TransactionalTask body runs in request.tm: retryable cannot have a transaction of its own there.
    with pytest.raises(TransactionInProgress, match="already has a transaction in progress") as caught:
        compat.retryable_in_transactional.apply(throw=True)
    assert isinstance(caught.value, AlreadyInTransaction)
    assert "TransactionalTask" in str(caught.value)
    # A view under pyramid_tm: the same, said as clearly.
    response = webtest.TestApp(memory_app).get("/compat/retryable-in-view")
    assert response.text.startswith("refused: retryable_in_view.<locals>.step: its transaction manager already has")


def test_retryable_uses_the_retry_attempts_setting(built_apps):
    router = compat.main({}, **IN_MEMORY, **{"websauna_tasks.retry_attempts": "5"})
    built_apps.append(router)
    calls = []
    with task_request(router.registry) as request:
        @retryable(tm=request.tm)
        def conflicting():
            calls.append(1)
            raise TransientError("always")

        with pytest.raises(TransientError):
            conflicting()
    assert len(calls) == 5


def test_retryable_retries_a_real_serialization_failure_in_web_code(database_url, db):
    """Web code with a plain transaction.TransactionManager and a zope.sqlalchemy session."""
    insert_counters(db, 1)
    engine = sqlalchemy.create_engine(database_url, isolation_level="SERIALIZABLE")
    try:
        tm = transaction.TransactionManager(explicit=True)
        session = Session(bind=engine)
        # "changed": the writes are raw SQL, which zope.sqlalchemy would otherwise roll back.
        zope.sqlalchemy.register(session, transaction_manager=tm, initial_state="changed")
        attempts = []

        @retryable(tm=tm)
        def bump():
            attempts.append(1)
            return compat.read_then_write(session, engine, 1, interfere=len(attempts) == 1)

        assert bump() == 101
        assert len(attempts) == 2
        assert counters(db) == {1: 101}
        session.close()
    finally:
        engine.dispose()


def test_retryable_block_form_retries_a_real_serialization_failure(database_url, db):
    insert_counters(db, 1)
    engine = sqlalchemy.create_engine(database_url, isolation_level="SERIALIZABLE")
    try:
        tm = transaction.TransactionManager(explicit=True)
        session = Session(bind=engine)
        # "changed": the writes are raw SQL, which zope.sqlalchemy would otherwise roll back.
        zope.sqlalchemy.register(session, transaction_manager=tm, initial_state="changed")
        errors = []
        for attempt in retryable(tm=tm, on_retry=lambda number, exc: errors.append(exc)):
            with attempt:
                value = compat.read_then_write(session, engine, 1, interfere=not errors)
        assert value == 101
        assert len(errors) == 1
        assert getattr(errors[0].orig, "sqlstate", None) == "40001", errors[0]
        assert counters(db) == {1: 101}
        session.close()
    finally:
        engine.dispose()


def test_retryable_steps_in_process_on_postgresql(compat_app, db):
    insert_counters(db, 1, 2, 3)
    result = compat.build_counters_task.apply(args=(2,), throw=True).get()
    assert result == {"values": {"1": 1, "2": 101, "3": 1}, "attempts": {"1": 1, "2": 2, "3": 1}}
    assert counters(db) == {1: 1, 2: 101, 3: 1}


@pytest.mark.slow
def test_retryable_steps_retry_a_serialization_failure_in_a_real_worker(compat_worker, db):
    """The seed's build_seo_data shape: @retryable(tm=request.tm) steps in a plain WebsaunaTask."""
    insert_counters(db, 1, 2, 3)
    result = compat.build_counters_task.apply_async(args=(2,), tm=None).get(timeout=60)
    # Counter 2's first transaction lost to a concurrent commit (+100) and was run again.
    assert result == {"values": {"1": 1, "2": 101, "3": 1}, "attempts": {"1": 1, "2": 2, "3": 1}}
    assert counters(db) == {1: 1, 2: 101, 3: 1}
    wait_for(lambda: "_run_for_id: transient conflict on attempt 1/3 (OperationalError)" in compat_worker.output(),
             describe=lambda: compat_worker.output()[-3000:])


# -- 5. request.dbsession outside a transaction ---------------------------------------------

def test_dbsession_outside_a_transaction_says_what_to_do(compat_app, db):
    result = compat.dbsession_outside_tm.apply(args=("written after",), throw=True)
    error = result.get()
    assert error is not None and error.startswith("MissingTransaction: ")
    for advice in ("with request.tm:", "TransactionalTask", "retryable(tm=request.tm)"):
        assert advice in error, error
    # The refused use left nothing behind: the same session then joins `with request.tm:` and commits.
    assert effect_rows(db, result.id) == [(result.id, "written after")]


def test_missing_transaction_is_still_a_no_transaction(compat_app):
    with task_request(compat_app.registry) as request:
        with pytest.raises(NoTransaction) as caught:
            request.dbsession.execute(text("SELECT 1"))
    assert type(caught.value) is MissingTransaction
    assert "with request.tm:" in str(caught.value)
