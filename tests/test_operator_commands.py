"""``ws-celery INI -- dead-letters ...`` and ``-- outbox-status``: real Redis, PostgreSQL and subprocesses.

Dead letters are made by the function a worker's wrapped consumer handlers
call (``deadletter.dead_letter``), given a real kombu message taken off a
real Redis queue: the entry is what a worker would have stored, without
starting one for each test.
"""
from __future__ import annotations

import json
import subprocess
import threading
import time

import kombu
import pytest
from sqlalchemy import text

from tests.apps import sample_tasks
from tests.conftest import queued_messages
from websauna_tasks import (
    drop_dead_letter,
    get_celery,
    list_dead_letters,
    prune_dead_letters,
    requeue_dead_letter,
)
from websauna_tasks.deadletter import dead_letter, get_dead_letters
from websauna_tasks.outbox import get_outbox
from websauna_tasks.request import task_request
from websauna_tasks.testing import wait_for


def one_line_error(result: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ws-celery: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# -- dead letters ---------------------------------------------------------------------------------------------------

@pytest.fixture
def settings(redis_url, database_url, queue_name):
    config = {"broker_url": redis_url, "task_default_queue": queue_name}
    return {"websauna.celery_config": repr(config), "sqlalchemy.url": database_url,
            "websauna_tasks.deadletter_queue": f"{queue_name}.dead"}


def make_dead_letter(celery, queue_name: str, task_name: str = "tests.no_such_task", args: tuple = (1,)) -> str:
    """Send a task, take its message off the queue and dead-letter it as a worker that lacks the task would."""
    task_id = celery.send_task(task_name, args=args, queue=queue_name).id
    with celery.connection_for_read() as connection:
        message = kombu.Queue(queue_name)(connection.default_channel).get(no_ack=True)
    assert message.headers["id"] == task_id
    dead_letter(get_dead_letters(celery), message, "unknown_task", KeyError(task_name))
    return task_id


def ids(celery) -> list:
    return [entry["id"] for entry in list_dead_letters(celery)]


def test_list_prints_one_line_per_dead_letter_oldest_first(celery, ini, run_cli, queue_name):
    first = make_dead_letter(celery, queue_name, "tests.gone_one")
    second = make_dead_letter(celery, queue_name, "tests.gone_two")
    result = run_cli(ini, "dead-letters", "list")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    for line, (task_id, name), entry in zip(lines, [(first, "tests.gone_one"), (second, "tests.gone_two")],
                                            list_dead_letters(celery)):
        assert line.split("  ")[:4] == [entry["time"], task_id, name, queue_name]
        assert line.endswith(f"unknown task '{name}' (not registered in this worker)")


def test_list_json_prints_whole_entries(celery, ini, run_cli, queue_name):
    make_dead_letter(celery, queue_name)
    make_dead_letter(celery, queue_name)
    result = run_cli(ini, "dead-letters", "list", "--json")
    assert result.returncode == 0, result.stderr
    assert [json.loads(line) for line in result.stdout.splitlines()] == list_dead_letters(celery)


def test_list_of_an_empty_list_says_so(celery, ini, run_cli, dead_key):
    result = run_cli(ini, "dead-letters", "list")
    assert (result.returncode, result.stdout, result.stderr) == (0, f"no dead letters in {dead_key}\n", "")


def test_requeue_puts_the_message_back_on_another_queue_and_removes_it(celery, ini, run_cli, queue_name,
                                                                       redis_client):
    kept = make_dead_letter(celery, queue_name)
    task_id = make_dead_letter(celery, queue_name, "tests.add", (2, 3))
    other = f"{queue_name}.other"
    result = run_cli(ini, "dead-letters", "requeue", task_id, "--queue", other)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"requeued dead letter {task_id} to queue {other}\n"
    assert ids(celery) == [kept]
    # A message kombu reads like any other, under its own id.
    with celery.connection_for_read() as connection:
        message = kombu.Queue(other)(connection.default_channel).get(no_ack=True)
    assert message.headers["id"] == task_id and message.headers["task"] == "tests.add"
    assert message.decode()[0] == [2, 3]
    assert redis_client.llen(other) == 0


@pytest.mark.slow
def test_requeued_message_is_run_by_a_worker_that_has_the_task(celery, ini, run_cli, queue_name, db,
                                                               ws_celery_worker_factory, subprocess_env):
    # As after deploying the task a worker did not have: back on its own queue, then run.
    task_id = make_dead_letter(celery, queue_name, "tests.record", ("revived",))
    result = run_cli(ini, "dead-letters", "requeue", task_id)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"requeued dead letter {task_id} to queue {queue_name}\n"
    ws_celery_worker_factory(ini, "worker", "-c", "1", "--without-gossip", "--without-mingle", env=subprocess_env)

    def effects():
        with db.connect() as conn:
            return [tuple(row) for row in conn.execute(text("SELECT task_id, value FROM ws_test_effects"))]

    wait_for(lambda: effects() == [(task_id, "revived")])
    assert ids(celery) == []


def test_racing_requeues_of_one_letter_push_it_once(celery, queue_name, redis_client):
    task_id = make_dead_letter(celery, queue_name)
    barrier = threading.Barrier(8)
    outcomes = []

    def requeue():
        barrier.wait()
        outcomes.append(requeue_dead_letter(celery, task_id))

    threads = [threading.Thread(target=requeue) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(outcomes) == [False] * 7 + [True]
    assert [message["headers"]["id"] for message in queued_messages(redis_client, queue_name)] == [task_id]
    assert ids(celery) == []


def test_requeue_and_drop_of_an_unknown_id_fail_naming_it(celery, ini, run_cli, queue_name):
    kept = make_dead_letter(celery, queue_name)
    for command in ("requeue", "drop"):
        result = run_cli(ini, "dead-letters", command, "no-such-id")
        one_line_error(result, 1, "no dead letter with id no-such-id", f"{queue_name}.dead")
        assert result.stdout == ""
    assert ids(celery) == [kept]


def test_drop_removes_that_entry_only(celery, ini, run_cli, queue_name):
    first = make_dead_letter(celery, queue_name)
    second = make_dead_letter(celery, queue_name)
    third = make_dead_letter(celery, queue_name)
    result = run_cli(ini, "dead-letters", "drop", second)
    assert (result.returncode, result.stdout) == (0, f"dropped dead letter {second}\n"), result.stderr
    assert ids(celery) == [first, third]
    one_line_error(run_cli(ini, "dead-letters", "drop", second), 1, second)
    assert drop_dead_letter(celery, first) is True
    assert drop_dead_letter(celery, first) is False
    assert ids(celery) == [third]


def aged(redis_client, key: str, entry: dict, seconds: float, task_id: str) -> None:
    """Append a copy of a real entry recorded ``seconds`` ago."""
    stamp = entry["timestamp"] - seconds
    time_text = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(stamp))
    redis_client.rpush(key, json.dumps(dict(entry, id=task_id, timestamp=stamp, time=time_text)))


def test_prune_removes_entries_older_than_the_given_seconds(celery, ini, run_cli, queue_name, redis_client,
                                                            dead_key):
    fresh = make_dead_letter(celery, queue_name)
    entry = list_dead_letters(celery)[0]
    aged(redis_client, dead_key, entry, 7200, "two-hours")
    aged(redis_client, dead_key, entry, 600, "ten-minutes")
    # Read from "time" when "timestamp" is missing; kept when neither says when.
    no_stamp = {key: value for key, value in entry.items() if key != "timestamp"}
    aged_entry = dict(no_stamp, id="old-no-stamp", time="2000-01-01T00:00:00+00:00")
    redis_client.rpush(dead_key, json.dumps(aged_entry))
    redis_client.rpush(dead_key, json.dumps(dict(no_stamp, id="timeless", time=None)))

    result = run_cli(ini, "dead-letters", "prune", "--older-than", "3600")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"removed 2 dead letter(s) older than 3600 s from {dead_key}\n"
    assert ids(celery) == [fresh, "ten-minutes", "timeless"]
    result = run_cli(ini, "dead-letters", "prune", "--older-than", "0")
    assert result.stdout.startswith("removed 2 dead letter(s) older than 0 s"), result.stderr
    assert ids(celery) == ["timeless"]


def test_prune_keeps_entries_workers_append_meanwhile(celery, queue_name, redis_client, dead_key):
    make_dead_letter(celery, queue_name)
    entry = list_dead_letters(celery)[0]
    redis_client.delete(dead_key)
    for number in range(3000):
        aged(redis_client, dead_key, entry, 86400, f"old-{number}")
    pushed: list[str] = []
    stop = threading.Event()

    def worker_appends():
        # Fresh entries, RPUSHed as DeadLetters.store() does, all through the prune.
        while not stop.is_set() or not pushed:
            task_id = f"new-{len(pushed)}"
            redis_client.rpush(dead_key, json.dumps(dict(entry, id=task_id, timestamp=time.time())))
            pushed.append(task_id)

    thread = threading.Thread(target=worker_appends)
    thread.start()
    try:
        wait_for(lambda: len(pushed) >= 10)
        before = len(pushed)
        assert prune_dead_letters(celery, 3600) == 3000
        appended_meanwhile = len(pushed) - before
    finally:
        stop.set()
        thread.join()
    assert appended_meanwhile > 0, "the appends did not overlap the prune: the test proves nothing"
    assert ids(celery) == pushed


def test_an_entry_that_is_not_json_is_listed_as_unreadable_and_skipped_by_drop_and_prune(
        celery, ini, run_cli, queue_name, redis_client, dead_key):
    # More hostile entries, and every command on them: tests/test_dead_letter_entries.py.
    kept = make_dead_letter(celery, queue_name)
    redis_client.rpush(dead_key, b"not json")
    result = run_cli(ini, "dead-letters", "list")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.splitlines()[1].startswith("-  unreadable-")
    assert "  unreadable entry of 8 bytes (not JSON" in result.stdout.splitlines()[1]
    assert prune_dead_letters(celery, 0) == 1
    assert drop_dead_letter(celery, kept) is False
    assert redis_client.lrange(dead_key, 0, -1) == [b"not json"]


BAD_ARGUMENTS = [
    ((), "the following arguments are required: {list,requeue,drop,prune}"),
    (("purge",), "invalid choice: 'purge'"),
    (("requeue",), "the following arguments are required: id"),
    (("list", "extra"), "unrecognized arguments: extra"),
    (("prune",), "the following arguments are required: --older-than"),
    (("prune", "--older-than", "soon"), "expected a number of seconds, got 'soon'"),
    (("prune", "--older-than", "-5"), "expected a number of seconds >= 0, got '-5'"),
    (("prune", "--older-than", "nan"), "expected a number of seconds >= 0, got 'nan'"),
]


@pytest.mark.parametrize("args, fragment", BAD_ARGUMENTS)
def test_bad_arguments_exit_2_with_one_line(ini, run_cli, args, fragment):
    result = run_cli(ini, "dead-letters", *args)
    line = one_line_error(result, 2, fragment, "(usage: ws-celery INI -- dead-letters")
    assert result.stdout == "", line


def test_help_lists_the_subcommands(ini, run_cli):
    result = run_cli(ini, "dead-letters", "--help")
    assert result.returncode == 0, result.stderr
    assert "{list,requeue,drop,prune}" in result.stdout


def test_without_redis_or_a_database_there_is_nowhere_to_look(write_ini, run_cli, queue_name):
    # An empty listing would claim a list that does not exist: every command says what to configure.
    broker = "amqp://guest:secret@127.0.0.1:5672//"
    ini = write_ini({"websauna.celery_config": repr({"broker_url": broker, "task_default_queue": queue_name})})
    for args in (("list",), ("list", "--json"), ("drop", "some-id"), ("requeue", "some-id"),
                 ("prune", "--older-than", "0")):
        result = run_cli(ini, "dead-letters", *args)
        line = one_line_error(result, 2, "dead letters have nowhere to be kept: the broker "
                                         "(amqp://guest:**@127.0.0.1:5672//) is not Redis and the application has no "
                                         "database; set sqlalchemy.url")
        assert result.stdout == "" and "secret" not in line


def test_redis_unreachable_is_one_line(write_ini, run_cli, queue_name):
    config = {"broker_url": "redis://:secret@127.0.0.1:1/15", "task_default_queue": queue_name}
    ini = write_ini({"websauna.celery_config": repr(config)})
    line = one_line_error(run_cli(ini, "dead-letters", "list"), 1,
                          "cannot read the dead-letter list websauna_tasks.deadletter at redis://:**@127.0.0.1:1/15")
    assert "secret" not in line


# -- outbox-status --------------------------------------------------------------------------------------------------

@pytest.fixture
def outbox_settings(redis_url, database_url, queue_name, db):
    config = {"broker_url": redis_url, "task_default_queue": queue_name}
    return {"websauna.celery_config": repr(config), "sqlalchemy.url": database_url,
            # Rows are per app: this test sees its own only.
            "websauna_tasks.app_name": f"status-{queue_name}", "websauna_tasks.outbox": "true",
            "websauna_tasks.outbox_publish_on_commit": "false", "websauna_tasks.outbox_retention_seconds": "3600"}


def status_lines(result: subprocess.CompletedProcess) -> dict[str, str]:
    assert result.returncode == 0, result.stderr
    return dict(line.split(": ", 1) for line in result.stdout.splitlines())


def test_outbox_status_counts_unsent_and_kept_rows_and_the_oldest_age(outbox_settings, make_app, write_ini, run_cli,
                                                                      db, queue_name, redis_client):
    router = make_app(**outbox_settings)
    with task_request(router.registry) as request:
        with request.tm:
            sent = sample_tasks.add.apply_async(args=(1, 1), tm=request.tm)
            oldest = sample_tasks.add.apply_async(args=(2, 2), tm=request.tm)
            sample_tasks.add.apply_async(args=(3, 3), tm=request.tm)
    assert get_outbox(get_celery(router.registry)).publish_pending(ids=[sent.id]) == 1
    with db.begin() as conn:
        conn.execute(text("UPDATE websauna_tasks_outbox SET created_at = created_at - 120 WHERE id = :id"),
                     {"id": oldest.id})
    ini = write_ini(outbox_settings)

    lines = status_lines(run_cli(ini, "outbox-status"))
    assert lines["app"] == f"status-{queue_name}"
    assert lines["unsent"] == "2"
    assert lines["oldest unsent age"].endswith(" s")
    assert 120 <= float(lines["oldest unsent age"][:-2]) < 180
    assert lines["sent rows kept"] == "1 (deleted after 3600 s)"
    result = run_cli(ini, "outbox-status", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert 120 <= status.pop("oldest_unsent_age_seconds") < 180
    assert status == {"app": f"status-{queue_name}", "unsent": 2, "sent_kept": 1, "retention_seconds": 3600}
    assert [m["headers"]["id"] for m in queued_messages(redis_client, queue_name)] == [sent.id]


def test_outbox_status_of_an_empty_outbox(outbox_settings, write_ini, run_cli):
    lines = status_lines(run_cli(write_ini(outbox_settings), "outbox-status"))
    assert (lines["unsent"], lines["oldest unsent age"], lines["sent rows kept"]) == (
        "0", "none", "0 (deleted after 3600 s)")


def test_outbox_status_with_the_outbox_off_exits_2(outbox_settings, write_ini, run_cli):
    ini = write_ini(dict(outbox_settings, **{"websauna_tasks.outbox": "false"}))
    result = run_cli(ini, "outbox-status")
    one_line_error(result, 2, "the outbox is off: set websauna_tasks.outbox = true")
    assert result.stdout == ""
