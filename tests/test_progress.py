"""self.set_progress() and task_progress(): the result backend's PROGRESS state, throttled; real Redis and workers."""
from __future__ import annotations

import json
import math
import os
import subprocess
import threading
import uuid

import pytest
from celery.result import AsyncResult

from tests.apps import cancel_tasks
from tests.test_cli import ws_celery_argv
from websauna_tasks import TaskProgress, get_celery, task_progress
from websauna_tasks import progress as progress_module
from websauna_tasks.progress import check_progress, report_progress
from websauna_tasks.request import task_request
from websauna_tasks.settings import PROGRESS_INTERVAL_KEY
from websauna_tasks.testing import wait_for

SCAN = "tests.apps.cancel_tasks"


def redis_settings(redis_url, database_url, queue_name, **extra):
    celery = {"broker_url": redis_url, "task_default_queue": queue_name, "result_backend": redis_url,
              "result_expires": 600}
    return {"websauna.celery_config": repr(celery), "sqlalchemy.url": database_url, "tests.scan": SCAN, **extra}


# -- what a call accepts (no service) -------------------------------------------------------------------------------

@pytest.mark.parametrize(("done", "total", "note"), [
    ("1", 2, None), (1, "2", None), (True, 2, None), (1, None, None), (1, 2, 5), (1, 2, b"note"), ([1], 2, None),
])
def test_wrong_types_are_a_type_error_at_the_call(done, total, note):
    with pytest.raises(TypeError):
        check_progress(done, total, note)


@pytest.mark.parametrize(("done", "total", "note"), [
    (math.nan, 2, None), (1, math.inf, None), (-math.inf, 2, None), (-1, 2, None), (0, -2, None), (3, 2, None),
    (2.5, 2, None), (1, 2, "x" * 1001),
])
def test_non_finite_negative_or_done_beyond_total_are_a_value_error(done, total, note):
    with pytest.raises(ValueError):
        check_progress(done, total, note)


def test_figures_that_make_sense_pass():
    assert check_progress(0, 0) == (0, 0, None)
    assert check_progress(2.5, 10, "halfway-ish") == (2.5, 10, "halfway-ish")


def test_without_a_result_backend_nothing_is_written(make_app):
    router = make_app(**{"websauna.celery_config": "{'broker_url': 'memory://'}", "tests.scan": SCAN})
    app = get_celery(router.registry)
    with task_request(router.registry):
        assert cancel_tasks.count.apply(args=(10,)).get() == 0
    assert task_progress(str(uuid.uuid4()), app) is None


# -- the throttle, counted at the backend ---------------------------------------------------------------------------

def test_a_loop_reporting_every_item_writes_a_few_times(make_app, redis_url, database_url, queue_name, db):
    router = make_app(**redis_settings(redis_url, database_url, queue_name))
    app = get_celery(router.registry)
    backend = app.backend
    writes = []
    store = backend.store_result

    def counting(task_id, result, state, *args, **kwargs):
        writes.append((state, result))
        return store(task_id, result, state, *args, **kwargs)

    backend.store_result = counting
    try:
        items = 20_000
        result = cancel_tasks.count.apply(args=(items,))
        written = result.get()
    finally:
        del backend.store_result
    progress_writes = [meta for state, meta in writes if state == "PROGRESS"]
    print(f"\nset_progress: {items + 1} calls, {len(progress_writes)} backend writes")
    # The flushing thread may add a write when the loop runs slower than the interval (a loaded machine).
    assert written <= len(progress_writes) <= 10
    assert 2 <= written <= 10  # the first, one per 0.5 s, the last: never one per item
    assert progress_writes[0]["done"] == 0 and progress_writes[-1] == {
        "done": items, "total": items, "note": f"item {items}", "fraction": 1.0}
    figures = task_progress(result.id, app)
    assert figures == TaskProgress(result.id, items, items, f"item {items}", 1.0)
    backend.forget(result.id)


def test_an_interval_of_zero_writes_every_call(make_app, redis_url, database_url, queue_name, db):
    make_app(**redis_settings(redis_url, database_url, queue_name, **{PROGRESS_INTERVAL_KEY: "0"}))
    assert cancel_tasks.count.apply(args=(25,)).get() == 26


def test_a_call_outside_a_run_is_checked_and_writes_nothing(make_app, redis_url, database_url, queue_name, db):
    make_app(**redis_settings(redis_url, database_url, queue_name))
    assert report_progress(cancel_tasks.count, 1, 2) is False
    with pytest.raises(ValueError):
        cancel_tasks.count.set_progress(3, 2)


# -- the held figure: written when the loop stalls, never over the result -----------------------------------------

def test_a_figure_held_by_the_throttle_is_written_when_the_loop_stalls(
        make_app, redis_url, database_url, queue_name, db, redis_client):
    router = make_app(**redis_settings(redis_url, database_url, queue_name, **{PROGRESS_INTERVAL_KEY: "0.3"}))
    app = get_celery(router.registry)
    gate = f"wstest-gate-{uuid.uuid4().hex}"
    task_id = str(uuid.uuid4())
    outcome: list = []
    runner = threading.Thread(target=lambda: outcome.append(cancel_tasks.stall.apply(args=(gate,), task_id=task_id)))
    runner.start()
    try:
        # The run sits in its stall: only the flushing thread can write "held".
        figures = wait_for(lambda: (found := task_progress(task_id, app)) and found.note == "held" and found,
                           timeout=10, interval=0.05)
        assert (figures.done, figures.total) == (1, 10)
        assert runner.is_alive()
    finally:
        redis_client.set(gate, "1", ex=60)
        runner.join(30)
        redis_client.delete(gate)
    assert outcome[0].get() == "done"
    app.backend.forget(task_id)


def test_the_end_of_a_run_drops_its_held_figure_before_the_result(make_app, redis_url, database_url, queue_name,
                                                                   db):
    router = make_app(**redis_settings(redis_url, database_url, queue_name, **{PROGRESS_INTERVAL_KEY: "30"}))
    app = get_celery(router.registry)
    task_id = str(uuid.uuid4())
    assert cancel_tasks.stall.apply(task_id=task_id).get() == "done"
    # Held at the run's end: had it stayed, the flushing thread would write PROGRESS over the stored result.
    assert task_id not in progress_module._flusher.held
    assert task_progress(task_id, app).note == "written"  # eager: no result stored, the first figure stays

    ignored = str(uuid.uuid4())
    assert cancel_tasks.stall.apply(task_id=ignored, ignore_result=True).get() == "done"
    assert ignored not in progress_module._flusher.held
    assert task_progress(ignored, app).note == "held"  # a result nobody stores: the held figure is its last word
    app.backend.forget(task_id)
    app.backend.forget(ignored)


# -- a real worker, read four ways ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_progress_of_a_worker_run_read_four_ways(
        make_app, redis_url, database_url, queue_name, db, redis_client, write_ini, ws_celery_worker_factory,
        subprocess_env):
    from webtest import TestApp

    from tests.apps.console_app import main as console_main

    settings = redis_settings(redis_url, database_url, queue_name)
    router = make_app(**settings)
    app = get_celery(router.registry)
    ini = write_ini(settings)
    worker = ws_celery_worker_factory(ini, "worker", "-c", "1", env=subprocess_env)
    gate = f"wstest-gate-{uuid.uuid4().hex}"
    try:
        result = cancel_tasks.count.apply_async(args=(1000, gate))
        figures = wait_for(lambda: (found := task_progress(result.id, app)) and found.done == 1000 and found,
                           timeout=30, describe=worker.output)
        assert figures.total == 1000 and figures.note == "item 1000" and figures.fraction == 1.0
        async_result = AsyncResult(result.id, app=app)
        assert async_result.state == "PROGRESS" and async_result.info["done"] == 1000

        shown = subprocess.run([*ws_celery_argv(), ini, "--", "progress", result.id], capture_output=True,
                               text=True, timeout=60, env={**os.environ, **subprocess_env})
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.strip() == f"{result.id}: 1000 of 1000 (100.0%): item 1000"
        as_json = subprocess.run([*ws_celery_argv(), ini, "--", "progress", result.id, "--json"],
                                 capture_output=True, text=True, timeout=60, env={**os.environ, **subprocess_env})
        assert json.loads(as_json.stdout)["progress"]["done"] == 1000

        console = TestApp(console_main({}, **settings, **{"tests.console_policy": "none",
                                                          "websauna_tasks.console_insecure": "true"}))
        page = console.get(f"/_tasks/tasks/{result.id}").text
        assert "1000 of 1000 (100.0%): item 1000" in page

        redis_client.set(gate, "1", ex=60)
        assert async_result.get(timeout=30) < 10
        assert task_progress(result.id, app) is None  # the result replaced the figures
        missing = subprocess.run([*ws_celery_argv(), ini, "--", "progress", result.id], capture_output=True,
                                 text=True, timeout=60, env={**os.environ, **subprocess_env})
        assert missing.returncode == 1 and "reports none (state SUCCESS)" in missing.stderr
        bad = subprocess.run([*ws_celery_argv(), ini, "--", "progress", "x" * 300], capture_output=True,
                             text=True, timeout=60, env={**os.environ, **subprocess_env})
        assert bad.returncode == 2 and "Traceback" not in bad.stderr
    finally:
        redis_client.delete(gate)
