"""defer_iteration_with_finalize(): sharded iteration, durable progress, exactly-once rows, one finalize."""
from __future__ import annotations

import json
import os
import time

import pytest
import transaction
from sqlalchemy import text

from tests.apps import iteration_jobs as jobs
from websauna_tasks import (
    DeferNotAllowed,
    defer_iteration_with_finalize,
    get_celery,
    get_deferred_shard_index,
    iteration_progress,
)
from websauna_tasks.dispatch import set_message_sink
from websauna_tasks.iteration import (
    BATCH_SIZE_KEY,
    MAX_FAILURES_KEY,
    SHARD_TASK_NAME,
    TIME_BUDGET_KEY,
    IterationQueryError,
    run_shard,
)
from websauna_tasks.testing import wait_for


@pytest.fixture
def tables(db):
    with db.begin() as conn:
        for statement in jobs.TABLES.strip().split(";\n"):
            conn.execute(text(statement))
    return db


def add_items(db, count: int) -> None:
    with db.begin() as conn:
        conn.execute(text("INSERT INTO ws_iter_items (id, value, touched) "
                          "SELECT g, g % 7, 0 FROM generate_series(1, :n) g"), {"n": count})


def scalar(db, sql: str, **params):
    with db.connect() as conn:
        return conn.execute(text(sql), params).scalar()


def finalized_rows(db, label: str) -> list[tuple[str, int]]:
    with db.connect() as conn:
        return [tuple(row) for row in conn.execute(
            text("SELECT shard_index, pid FROM ws_iter_finalized WHERE label = :label"), {"label": label})]


@pytest.fixture
def eager_app(make_app, database_url, tables):
    def factory(**extra):
        config = {"broker_url": "memory://", "task_always_eager": True}
        return make_app(**{"websauna.celery_config": repr(config), "sqlalchemy.url": database_url, **extra})

    return factory


class Captured:
    """A dispatch message sink: what would have been sent, kept instead."""

    def __init__(self):
        self.messages = []

    def capture(self, message):
        self.messages.append(message)


@pytest.fixture
def captured():
    sink = Captured()
    previous = set_message_sink(sink)
    yield sink
    set_message_sink(previous)


@pytest.fixture
def plain_app(make_app):
    """No database, no worker: enough to validate a call."""
    return make_app(**{"websauna.celery_config": repr({"broker_url": "memory://"})})


# -- what travels, and what is refused at call time ------------------------------------------------

def test_start_message_carries_the_query_as_json(plain_app, captured):
    registry = plain_app.registry
    first = defer_iteration_with_finalize(jobs.Item, jobs.process, jobs.finalize, "a", fail_on=[3],
                                          _registry=registry)
    defer_iteration_with_finalize({"factory": jobs.items_from, "args": [2]}, jobs.process, jobs.finalize, "b",
                                  _shards=3, _batch_size=7, _registry=registry)
    defer_iteration_with_finalize("tests.apps.iteration_jobs:items_from", jobs.process, jobs.finalize, "c",
                                  _registry=registry)
    defer_iteration_with_finalize({"model": "tests.apps.iteration_jobs:Item", "filters": {"value": [1, 2]}},
                                  jobs.process, jobs.finalize, "d", _registry=registry)
    plans = []
    for message in captured.messages:
        path, (iteration_id, plan), kwargs = message.args
        assert path == "websauna_tasks.iteration:start_iteration" and kwargs == {}
        json.dumps(plan)  # plain JSON
        plans.append((iteration_id, plan))
    assert plans[0][0] == first
    assert plans[0][1] == {"callback": "tests.apps.iteration_jobs:process",
                           "finalize": "tests.apps.iteration_jobs:finalize",
                           "query": {"model": "tests.apps.iteration_jobs:Item", "filters": {}}, "args": ["a"],
                           "kwargs": {"fail_on": [3]}, "shards": 5, "batch_size": None, "queue": "default"}
    assert plans[1][1]["query"] == {"factory": "tests.apps.iteration_jobs:items_from", "args": [2], "kwargs": {}}
    assert (plans[1][1]["shards"], plans[1][1]["batch_size"]) == (3, 7)
    assert plans[2][1]["query"] == {"factory": "tests.apps.iteration_jobs:items_from", "args": [], "kwargs": {}}
    assert plans[3][1]["query"] == {"model": "tests.apps.iteration_jobs:Item", "filters": {"value": [1, 2]}}


@pytest.mark.parametrize("query, match", [
    (jobs.Tag, r"tests.apps.iteration_jobs:Tag has primary key \(name VARCHAR\(40\)\); sharded iteration needs a "
               "single integer primary key"),
    (jobs.Pair, r"has primary key \(left INTEGER, right INTEGER\)"),
    (jobs.all_tags, "single integer primary key"),
    ("tests.apps.iteration_jobs:no_such_factory", "tests.apps.iteration_jobs:no_such_factory cannot be found"),
    ("tests.no_such_module:factory", "tests.no_such_module:factory cannot be found"),
    ("tests.apps.iteration_jobs.items_from", "expected 'package.module:name'"),
    (jobs.not_a_select, "returned str, not a select"),
    (jobs.item_ids, "select\\(Model\\) of exactly one mapped class"),
    (jobs.first_ten_items, "limit\\(\\)/offset\\(\\) cannot be sharded"),
    ({"model": jobs.Item, "filters": {"colour": "red"}}, "has no column attribute 'colour'"),
    ({"table": "ws_iter_items"}, "expected {'model'"),
])
def test_bad_queries_are_refused_at_call_time(plain_app, captured, query, match):
    with pytest.raises(IterationQueryError, match=match):
        defer_iteration_with_finalize(query, jobs.process, jobs.finalize, "x", _registry=plain_app.registry)
    assert captured.messages == []


def test_a_select_object_is_refused_with_the_way_out(plain_app, captured):
    with pytest.raises(TypeError, match="a select\\(\\) cannot travel as JSON; return it from a module-level factory"):
        defer_iteration_with_finalize(jobs.items_from(), jobs.process, jobs.finalize, _registry=plain_app.registry)
    assert captured.messages == []


def test_callbacks_outside_the_allow_list_and_bad_arguments_are_refused(plain_app, captured):
    registry = plain_app.registry
    with pytest.raises(DeferNotAllowed, match="callback: defer\\(\\): json:dumps is not allowed"):
        defer_iteration_with_finalize(jobs.Item, json.dumps, jobs.finalize, _registry=registry)
    with pytest.raises(DeferNotAllowed, match="finalize: defer\\(\\): os:getcwd|finalize: defer\\(\\): posix:getcwd"):
        defer_iteration_with_finalize(jobs.Item, jobs.process, os.getcwd, _registry=registry)
    with pytest.raises(TypeError, match="callback: .*not a module-level function"):
        defer_iteration_with_finalize(jobs.Item, lambda item: None, jobs.finalize, _registry=registry)
    with pytest.raises(TypeError, match="keyword argument 'when' \\(object\\) cannot travel as JSON"):
        defer_iteration_with_finalize(jobs.Item, jobs.process, jobs.finalize, "x", when=object(), _registry=registry)
    with pytest.raises(TypeError, match="unknown option\\(s\\) _countdown"):
        defer_iteration_with_finalize(jobs.Item, jobs.process, jobs.finalize, _countdown=3, _registry=registry)
    with pytest.raises(ValueError, match="_shards must be a positive int"):
        defer_iteration_with_finalize(jobs.Item, jobs.process, jobs.finalize, _shards=0, _registry=registry)
    assert captured.messages == []


def test_model_outside_the_allow_list_is_refused(make_app, captured):
    router = make_app(**{"websauna.celery_config": repr({"broker_url": "memory://"}),
                         "websauna_tasks.defer_allowed_modules":
                             "tests.apps.deferred_functions tests.apps.iteration_jobs"})
    defer_iteration_with_finalize(jobs.Item, jobs.process, jobs.finalize, "ok", _registry=router.registry)
    with pytest.raises(DeferNotAllowed, match="query model: defer\\(\\): tests.apps.sample_tasks:Nope is not allowed"):
        defer_iteration_with_finalize({"model": "tests.apps.sample_tasks:Nope"}, jobs.process, jobs.finalize,
                                      _registry=router.registry)
    assert len(captured.messages) == 1


def test_shard_index_is_none_outside_callbacks():
    assert get_deferred_shard_index() is None


# -- eager mode on PostgreSQL: every path of a shard, deterministically --------------------------

def progress_of(app, iteration_id):
    return iteration_progress(iteration_id, registry=app.registry)


def test_eager_iteration_with_filters_processes_each_row_once(eager_app, tables):
    app = eager_app(**{BATCH_SIZE_KEY: "9"})
    add_items(tables, 300)
    iteration_id = defer_iteration_with_finalize(
        {"model": jobs.Item, "filters": {"value": [0, 1, 2]}}, jobs.process, jobs.finalize, "filtered",
        _shards=4, _registry=app.registry)
    expected = scalar(tables, "SELECT count(*) FROM ws_iter_items WHERE value IN (0, 1, 2)")
    assert scalar(tables, "SELECT count(*) FROM ws_iter_processed") == expected
    assert scalar(tables, "SELECT count(*) FROM ws_iter_items WHERE touched <> (value IN (0, 1, 2))::int") == 0
    assert finalized_rows(tables, "filtered") == [("None", os.getpid())]
    progress = progress_of(app, iteration_id)
    assert (progress.state, progress.rows_done, progress.total, progress.finalized) == ("done", expected, expected,
                                                                                        True)
    # [min pk, max pk] of the filtered rows (1 and 296) in four equal ranges.
    assert [(s.first_pk, s.last_pk) for s in progress.shards] == [(1, 74), (75, 148), (149, 222), (223, 296)]
    # The callback saw its shard's index: every row is inside that shard's range.
    with tables.connect() as conn:
        for item_id, shard in conn.execute(text("SELECT item_id, shard FROM ws_iter_processed")):
            assert progress.shards[shard].first_pk <= item_id <= progress.shards[shard].last_pk
    assert progress.as_dict()["shards"][0]["state"] == "done"


def test_eager_failure_after_progress_continues_in_a_new_task(eager_app, tables):
    app = eager_app(**{BATCH_SIZE_KEY: "10"})
    add_items(tables, 100)
    # Row 35 fails once, in the fourth batch of the only shard: three batches are committed by then.
    iteration_id = defer_iteration_with_finalize(jobs.Item, jobs.process, jobs.finalize, "after-progress",
                                                 fail_on=[35], _shards=1, _registry=app.registry)
    (shard,) = progress_of(app, iteration_id).shards
    assert (shard.state, shard.rows_done, shard.redefers, shard.failures) == ("done", 100, 1, 0)
    assert "failing once on purpose" in shard.last_error
    assert scalar(tables, "SELECT count(*) FROM ws_iter_processed") == 100
    # The failed batch's ORM writes were rolled back with its cursor: every row touched once.
    assert scalar(tables, "SELECT count(*) FROM ws_iter_items WHERE touched <> 1") == 0
    assert len(finalized_rows(tables, "after-progress")) == 1


def test_eager_failure_without_progress_goes_on_in_a_new_run(eager_app, tables, caplog):
    # In a worker Celery retries such a run (the 10,000-row test below); an eager run cannot be retried.
    app = eager_app(**{BATCH_SIZE_KEY: "10"})
    add_items(tables, 40)
    iteration_id = defer_iteration_with_finalize(jobs.Item, jobs.process, jobs.finalize, "no-progress",
                                                 fail_on=[1], _shards=1, _registry=app.registry)
    (shard,) = progress_of(app, iteration_id).shards
    assert (shard.state, shard.rows_done, shard.redefers, shard.failures) == ("done", 40, 1, 0)
    assert "eager run failed with RuntimeError('item 1: failing once on purpose'); continuing in a new task" \
        in caplog.text
    assert scalar(tables, "SELECT count(*) FROM ws_iter_items WHERE touched <> 1") == 0
    assert len(finalized_rows(tables, "no-progress")) == 1


def test_eager_persistent_failure_marks_the_shard_failed_and_never_finalizes(eager_app, tables, caplog):
    app = eager_app(**{BATCH_SIZE_KEY: "2", MAX_FAILURES_KEY: "3"})
    add_items(tables, 10)
    iteration_id = defer_iteration_with_finalize(jobs.Item, jobs.process_or_always_fail, jobs.finalize, "doomed",
                                                 fail_on=[5], _shards=1, _registry=app.registry)
    progress = progress_of(app, iteration_id)
    (shard,) = progress.shards
    # Rows 1-4 committed; row 5 failed after progress (re-defer), again without progress (eagerly: a new
    # run; in a worker: a Celery retry), and a third time: the limit, the shard gives up.
    assert (progress.state, progress.finalized, shard.state) == ("failed", False, "failed")
    assert (shard.rows_done, shard.cursor_pk, shard.redefers, shard.failures) == (4, 4, 2, 3)
    assert shard.last_error == "RuntimeError: item 5: failing every time"
    assert finalized_rows(tables, "doomed") == []
    assert "RuntimeError('item 5: failing every time'), failure 3 in a row since its last committed batch; " \
           "the shard is marked failed and finalize will not run" in caplog.text


def test_eager_zero_rows_finalizes_once(eager_app, tables):
    app = eager_app()
    add_items(tables, 20)
    iteration_id = defer_iteration_with_finalize(jobs.no_items, jobs.process, jobs.finalize, "empty",
                                                 _registry=app.registry)
    progress = progress_of(app, iteration_id)
    assert (progress.state, progress.rows_done, progress.total, progress.finalized, progress.shards) == (
        "done", 0, 0, True, ())
    assert len(finalized_rows(tables, "empty")) == 1
    assert scalar(tables, "SELECT count(*) FROM ws_iter_processed") == 0


def test_transactional_start_waits_for_the_commit(eager_app, tables):
    app = eager_app()
    add_items(tables, 5)
    tm = transaction.TransactionManager(explicit=True)
    with pytest.raises(RuntimeError):
        with tm:
            aborted = defer_iteration_with_finalize(jobs.Item, jobs.process, jobs.finalize, "aborted",
                                                    _transactional=True, _tm=tm, _registry=app.registry)
            raise RuntimeError("the caller failed")
    assert progress_of(app, aborted) is None
    with tm:
        committed = defer_iteration_with_finalize(jobs.Item, jobs.process, jobs.finalize, "committed",
                                                  _transactional=True, _tm=tm, _registry=app.registry)
        assert progress_of(app, committed) is None, "started before the commit"
    assert progress_of(app, committed).rows_done == 5
    assert finalized_rows(tables, "aborted") == [] and len(finalized_rows(tables, "committed")) == 1


def test_stale_and_duplicate_shard_messages_do_nothing_and_finalize_stays_once(eager_app, tables):
    app = eager_app(**{BATCH_SIZE_KEY: "4"})
    add_items(tables, 12)
    iteration_id = defer_iteration_with_finalize(jobs.Item, jobs.process, jobs.finalize, "fenced", _shards=2,
                                                 _registry=app.registry)
    task = get_celery(app.registry).tasks[SHARD_TASK_NAME]
    assert task.apply(args=(iteration_id, 0, 0)).get() == "stale"      # a duplicate of a finished shard
    assert task.apply(args=("no-such-iteration", 0, 0)).get() == "missing"
    # Shard 1 reopened as if run 3 owned it: an older run's message is fenced off, run 3's finishes it
    # again, and the finalize claim, already taken, is not taken twice.
    with tables.begin() as conn:
        conn.execute(text("UPDATE websauna_tasks_iteration_shards SET state = 'running', run = 3 "
                          "WHERE iteration_id = :id AND shard_index = 1"), {"id": iteration_id})
    assert task.apply(args=(iteration_id, 1, 2)).get() == "stale"
    assert task.apply(args=(iteration_id, 1, 3)).get() == "done"
    assert scalar(tables, "SELECT count(*) FROM ws_iter_processed") == 12
    assert len(finalized_rows(tables, "fenced")) == 1
    assert run_shard.name == SHARD_TASK_NAME


def test_progress_of_an_unknown_iteration_is_none(eager_app):
    assert progress_of(eager_app(), "0" * 32) is None


# -- the scenario with a real worker ---------------------------------------------------------

def worker_settings(redis_url: str, database_url: str, queue_name: str, **extra: str) -> dict[str, str]:
    celery = {"broker_url": redis_url, "task_default_queue": queue_name}
    return {"websauna.celery_config": repr(celery), "sqlalchemy.url": database_url, **extra}


@pytest.mark.slow
def test_ten_thousand_rows_in_five_shards_with_a_failure_and_a_tiny_time_budget(
        make_app, redis_url, database_url, queue_name, redis_client, tables, write_ini, ws_celery_worker_factory,
        subprocess_env):
    settings = worker_settings(redis_url, database_url, queue_name,
                               **{TIME_BUDGET_KEY: "0.2", BATCH_SIZE_KEY: "50"})
    worker = ws_celery_worker_factory(write_ini(settings), "worker", "-c", "2", env=subprocess_env)
    app = make_app(**settings)
    add_items(tables, 10_000)

    started = time.monotonic()
    # 3333: mid-shard 1 (pk 2001-4000). 6001: the first row of shard 3, so its first run fails
    # before any progress and Celery retries it.
    iteration_id = defer_iteration_with_finalize(jobs.Item, jobs.process, jobs.finalize, "big", fail_on=[3333, 6001],
                                                 _shards=5, _registry=app.registry)

    def finished():
        progress = iteration_progress(iteration_id, registry=app.registry)
        return progress if progress is not None and progress.finalized and finalized_rows(tables, "big") else None

    progress = wait_for(finished, timeout=60, interval=0.2, describe=lambda: worker.output()[-4000:])
    elapsed = time.monotonic() - started
    time.sleep(1.0)  # a second finalize, were there one, would have time to land

    assert scalar(tables, "SELECT count(*) FROM ws_iter_processed WHERE label = 'big'") == 10_000
    assert scalar(tables, "SELECT count(DISTINCT item_id) FROM ws_iter_processed") == 10_000
    assert scalar(tables, "SELECT count(*) FROM ws_iter_items WHERE touched <> 1") == 0
    assert scalar(tables, "SELECT array_agg(item_id ORDER BY item_id) FROM ws_iter_failed_once") == [3333, 6001]
    ((shard_seen, pid),) = finalized_rows(tables, "big")
    assert shard_seen == "None" and pid != os.getpid()

    progress = iteration_progress(iteration_id, registry=app.registry)
    assert (progress.state, progress.rows_done, progress.total) == ("done", 10_000, 10_000)
    assert [(s.index, s.state, s.rows_done, s.total) for s in progress.shards] == [
        (index, "done", 2000, 2000) for index in range(5)]
    assert [(s.first_pk, s.last_pk) for s in progress.shards] == [
        (1, 2000), (2001, 4000), (4001, 6000), (6001, 8000), (8001, 10_000)]
    redefers = [s.redefers for s in progress.shards]
    assert all(count >= 2 for count in redefers), redefers
    assert "failing once on purpose" in progress.shards[1].last_error
    assert "failing once on purpose" in progress.shards[3].last_error
    with tables.connect() as conn:
        wrong_shard = conn.execute(text(
            "SELECT count(*) FROM ws_iter_processed WHERE shard IS DISTINCT FROM (item_id - 1) / 2000")).scalar()
        in_test_process = conn.execute(text("SELECT count(*) FROM ws_iter_processed WHERE pid = :pid"),
                                       {"pid": os.getpid()}).scalar()
    assert wrong_shard == 0, "get_deferred_shard_index() disagreed with the shard ranges"
    assert in_test_process == 0, "rows were processed in the test process, not by the worker"
    log = worker.output()
    assert f"iteration {iteration_id} shard 3: RuntimeError('item 6001: failing once on purpose') before any " \
           "progress in this run (failure 1); Celery retries it" in log
    assert "duplicate key" not in log and "UniqueViolation" not in log

    # A query with no rows finalizes once too, on the same worker.
    empty_id = defer_iteration_with_finalize(jobs.no_items, jobs.process, jobs.finalize, "empty",
                                             _registry=app.registry)
    wait_for(lambda: finalized_rows(tables, "empty"), timeout=30, describe=lambda: worker.output()[-4000:])
    time.sleep(0.5)
    assert len(finalized_rows(tables, "empty")) == 1
    empty = iteration_progress(empty_id, registry=app.registry)
    assert (empty.state, empty.total, empty.finalized) == ("done", 0, True)
    print(f"\n10,000 rows / 5 shards: {elapsed:.1f}s to finalize, {sum(redefers)} re-defers "
          f"(per shard {redefers}), budget 0.2s, batches of 50")
