"""Operator commands survive whatever the dead-letter list holds (real Redis).

Anything can LPUSH or RPUSH to a Redis list: each hostile entry here is
pushed straight into the list, next to real dead letters (made as a worker
makes them, from a real kombu message), then read by the Python functions
and by ``ws-celery INI -- ...``, in a subprocess and in-process.
"""
from __future__ import annotations

import hashlib
import json
import subprocess

import kombu
import pytest

import websauna_tasks.deadletters
from websauna_tasks import drop_dead_letter, list_dead_letters, prune_dead_letters, requeue_dead_letter
from websauna_tasks.deadletter import UNREADABLE_ENTRY, dead_letter, get_dead_letters
from websauna_tasks.operator_commands import COMMANDS

DEEP = b"[" * 100_000 + b"]" * 100_000
HUGE = b"x" * 5_000_000

#: (raw entry, a fragment of the reason it is unreadable)
HOSTILE = [
    (b"[1]", "an array, not an object"),
    (b'"text"', "a string, not an object"),
    (b"not json", "not JSON (Expecting value"),
    (b"", "not JSON"),
    (b"null", "null, not an object"),
    (b"5", "a number, not an object"),
    (b"true", "a boolean, not an object"),
    (b"{}", "no 'kind' field"),
    (b'{"id": 5, "message": "x"}', "no 'kind' field"),
    (b'{"kind": "unknown_task", "id": "r1"}', "no 'reason' field"),
    (b'{"kind": "unknown_task", "reason": "r", "id": 5}', "'id' is a number, not a string or null"),
    (b'{"kind": "unknown_task", "reason": ["r"], "id": "r2"}', "'reason' is an array, not a string"),
    (b'{"kind": "unknown_task", "reason": "r", "id": "m1", "message": "x"}',
     "'message' is a string, not an object or null"),
    (b'{"kind": "unknown_task", "reason": "r", "id": "p1", "queue": "q", "message": {"properties": "x"}}',
     "'message.properties' is a string, not an object"),
    (b'{"kind": "unknown_task", "reason": "r", "id": "d1", "queue": "q", '
     b'"message": {"properties": {"delivery_info": 7}}}',
     "'message.properties.delivery_info' is a number, not an object"),
    (b'{"kind": "unknown_task", "reason": "r", "id": "q1", "queue": ["q"]}',
     "'queue' is an array, not a string or null"),
    (b'{"kind": "unknown_task", "reason": "r", "id": "t1", "timestamp": 1' + b"0" * 400 + b"}",
     "'timestamp' is a number too large to be a time"),
    (b'{"kind": "unknown_task", "reason": "r", "task": ' + b"[" * 500 + b"]" * 500 + b"}",
     "JSON nested more than 200 levels deep"),
    (json.dumps({"kind": UNREADABLE_ENTRY, "reason": "r", "id": "u1"}).encode(), "marks entries that cannot be read"),
    (b'\xff\xfe{"kind": "unknown_task"}', "not JSON"),
    (b"1" * 5000, "not JSON (Exceeds the limit"),
    (DEEP, "JSON nested too deeply to read"),
    (HUGE, "not JSON"),
]
IDS = [raw[:40].decode("utf-8", "replace") or "empty" for raw, _ in HOSTILE]


def unreadable_id(raw: bytes) -> str:
    return f"unreadable-{hashlib.sha256(raw).hexdigest()[:16]}"


def marker(raw: bytes, fragment: str, entry: dict) -> None:
    """Assert that ``entry`` is the unreadable-entry dict of ``raw``, its reason containing ``fragment``."""
    assert entry.keys() == {"kind", "id", "reason", "raw", "size", "task", "queue", "exchange", "time", "timestamp",
                            "message"}, entry
    assert [entry[key] for key in ("task", "queue", "exchange", "time", "timestamp", "message")] == [None] * 6
    assert (entry["kind"], entry["id"], entry["size"]) == (UNREADABLE_ENTRY, unreadable_id(raw), len(raw))
    assert fragment in entry["reason"], entry["reason"]
    assert len(entry["reason"]) <= 200
    assert entry["raw"] == raw[:200].decode("utf-8", "replace")[:200]


@pytest.fixture
def settings(redis_url, queue_name):
    config = {"broker_url": redis_url, "task_default_queue": queue_name}
    return {"websauna.celery_config": repr(config), "websauna_tasks.deadletter_queue": f"{queue_name}.dead"}


@pytest.fixture
def run_here(capsys):
    """The command as ws-celery runs it, in this process: (exit status, stdout, stderr)."""

    def run(app, command: str, *args: str) -> tuple[int, str, str]:
        code = COMMANDS[command](app, list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def make_dead_letter(celery, queue_name: str, task_name: str = "tests.no_such_task") -> str:
    """Send a task, take its message off the queue and dead-letter it as a worker that lacks the task would."""
    task_id = celery.send_task(task_name, args=(1,), queue=queue_name).id
    with celery.connection_for_read() as connection:
        message = kombu.Queue(queue_name)(connection.default_channel).get(no_ack=True)
    assert message.headers["id"] == task_id
    dead_letter(get_dead_letters(celery), message, "unknown_task", KeyError(task_name))
    return task_id


def no_traceback(result: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr
    assert len(result.stderr.splitlines()) <= 1, result.stderr


@pytest.mark.parametrize("raw, fragment", HOSTILE, ids=IDS)
def test_python_functions_mark_the_entry_and_keep_going(celery, queue_name, redis_client, dead_key, raw, fragment):
    first = make_dead_letter(celery, queue_name)
    redis_client.rpush(dead_key, raw)
    last = make_dead_letter(celery, queue_name)

    entries = list_dead_letters(celery)
    assert [entry["id"] for entry in entries] == [first, unreadable_id(raw), last]
    marker(raw, fragment, entries[1])
    assert all(isinstance(entry, dict) for entry in entries)

    # The entry's own id, if it has one, never finds it: only its unreadable id does.
    for task_id in ("5", "m1", "p1", "d1", "q1", "t1", "u1", unreadable_id(raw)):
        assert requeue_dead_letter(celery, task_id, queue=f"{queue_name}.other") is False
    assert redis_client.llen(f"{queue_name}.other") == 0
    assert requeue_dead_letter(celery, last) is True
    assert prune_dead_letters(celery, 0) == 1  # first; an unreadable entry has no time to go by
    assert redis_client.lrange(dead_key, 0, -1) == [raw]
    assert drop_dead_letter(celery, unreadable_id(raw)) is True
    assert list_dead_letters(celery) == []


@pytest.mark.parametrize("raw, fragment", HOSTILE, ids=IDS)
def test_every_command_prints_lines_not_tracebacks(celery, run_here, queue_name, redis_client, dead_key, raw,
                                                   fragment):
    real = make_dead_letter(celery, queue_name)
    redis_client.rpush(dead_key, raw)
    marker_id = unreadable_id(raw)

    code, out, err = run_here(celery, "dead-letters", "list")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].split("  ")[1] == real
    assert lines[1].startswith(f"-  {marker_id}  -  -  unreadable entry of {len(raw)} bytes (")
    assert fragment in lines[1] and len(lines[1]) < 600

    code, out, err = run_here(celery, "dead-letters", "list", "--json")
    assert (code, err) == (0, "")
    assert [json.loads(line) for line in out.splitlines()] == list_dead_letters(celery)

    code, out, err = run_here(celery, "dead-letters", "requeue", marker_id)
    assert (code, out) == (1, "")
    assert err.startswith(f"ws-celery: dead letter {marker_id} in {dead_key} is an unreadable entry (")
    assert err.endswith("it cannot be requeued, only dropped\n") and len(err.splitlines()) == 1

    assert run_here(celery, "dead-letters", "requeue", real, "--queue", f"{queue_name}.other") == (
        0, f"requeued dead letter {real} to queue {queue_name}.other\n", "")
    assert run_here(celery, "dead-letters", "drop", "no-such-id") == (
        1, "", f"ws-celery: no dead letter with id no-such-id in {dead_key}\n")
    assert run_here(celery, "dead-letters", "prune", "--older-than", "0") == (
        0, f"removed 0 dead letter(s) older than 0 s from {dead_key}\n", "")
    assert run_here(celery, "dead-letters", "drop", marker_id) == (0, f"dropped dead letter {marker_id}\n", "")
    assert run_here(celery, "dead-letters", "list") == (0, f"no dead letters in {dead_key}\n", "")


def test_ws_celery_lists_every_hostile_entry_on_a_line_of_its_own(celery, ini, run_cli, queue_name, redis_client,
                                                                  dead_key):
    first = make_dead_letter(celery, queue_name)
    for raw, _ in HOSTILE:
        redis_client.rpush(dead_key, raw)
    last = make_dead_letter(celery, queue_name)

    result = run_cli(ini, "dead-letters", "list")
    assert result.returncode == 0, result.stderr
    no_traceback(result)
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert [line.split("  ")[1] for line in lines] == [first] + [unreadable_id(raw) for raw, _ in HOSTILE] + [last]
    for line, (raw, fragment) in zip(lines[1:-1], HOSTILE):
        assert f"unreadable entry of {len(raw)} bytes (" in line and fragment in line, line

    result = run_cli(ini, "dead-letters", "list", "--json")
    assert result.returncode == 0, result.stderr
    listed = [json.loads(line) for line in result.stdout.splitlines()]
    assert listed == list_dead_letters(celery)
    for entry, (raw, fragment) in zip(listed[1:-1], HOSTILE):
        marker(raw, fragment, entry)


def test_ws_celery_requeue_drop_and_prune_around_hostile_entries(celery, ini, run_cli, queue_name, redis_client,
                                                                 dead_key):
    for raw, _ in HOSTILE[:12]:
        redis_client.rpush(dead_key, raw)
    task_id = make_dead_letter(celery, queue_name)
    other = make_dead_letter(celery, queue_name)

    result = run_cli(ini, "dead-letters", "requeue", task_id)
    assert (result.returncode, result.stdout) == (0, f"requeued dead letter {task_id} to queue {queue_name}\n")
    assert [json.loads(raw)["headers"]["id"] for raw in redis_client.lrange(queue_name, 0, -1)] == [task_id]

    marker_id = unreadable_id(HOSTILE[0][0])
    result = run_cli(ini, "dead-letters", "requeue", marker_id)
    no_traceback(result)
    assert result.returncode == 1 and "is an unreadable entry (an array, not an object)" in result.stderr

    result = run_cli(ini, "dead-letters", "drop", marker_id)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"dropped dead letter {marker_id}\n", "")

    result = run_cli(ini, "dead-letters", "prune", "--older-than", "0")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == f"removed 1 dead letter(s) older than 0 s from {dead_key}\n"
    assert [entry["id"] for entry in list_dead_letters(celery)] == [unreadable_id(raw) for raw, _ in HOSTILE[1:12]]
    assert other not in {entry["id"] for entry in list_dead_letters(celery)}


#: Fields of types no worker writes, that no operator function depends on: such entries stay readable.
ODD = [
    {"kind": "unknown_task", "reason": "r", "id": "o1", "task": ["x"], "exchange": 5, "time": 1714564800,
     "timestamp": "yesterday", "message_head": {"a": 1}},
    {"kind": "unknown_task", "reason": "r", "id": "o2", "time": {"t": 1}, "timestamp": True, "extra": [None]},
    {"kind": "unknown_task", "reason": "r", "id": "o3", "timestamp": float("nan"), "time": "not a time"},
]


def test_odd_fields_no_command_depends_on_leave_an_entry_readable(celery, run_here, queue_name, redis_client,
                                                                  dead_key):
    for entry in ODD:
        redis_client.rpush(dead_key, json.dumps(entry))
    task_id = make_dead_letter(celery, queue_name)
    # An envelope whose headers no worker would take: requeued all the same, the worker's intake judges it.
    odd_headers = dict(list_dead_letters(celery)[-1], id="o4", time=None, timestamp=None)
    odd_headers["message"] = dict(odd_headers["message"], headers=[1])
    redis_client.rpush(dead_key, json.dumps(odd_headers))

    listed = list_dead_letters(celery)
    assert [entry["id"] for entry in listed] == ["o1", "o2", "o3", task_id, "o4"]
    assert listed[:2] == ODD[:2] and listed[2]["timestamp"] != listed[2]["timestamp"]  # NaN
    code, out, err = run_here(celery, "dead-letters", "list")
    assert (code, err) == (0, "")
    assert out.splitlines()[:3] == ["1714564800  o1  ['x']  -  r", "{'t': 1}  o2  -  -  r", "not a time  o3  -  -  r"]
    # No readable time: kept by prune, whatever the cut-off.
    assert prune_dead_letters(celery, 0) == 1
    assert [entry["id"] for entry in list_dead_letters(celery)] == ["o1", "o2", "o3", "o4"]
    assert run_here(celery, "dead-letters", "requeue", "o4", "--queue", f"{queue_name}.other") == (
        0, f"requeued dead letter o4 to queue {queue_name}.other\n", "")
    assert json.loads(redis_client.lpop(f"{queue_name}.other"))["headers"] == [1]
    for odd in ("o1", "o2", "o3"):
        assert drop_dead_letter(celery, odd) is True
    assert list_dead_letters(celery) == []


def test_a_huge_readable_entry_is_one_short_line(celery, run_here, redis_client, dead_key):
    reason = "line one\nline two\x1b[31m red " + "y" * 3_000_000
    entry = {"kind": "unknown_task", "reason": reason, "id": "big\nid", "task": "t\tq", "queue": "q",
             "time": "2024-05-01T12:00:00+00:00", "timestamp": 1714564800.0, "message": None}
    redis_client.rpush(dead_key, json.dumps(entry))
    assert list_dead_letters(celery) == [entry]
    code, out, err = run_here(celery, "dead-letters", "list")
    assert (code, err) == (0, "")
    (line,) = out.splitlines()
    cut = ("line one line two\\x1b[31m red " + "y" * 3_000_000)[:197] + "..."
    assert line.split("  ") == ["2024-05-01T12:00:00+00:00", "big id", "t q", "q", cut]
    # Kept whole, but not requeued: the letter holds no message.
    code, out, err = run_here(celery, "dead-letters", "requeue", "big\nid", "--queue", "q")
    assert (code, out) == (1, "")
    assert "keeps no whole message" in err and len(err.splitlines()) == 1


def test_an_empty_list_says_so_except_as_json(celery, ini, run_cli, dead_key):
    result = run_cli(ini, "dead-letters", "list")
    assert (result.returncode, result.stdout, result.stderr) == (0, f"no dead letters in {dead_key}\n", "")
    result = run_cli(ini, "dead-letters", "list", "--json")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_an_unexpected_error_is_one_line(celery, run_here, monkeypatch):
    def broken(app, **options):
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr(websauna_tasks.deadletters, "list_dead_letters", broken)
    assert run_here(celery, "dead-letters", "list") == (
        1, "", "ws-celery: dead-letters failed: RuntimeError: something broke\n")


def test_outbox_status_is_one_line_too(celery, run_here, redis_client, dead_key):
    redis_client.rpush(dead_key, b"not json")
    code, out, err = run_here(celery, "outbox-status")
    assert (code, out) == (2, "")
    assert err.startswith("ws-celery: the outbox is off") and len(err.splitlines()) == 1


# -- first and last seen: the history a requeue stamps on the message ---------------------------------------------

NOW = 1_800_000_000.0


@pytest.mark.parametrize("header", [
    None, "yesterday", [NOW - 5, 2], {"first": NOW - 5}, {"times": 2}, {"first": "NOW", "times": 2},
    {"first": float("nan"), "times": 2}, {"first": float("inf"), "times": 2}, {"first": NOW + 3600, "times": 2},
    {"first": -1, "times": 2}, {"first": NOW - 5, "times": 0}, {"first": NOW - 5, "times": True},
    {"first": True, "times": 2}, {"first": NOW - 5, "times": 10 ** 12}, {"first": NOW - 5, "times": 2.5},
])
def test_a_forged_history_header_counts_as_none(header):
    from websauna_tasks.deadletters._entries import HISTORY_HEADER, history

    assert history({HISTORY_HEADER: header}, NOW) == (NOW, 0)


def test_the_history_header_carries_the_first_time_and_the_count():
    from websauna_tasks.deadletters import HISTORY_HEADER, seen
    from websauna_tasks.deadletters._entries import history, with_history

    assert history({HISTORY_HEADER: {"first": NOW - 60, "times": 3}}, NOW) == (NOW - 60, 3)
    entry = {"kind": "unknown_task", "reason": "r", "id": "a", "timestamp": NOW, "first_seen": NOW - 60, "times": 4,
             "message": {"headers": {"id": "a"}, "body": "x"}}
    assert seen(entry) == (NOW - 60, NOW, 4)
    stamped = with_history(entry)
    assert stamped["message"]["headers"] == {"id": "a", HISTORY_HEADER: {"first": NOW - 60, "times": 4}}
    assert entry["message"]["headers"] == {"id": "a"}  # the stored entry is not changed
    # Entries from before the history was kept, or with odd values, read as seen once.
    for odd in ({}, {"first_seen": NOW + 1, "times": 2}, {"first_seen": NOW - 1, "times": "2"},
                {"first_seen": None, "times": 2}):
        assert seen({"kind": "k", "reason": "r", "timestamp": NOW, **odd}) == (NOW, NOW, 1), odd
    # Headers that are not a dict are left as they are.
    odd_headers = dict(entry, message={"headers": "x"})
    assert with_history(odd_headers) is odd_headers


def test_the_redis_list_is_searched_by_id_in_redis_across_chunks(redis_url, redis_client, dead_key, monkeypatch):
    from websauna_tasks.deadletters import RedisStore, _redis

    monkeypatch.setattr(_redis, "FIND_CHUNK", 3)  # ten entries: four calls of the script
    letter = {"kind": "unknown_task", "reason": "r", "queue": "q", "message": None}
    raws = [json.dumps(dict(letter, id=f"other-{n}")) for n in range(10)]
    raws[1] = json.dumps(dict(letter, id="wanted"))
    raws[7] = json.dumps(dict(letter, id="wanted", reason="again"))
    raws[4] = json.dumps(dict(letter, id="decoy", reason='"wanted"'))  # holds the id's bytes, is not it
    raws[5] = json.dumps(dict(letter, id="ünï"))  # ASCII-escaped, as workers write it
    raws[9] = json.dumps(dict(letter, id="ünï", reason="raw UTF-8"), ensure_ascii=False)
    redis_client.rpush(dead_key, *[raw.encode() for raw in raws])
    store = RedisStore(redis_url, dead_key)
    assert [entry.get("reason") for _raw, entry in store.find("wanted")] == ["r", "again"]
    assert [entry["reason"] for _raw, entry in store.find("ünï")] == ["r", "raw UTF-8"]
    assert list(store.find("decoy"))[0][1]["reason"] == '"wanted"'
    assert list(store.find("nobody")) == []
    assert [entry["id"] for _raw, entry in store.find("other-9")] == [] and len(list(store.find("other-8"))) == 1
