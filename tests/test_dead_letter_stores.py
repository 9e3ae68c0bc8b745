"""Dead letters on every broker: the Redis list, and the table ``websauna_tasks_dead_letters`` for the others.

The table is tested as the list is (tests/test_dead_letter_entries.py,
tests/test_operator_commands.py): the same functions and commands, the same
entries, the same hostile input, here written straight into the table. Then
real ``ws-celery`` workers on RabbitMQ (the machine's, a vhost of the test's
own, the letters in PostgreSQL) and on kombu's SQLite transport (the
example's broker, the letters in the app's SQLite file) are sent forged
messages straight through the broker: an unknown task, a broken body, a
pickle and an oversize garbage body. Each becomes a row, is listed,
requeued to its queue and run once the task is deployed, dropped and
pruned, by the Python functions and by ``ws-celery INI -- dead-letters``.
"""
from __future__ import annotations

import json
import pickle
import time

import kombu
import pytest
import sqlalchemy as sa
from celery.utils import uuid
from pyramid.exceptions import ConfigurationError

from tests.test_dead_letter_entries import HOSTILE, marker, unreadable_id
from websauna_tasks import drop_dead_letter, get_celery, list_dead_letters, prune_dead_letters, requeue_dead_letter
from websauna_tasks.deadletters import (
    UNREADABLE_ENTRY,
    NoDeadLetterStore,
    RedisStore,
    SQLStore,
    dead_letter,
    get_dead_letters,
)
from websauna_tasks.testing import wait_for

TABLE = "websauna_tasks_dead_letters"


def make_letter(celery, queue: str, task_name: str = "tests.no_such_task", args: tuple = (1,)) -> str:
    """Send a task, take its message off the queue and dead-letter it as a worker that lacks the task would."""
    task_id = celery.send_task(task_name, args=args, queue=queue).id
    with celery.connection_for_read() as connection:
        message = wait_for(lambda: kombu.Queue(queue)(connection.default_channel).get(no_ack=True), timeout=10)
    assert message.headers["id"] == task_id
    dead_letter(get_dead_letters(celery), message, "unknown_task", KeyError(task_name))
    return task_id


def ids(celery, **kwargs) -> list:
    return [entry["id"] for entry in list_dead_letters(celery, **kwargs)]


# -- the table, with kombu's in-memory transport and SQLite: no service ---------------------------------------------

@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'app.sqlite'}"


@pytest.fixture
def queue() -> str:
    # The in-memory transport's queues live as long as the process: one of each test's own.
    return f"wstest-{uuid()[:12]}"


@pytest.fixture
def memory_app(make_app, sqlite_url, queue):
    config = {"broker_url": "memory://", "task_default_queue": queue}
    return get_celery(make_app(**{"websauna.celery_config": repr(config), "sqlalchemy.url": sqlite_url,
                                  "websauna_tasks.deadletter_queue": f"{queue}.dead"}).registry)


def insert_raw(celery, text: str, **columns) -> None:
    """A row written by something other than a worker: whatever ``text`` holds, with the columns given."""
    store = get_dead_letters(celery).backend
    with store.engine.begin() as conn:
        conn.execute(sa.text(f"INSERT INTO {TABLE} (list_name, task_id, kind, recorded_at, entry) "
                             "VALUES (:list_name, :task_id, :kind, :recorded_at, :entry)"),
                     {"list_name": store.key, "task_id": None, "kind": "unknown_task", "recorded_at": None,
                      "entry": text, **columns})


def test_the_store_follows_the_broker(make_app, sqlite_url, redis_url_free_config):
    redis_app = get_celery(make_app(**redis_url_free_config("redis://127.0.0.1:1/0")).registry)
    assert isinstance(get_dead_letters(redis_app).backend, RedisStore)
    assert get_dead_letters(redis_app).where == "websauna_tasks.deadletter"
    table_app = get_celery(make_app(**redis_url_free_config("amqp://guest:guest@127.0.0.1:1//"),
                                    **{"sqlalchemy.url": sqlite_url}).registry)
    letters = get_dead_letters(table_app)
    assert isinstance(letters.backend, SQLStore) and letters.client is None
    assert letters.where == f"{TABLE} (list websauna_tasks.deadletter)"


@pytest.fixture
def redis_url_free_config():
    def settings(broker: str) -> dict[str, str]:
        return {"websauna.celery_config": repr({"broker_url": broker})}

    return settings


def test_without_redis_or_a_database_every_function_says_so(make_app, redis_url_free_config, caplog):
    app = get_celery(make_app(**redis_url_free_config("amqp://guest:secret@127.0.0.1:1//")).registry)
    calls = [lambda: list_dead_letters(app), lambda: requeue_dead_letter(app, "x"),
             lambda: drop_dead_letter(app, "x"), lambda: prune_dead_letters(app, 0)]
    for call in calls:
        with pytest.raises(NoDeadLetterStore) as caught:
            call()
        assert isinstance(caught.value, ConfigurationError)
        message = str(caught.value)
        assert "amqp://guest:**@127.0.0.1:1//" in message and "secret" not in message
        assert "is not Redis and the application has no database; set sqlalchemy.url" in message

    # A worker's copy never raises: the whole entry goes to its ERROR log.
    class Message:
        headers = {"id": "lost-1", "task": "tests.gone"}
        delivery_info = {"routing_key": "q"}
        properties = {}
        content_type = "application/json"
        body = b"[[], {}, {}]"

    entry = dead_letter(get_dead_letters(app), Message(), "unknown_task", KeyError("tests.gone"))
    assert entry["id"] == "lost-1"
    assert "no Redis broker and no database for dead letters" in caplog.text and '"lost-1"' in caplog.text


def test_the_table_keeps_entries_as_the_list_does(memory_app, queue):
    first = make_letter(memory_app, queue, "tests.gone_one")
    second = make_letter(memory_app, queue, "tests.gone_two", (2, 3))
    letters = list_dead_letters(memory_app)
    assert [letter["id"] for letter in letters] == [first, second]
    assert letters[1]["kind"] == "unknown_task" and letters[1]["queue"] == queue
    assert letters[1]["reason"] == "unknown task 'tests.gone_two' (not registered in this worker)"
    assert set(letters[1]) >= {"kind", "reason", "id", "task", "queue", "exchange", "time", "timestamp", "message"}
    # LRANGE's start and stop, negative ones included, and the kind filter.
    assert ids(memory_app, start=1) == [second] and ids(memory_app, start=-1) == [second]
    assert ids(memory_app, start=0, stop=0) == [first] and ids(memory_app, stop=-2) == [first]
    assert ids(memory_app, start=5) == [] and ids(memory_app, start=1, stop=0) == []
    assert ids(memory_app, kind="unknown_task", start=-1) == [second] and ids(memory_app, kind="malformed") == []

    # Back on another queue through the broker, as kombu reads any message, and out of the table.
    other = f"{queue}.other"
    assert requeue_dead_letter(memory_app, second, queue=other) is True
    assert requeue_dead_letter(memory_app, second, queue=other) is False
    with memory_app.connection_for_read() as connection:
        message = kombu.Queue(other)(connection.default_channel).get(no_ack=True)
    assert message.headers["id"] == second and message.headers["task"] == "tests.gone_two"
    assert message.decode()[0] == [2, 3]
    assert ids(memory_app) == [first]
    # Refused again after the requeue: a new row, which keeps the first time the message was dead-lettered.
    recorded = letters[1]["timestamp"]
    dead_letter(get_dead_letters(memory_app), message, "unknown_task", KeyError("tests.gone_two"))
    again = list_dead_letters(memory_app)[-1]
    assert again["id"] == second and again["first_seen"] == recorded < again["timestamp"] and again["times"] == 2
    assert drop_dead_letter(memory_app, second) is True
    assert drop_dead_letter(memory_app, first) is True and drop_dead_letter(memory_app, first) is False
    assert list_dead_letters(memory_app) == []


def test_a_letter_without_a_queue_needs_one_and_an_undeclared_queue_is_refused(make_app, sqlite_url, queue):
    config = {"broker_url": "memory://", "task_default_queue": queue}
    app = get_celery(make_app(**{"websauna.celery_config": repr(config), "sqlalchemy.url": sqlite_url,
                                 "websauna_tasks.queues": json.dumps([{"name": queue}])}).registry)
    task_id = make_letter(app, queue)
    from websauna_tasks import UndeclaredQueue

    with pytest.raises(UndeclaredQueue):
        requeue_dead_letter(app, task_id, queue=f"{queue}.typo")
    assert ids(app) == [task_id], "kept after the refusal"
    entry = dict(list_dead_letters(app)[0], id="no-queue", queue=None)
    get_dead_letters(app).store(entry)
    with pytest.raises(ValueError, match="no queue recorded"):
        requeue_dead_letter(app, "no-queue")
    assert requeue_dead_letter(app, task_id) is True


def _is_text(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False  # a text column holds text: bytes that are not UTF-8 cannot be written to it at all
    return True


#: The hostile entries of the Redis list that a text column can hold.
HOSTILE_TEXT = [(raw, fragment) for raw, fragment in HOSTILE if _is_text(raw)]


@pytest.mark.parametrize("raw, fragment", HOSTILE_TEXT,
                         ids=[raw[:40].decode("utf-8") or "empty" for raw, _ in HOSTILE_TEXT])
def test_a_forged_row_is_listed_as_unreadable_and_only_dropped(memory_app, queue, raw, fragment):
    first = make_letter(memory_app, queue)
    insert_raw(memory_app, raw.decode("utf-8"), task_id="5", recorded_at=0.0)
    last = make_letter(memory_app, queue)

    entries = list_dead_letters(memory_app)
    assert [entry["id"] for entry in entries] == [first, unreadable_id(raw), last]
    marker(raw, fragment, entries[1])
    for task_id in ("5", "m1", "p1", "d1", "q1", "t1", "u1", unreadable_id(raw)):
        assert requeue_dead_letter(memory_app, task_id, queue=f"{queue}.other") is False
    assert requeue_dead_letter(memory_app, last) is True
    assert prune_dead_letters(memory_app, 0) == 1  # first; the forged row has no time to go by, whatever its column
    assert drop_dead_letter(memory_app, "5") is False
    assert drop_dead_letter(memory_app, unreadable_id(raw)) is True
    assert list_dead_letters(memory_app) == []


def test_a_row_whose_columns_disagree_with_its_entry_is_unreadable(memory_app, queue):
    real = make_letter(memory_app, queue)
    entry = list_dead_letters(memory_app)[0]
    forged = json.dumps(dict(entry, id="claimed"))
    # Found by the task_id column, and by its time, but the entry says otherwise: neither may act on it.
    insert_raw(memory_app, forged, task_id=real, recorded_at=entry["timestamp"])
    listed = list_dead_letters(memory_app)
    assert [item["id"] for item in listed] == [real, unreadable_id(forged.encode())]
    assert listed[1]["kind"] == UNREADABLE_ENTRY
    assert listed[1]["reason"].startswith(
        f"the row's columns disagree with its entry: task_id '{real}' but id 'claimed'")
    assert requeue_dead_letter(memory_app, "claimed") is False and drop_dead_letter(memory_app, "claimed") is False
    assert requeue_dead_letter(memory_app, real, queue=f"{queue}.other") is True
    assert prune_dead_letters(memory_app, 0) == 0
    assert drop_dead_letter(memory_app, unreadable_id(forged.encode())) is True


def pages_of_100000(celery, queue: str, database: str) -> None:
    """100,000 rows in the table; the last page, the tail, a kind and an id are each read through an index."""
    make_letter(celery, queue)
    template = list_dead_letters(celery)[0]
    store = get_dead_letters(celery).backend
    now = time.time()
    rows = []
    for number in range(100_000):
        kind = "malformed" if number % 100 == 0 else "unknown_task"
        entry = dict(template, id=f"bulk-{number}", kind=kind, timestamp=now)
        rows.append({"list_name": store.key, "task_id": entry["id"], "kind": kind, "recorded_at": now,
                     "entry": json.dumps(entry)})
    with store.engine.begin() as conn:
        conn.execute(sa.text(f"INSERT INTO {TABLE} (list_name, task_id, kind, recorded_at, entry) "
                             "VALUES (:list_name, :task_id, :kind, :recorded_at, :entry)"), rows)
        if store.engine.dialect.name == "postgresql":
            conn.execute(sa.text(f"ANALYZE {TABLE}"))

    def timed(**kwargs) -> tuple[list, float]:
        started = time.perf_counter()
        page = ids(celery, **kwargs)
        return page, time.perf_counter() - started

    # The newest letters, counted from the end (what an operator reads first).
    tail, tail_seconds = timed(start=-50)
    assert tail == [f"bulk-{number}" for number in range(99_950, 100_000)]
    before_tail, before_tail_seconds = timed(start=-100, stop=-51)
    assert before_tail == [f"bulk-{number}" for number in range(99_900, 99_950)]
    kinds, kind_seconds = timed(kind="malformed", start=-2)
    assert kinds == ["bulk-99800", "bulk-99900"]
    found = time.perf_counter()
    assert get_dead_letters(celery).find("bulk-77777")[0]["id"] == "bulk-77777"
    find_seconds = time.perf_counter() - found
    # Counted from the start, deep: an offset walks that much of the index, but reads and parses 50 entries only.
    deep, deep_seconds = timed(start=99_951, stop=100_000)
    assert deep == tail
    middle, middle_seconds = timed(start=50_000, stop=50_049)
    assert middle == [f"bulk-{number}" for number in range(49_999, 50_049)]
    print(f"\n100,000 rows ({database}): the last 50 {tail_seconds * 1000:.1f} ms, the 50 before "
          f"{before_tail_seconds * 1000:.1f} ms, the last 2 of a kind {kind_seconds * 1000:.1f} ms, by id "
          f"{find_seconds * 1000:.1f} ms; from the start: rows 50,000-50,049 {middle_seconds * 1000:.1f} ms, the "
          f"last 50 {deep_seconds * 1000:.1f} ms")
    for seconds in (tail_seconds, before_tail_seconds, kind_seconds, find_seconds):
        assert seconds < 0.5, "a page counted from the end reads 50 rows' worth of an index, not the table"
    for seconds in (middle_seconds, deep_seconds):
        assert seconds < 3, "a deep offset walks the index, and parses only the page's entries"


def test_keyset_pages_of_the_table_and_their_forged_cursors(memory_app, queue):
    from websauna_tasks.deadletters import page_dead_letters
    from websauna_tasks.deadletters._pages import COUNT_LIMIT, MAX_CURSOR

    letter = {"kind": "unknown_task", "reason": "r", "id": None, "timestamp": 1.0, "message": None}
    store = get_dead_letters(memory_app).backend
    assert list_dead_letters(memory_app) == []  # the table is made on first use
    with store.engine.begin() as conn:
        conn.execute(sa.text(f"INSERT INTO {TABLE} (list_name, task_id, kind, recorded_at, entry) "
                             "VALUES (:list_name, :task_id, :kind, :recorded_at, :entry)"),
                     [{"list_name": store.key, "task_id": f"k-{n}", "kind": "unknown_task", "recorded_at": 1.0,
                       "entry": json.dumps(dict(letter, id=f"k-{n}"))} for n in range(COUNT_LIMIT + 1)])
    newest = page_dead_letters(memory_app)
    assert [entry["id"] for entry in newest.entries] == [f"k-{n}" for n in range(COUNT_LIMIT, COUNT_LIMIT - 50, -1)]
    # Counted up to the limit only: the page says "more than".
    assert (newest.total, newest.exact, newest.newer, newest.newest) == (COUNT_LIMIT, False, None, None)
    older = page_dead_letters(memory_app, **newest.older)
    assert older.entries[0]["id"] == f"k-{COUNT_LIMIT - 50}" and older.newer is not None
    assert page_dead_letters(memory_app, **older.newer).entries == newest.entries
    oldest = page_dead_letters(memory_app, **newest.oldest)
    assert [entry["id"] for entry in oldest.entries] == [f"k-{n}" for n in range(49, -1, -1)]
    assert oldest.older is None and oldest.oldest is None
    # Past every row, either way: the newest page.
    for cursor in ({"before": 0}, {"after": MAX_CURSOR}, {"page": 9}):
        assert page_dead_letters(memory_app, **cursor).entries == newest.entries, cursor
    for forged in ({"before": -1}, {"after": MAX_CURSOR + 1}, {"before": 1, "after": 1}, {"before": "5"},
                   {"after": 2.0}, {"before": True}, {"page": "2"}):
        with pytest.raises(ValueError):
            page_dead_letters(memory_app, **forged)


@pytest.mark.slow
def test_pages_of_100000_letters_stay_fast_on_sqlite(memory_app, queue):
    pages_of_100000(memory_app, queue, "SQLite")


@pytest.mark.slow
def test_pages_of_100000_letters_stay_fast_on_postgresql(make_app, database_url, queue):
    config = {"broker_url": "memory://", "task_default_queue": queue}
    app = get_celery(make_app(**{"websauna.celery_config": repr(config), "sqlalchemy.url": database_url,
                                 "websauna_tasks.deadletter_queue": f"{queue}.dead"}).registry)
    pages_of_100000(app, queue, "PostgreSQL")


# -- real workers: RabbitMQ with PostgreSQL, and kombu's SQLite transport -------------------------------------------

#: websauna_tasks.max_message_bytes of the worker scenarios: the oversize body is over it.
MAX_MESSAGE_BYTES = 65536
GARBAGE = bytes(range(256)) * 800  # 204,800 bytes, not UTF-8, not JSON
EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def protocol_headers(task_id: str, name: str) -> dict:
    return {"lang": "py", "task": name, "id": task_id, "root_id": task_id, "parent_id": None, "group": None,
            "retries": 0, "eta": None, "expires": None, "timelimit": [None, None], "argsrepr": "", "kwargsrepr": "",
            "origin": "wstest"}


def forge(celery, queue_name: str) -> dict[str, str]:
    """Publish four messages no worker can run straight to the broker, as anyone with its address could: kind -> id."""
    sent = {kind: uuid() for kind in ("unknown_task", "undecodable", "invalid_task", "too_large")}
    queue = celery.amqp.queues[queue_name]
    with celery.connection_for_write() as connection:
        producer = connection.Producer()

        def publish(body: bytes, kind: str, name: str, content_type: str, encoding: str) -> None:
            producer.publish(body, exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue],
                             content_type=content_type, content_encoding=encoding,
                             headers=protocol_headers(sent[kind], name))

        # Not deployed yet: the worker has no tests.revived.
        publish(json.dumps([["revived"], {}, EMBED]).encode(), "unknown_task", "tests.revived", "application/json",
                "utf-8")
        publish(b'[["broken"], {}, {', "undecodable", "tests.record", "application/json", "utf-8")
        publish(pickle.dumps(((1,), {}, EMBED)), "invalid_task", "tests.record", "application/x-python-serialize",
                "binary")
        publish(GARBAGE, "too_large", "tests.record", "application/json", "utf-8")
    return sent


def worker_args(*extra: str) -> tuple[str, ...]:
    return ("worker", "-c", "1", "--without-gossip", "--without-mingle", "--without-heartbeat", *extra)


def scenario(settings: dict, engine: sa.Engine, queue_name: str, make_app, write_ini, run_cli,
             ws_celery_worker_factory, subprocess_env, remote_control: bool) -> None:
    """Forged messages to a real worker, then every operator step, on whatever broker ``settings`` name.

    ``engine`` is the app's database, with a table ``ws_test_effects`` for the tasks' effects. On the way,
    the good task's result is read from the result backend, and with ``remote_control`` the worker
    answers ``inspect ping`` (a broker with fanout exchanges).
    """
    def effects() -> list[tuple]:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(sa.text("SELECT task_id, value FROM ws_test_effects"))]

    # The forged unknown task is a dead letter at once, not given back for a deploy's grace.
    settings = {**settings, "websauna_tasks.unknown_task_grace_seconds": "0"}
    celery = get_celery(make_app(**settings).registry)
    where = get_dead_letters(celery).where
    assert where == f"{TABLE} (list {settings['websauna_tasks.deadletter_queue']})"
    ini = write_ini(settings, "before.ini")
    before = ws_celery_worker_factory(ini, *worker_args(), env=subprocess_env)
    sent = forge(celery, queue_name)
    good = celery.send_task("tests.record", args=("after",), queue=queue_name)
    wait_for(lambda: (good.id, "after") in effects(), timeout=60, describe=lambda: before.output()[-3000:])
    assert good.get(timeout=30) == "after"
    if remote_control:
        result = run_cli(ini, "inspect", "ping", "--timeout", "10")
        assert result.returncode == 0 and "pong" in result.stdout, (result.stdout, result.stderr)

    letters = wait_for(lambda: len(list_dead_letters(celery)) == 4 and list_dead_letters(celery), timeout=60,
                       describe=lambda: before.output()[-3000:])
    by_id = {letter["id"]: letter for letter in letters}
    assert {kind: by_id[task_id]["kind"] for kind, task_id in sent.items()} == {kind: kind for kind in sent}
    assert {letter["queue"] for letter in letters} == {queue_name}
    unknown = by_id[sent["unknown_task"]]
    assert unknown["reason"] == "unknown task 'tests.revived' (not registered in this worker)"
    assert unknown["task"] == "tests.revived" and unknown["message"]["headers"]["id"] == sent["unknown_task"]
    assert "ContentDisallowed" in by_id[sent["invalid_task"]]["reason"]
    assert by_id[sent["invalid_task"]]["message"]["content-type"] == "application/x-python-serialize"
    assert "DecodeError" in by_id[sent["undecodable"]]["reason"]
    # The oversize garbage is kept as its head only: the table holds no more than the limit refused.
    large = by_id[sent["too_large"]]
    assert large["message"] is None and len(large["message_head"]) == MAX_MESSAGE_BYTES
    assert large["message_size"] > len(GARBAGE)
    with engine.connect() as conn:
        longest = conn.execute(sa.text(f"SELECT max(length(entry)) FROM {TABLE}")).scalar_one()
    assert MAX_MESSAGE_BYTES < longest < MAX_MESSAGE_BYTES + 4096
    assert "moved to dead letters" in before.output()
    assert before.process.poll() is None, "the worker goes on"

    # The CLI, as an operator runs it.
    result = run_cli(ini, "dead-letters", "list")
    assert result.returncode == 0, result.stderr
    assert sorted(line.split("  ")[1] for line in result.stdout.splitlines()) == sorted(sent.values())
    result = run_cli(ini, "dead-letters", "list", "--kind", "unknown_task", "--json")
    assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == [sent["unknown_task"]], result.stderr
    result = run_cli(ini, "dead-letters", "requeue", sent["too_large"])
    assert result.returncode == 1 and "keeps no whole message" in result.stderr

    # The task is deployed: the letter goes back to its own queue and runs.
    before.terminate()
    before.stop()
    after = ws_celery_worker_factory(write_ini({**settings, "tests.scan": "tests.apps.dead_letter_tasks"},
                                              "after.ini"), *worker_args(), env=subprocess_env)
    result = run_cli(ini, "dead-letters", "requeue", sent["unknown_task"])
    assert (result.returncode, result.stdout) == (
        0, f"requeued dead letter {sent['unknown_task']} to queue {queue_name}\n"), result.stderr
    wait_for(lambda: (sent["unknown_task"], "revived") in effects(), timeout=60,
             describe=lambda: after.output()[-3000:])
    assert sent["unknown_task"] not in ids(celery)

    result = run_cli(ini, "dead-letters", "drop", sent["undecodable"])
    assert (result.returncode, result.stdout) == (0, f"dropped dead letter {sent['undecodable']}\n"), result.stderr
    result = run_cli(ini, "dead-letters", "drop", sent["undecodable"])
    assert (result.returncode, result.stderr) == (1, f"ws-celery: no dead letter with id {sent['undecodable']} in "
                                                     f"{where}\n")
    result = run_cli(ini, "dead-letters", "prune", "--older-than", "3600")
    assert result.stdout == f"removed 0 dead letter(s) older than 3600 s from {where}\n", result.stderr
    assert prune_dead_letters(celery, 0) == 2
    result = run_cli(ini, "dead-letters", "list")
    assert (result.returncode, result.stdout, result.stderr) == (0, f"no dead letters in {where}\n", "")
    assert after.process.poll() is None


@pytest.mark.slow
def test_rabbitmq_dead_letters_live_in_the_database(rabbitmq_url, database_url, db, queue_name, make_app, write_ini,
                                                    run_cli, ws_celery_worker_factory, subprocess_env):
    config = {"broker_url": rabbitmq_url, "task_default_queue": queue_name, "result_backend": "rpc://"}
    settings = {"websauna.celery_config": repr(config),
                "sqlalchemy.url": database_url, "websauna_tasks.deadletter_queue": f"{queue_name}.dead",
                "websauna_tasks.max_message_bytes": str(MAX_MESSAGE_BYTES)}
    scenario(settings, db, queue_name, make_app, write_ini, run_cli, ws_celery_worker_factory, subprocess_env,
             remote_control=True)


@pytest.mark.slow
@pytest.mark.integration(reason="real ws-celery workers on kombu's SQLite transport")
def test_the_embedded_sqlite_transport_keeps_dead_letters_in_the_app_database(tmp_path, queue_name, make_app,
                                                                             write_ini, run_cli,
                                                                             ws_celery_worker_factory,
                                                                             subprocess_env):
    config = {"broker_url": f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}", "task_default_queue": queue_name,
              "broker_transport_options": {"connect_args": {"timeout": 30}},
              "result_backend": f"db+sqlite:///{tmp_path / 'results.sqlite'}",
              "database_engine_options": {"connect_args": {"timeout": 30}}}
    app_url = f"sqlite:///{tmp_path / 'app.sqlite'}"
    settings = {"websauna.celery_config": repr(config), "sqlalchemy.url": app_url,
                "websauna_tasks.deadletter_queue": f"{queue_name}.dead",
                "websauna_tasks.max_message_bytes": str(MAX_MESSAGE_BYTES)}
    engine = sa.create_engine(app_url, poolclass=sa.pool.NullPool, connect_args={"timeout": 30})
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE ws_test_effects (id integer PRIMARY KEY, task_id text, value text)"))
        # No remote control: kombu's SQLAlchemy transport has no fanout exchange (docs/services.md).
        scenario(settings, engine, queue_name, make_app, write_ini, run_cli, ws_celery_worker_factory,
                 subprocess_env, remote_control=False)
    finally:
        engine.dispose()
