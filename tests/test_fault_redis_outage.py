"""Redis stopped and started again while 4 producer processes dispatch 10,000 tasks on commit.

A private Redis (append-only, fsync always: what it acknowledged survives
the stop) and a private PostgreSQL (tests/servers.py); the machine's
services are not touched. Four ``tests.apps.fault_producer`` processes each
commit 500 transactions of 5 producer rows and 5 ``tests.fault.effect``
tasks; one ws-celery worker (``-c 2``) runs them. When about 30% are
committed, Redis gets SIGTERM, stays down a few seconds and is started
again on the same port; neither the producers nor the worker are helped.

- Outbox on: every committed key has exactly one effect.
- Outbox off: messages published while Redis was down are gone although
  their transactions committed; that count is the figure (and the reason
  for the outbox).

The broker's visibility timeout is 20 s instead of an hour. A message the
worker had taken when Redis stopped, and whose acknowledgement or return to
the queue the outage cut off, stays in Redis's ``unacked`` set and is
delivered again only after that timeout (kombu's design). That is
at-least-once delivery working, and ``idempotent=True`` must turn it into
one effect; an hour-long timeout would only put it out of the test's reach.
"""
from __future__ import annotations

import base64
import collections
import glob
import json
import os
import pathlib
import time

import pytest
import sqlalchemy as sa
from celery import Celery

from tests import fault_outage
from tests.apps.fault_producer import COMMITS_DDL
from tests.fault_outage import (
    PER_COMMIT,
    PRODUCERS,
    QUEUE,
    TASKS,
    committed_count,
    effect_totals,
)
from tests.servers import PrivatePostgres, PrivateRedis

pytestmark = [pytest.mark.fault, pytest.mark.slow]
#: Share of the tasks committed when Redis is stopped.
STOP_AT = 0.30
OUTAGE_SECONDS = 5.0
#: Share of the tasks committed at which Redis comes back even if the outage is shorter:
#: on a fast, idle machine the producers would otherwise finish while it is down.
RESTART_BY = 0.80
#: Seconds before kombu delivers an unacknowledged message again (module docstring).
VISIBILITY_TIMEOUT = 20
#: Seconds after its publication an unfinished outbox row is sent again.
REDELIVER_AFTER = 60


@pytest.fixture
def servers(fault_servers):
    _broker, _database, engine = fault_servers
    with engine.begin() as conn:
        conn.execute(sa.text(COMMITS_DDL))
    return fault_servers


producers = fault_outage.producers  # the fixture


def write_fault_ini(tmp_path, broker: PrivateRedis, database: PrivatePostgres, outbox: bool) -> str:
    # The restore sweeps run every second, so a stranded message is back
    # about VISIBILITY_TIMEOUT seconds after it was taken.
    transport = {"visibility_timeout": VISIBILITY_TIMEOUT, "unacked_restore_interval": 1,
                 "unacked_restore_throttle": 1}
    celery = {"broker_url": broker.url, "task_default_queue": QUEUE, "task_ignore_result": True,
              "broker_transport_options": transport}
    # The redelivery delay is above the longest wait in the queue here (the backlog drains in
    # under a minute), so that only a message Redis lost is sent again (outbox/_redelivery.py).
    return fault_outage.write_fault_ini(tmp_path, celery, database.url, outbox, "fault-redis.ini",
                                        **{"websauna_tasks.outbox_redeliver_after_seconds": str(REDELIVER_AFTER)})


def key_of(payload: dict) -> str:
    """The key argument of a task message as kombu stores it in Redis."""
    return json.loads(base64.b64decode(payload["body"]))[0][0]


def queued_keys(client) -> set[str]:
    return {key_of(json.loads(raw)) for raw in client.lrange(QUEUE, 0, -1)}


def stranded_keys(client) -> set[str]:
    """Keys of messages a worker took from the queue and Redis still holds as unacknowledged.

    kombu keeps every delivered message in the ``unacked`` hash until it is
    acknowledged. A worker that loses its connection puts its messages back
    when it closes the channel, which fails while Redis is down: those stay
    in the hash until the visibility timeout returns them to the queue.
    """
    return {key_of(json.loads(raw)[0]) for raw in client.hvals("unacked")}


def holds_messages(client) -> bool:
    """Redis holds a message of the queue: waiting in it, or delivered and not acknowledged (kombu's ``unacked``)."""
    return bool(client.llen(QUEUE) or client.hlen("unacked"))


def worker_busy(broker: PrivateRedis, client) -> bool:
    """A message waits in the queue, or the worker runs or holds one (asked over Celery's remote control).

    Not kombu's ``unacked`` bookkeeping: after the outage it keeps entries
    that no acknowledgement removes (two runs of this test waited on them,
    and on ``unacked_index`` scores past the restart, with the worker idle).
    """
    if client.llen(QUEUE):
        return True
    app = Celery(broker=broker.url, set_as_current=False)
    try:
        inspect = app.control.inspect(timeout=1.0)
        active, reserved = inspect.active(), inspect.reserved()
    finally:
        app.close()
    if not active or not reserved:  # no answer yet: busy until the worker answers
        return True
    return any(active.values()) or any(reserved.values())


def aof_commands(workdir: str):
    """The commands of the private Redis's append-only file, in order (RESP arrays of bytes)."""
    for path in sorted(glob.glob(os.path.join(workdir, "appendonlydir", "*.incr.aof"))):
        data = pathlib.Path(path).read_bytes()
        pos = 0
        while pos < len(data):
            end = data.index(b"\r\n", pos)
            header, pos = data[pos:end], end + 2
            if not header.startswith(b"*"):
                continue
            args = []
            for _ in range(int(header[1:])):
                end = data.index(b"\r\n", pos)
                length = int(data[pos + 1:end])
                args.append(data[end + 2:end + 2 + length])
                pos = end + 4 + length
            yield args


def aof_fate(workdir: str, keys: list[str]) -> dict[str, str]:
    """What Redis's own log says became of the messages of ``keys``.

    Redis logs a worker's BRPOP as RPOP, each start of the server begins
    with a SELECT, and kombu records a message it has popped in the
    ``unacked`` hash in a second round trip: a message popped but never
    recorded there was lost between the two.
    """
    wanted = {json.dumps([key]).encode(): key for key in keys}
    queue = collections.deque()
    fate = {key: "never pushed" for key in keys}
    commands = list(aof_commands(workdir))
    for number, args in enumerate(commands):
        name = args[0].upper()
        if name == b"LPUSH" and args[1] == QUEUE.encode():
            for raw in args[2:]:
                body = json.loads(raw)["body"]
                decoded = base64.b64decode(body)
                key = next((key for marker, key in wanted.items() if decoded.startswith(b"[" + marker)), None)
                queue.appendleft((number, key, body.encode()))
        elif name == b"RPOP" and args[1] == QUEUE.encode() and queue:
            pushed, key, body = queue.pop()
            if key is None:
                continue
            recorded = None
            for later in range(number + 1, len(commands)):
                if commands[later][0].upper() == b"SELECT":
                    break
                if commands[later][0].upper() == b"HSET" and body in commands[later][-1]:
                    recorded = later
                    break
            where = f"recorded in unacked at #{recorded}" if recorded is not None else \
                "never recorded in unacked before Redis stopped (lost between the BRPOP and kombu's bookkeeping)"
            fate[key] = f"pushed at command #{pushed}, popped by a worker's BRPOP at #{number}, {where}"
    return fate


def missing_report(engine, client, workdir: str, worker_log: str, outbox: bool, limit: int = 10) -> str:
    """Where the first committed keys without an effect are: outbox row, Redis, worker log."""
    stranded = stranded_keys(client)
    with engine.connect() as conn:
        missing = [row[0] for row in conn.execute(sa.text(
            "SELECT c.key FROM fault_commits c LEFT JOIN fault_effects e ON e.key = c.key "
            "WHERE e.key IS NULL ORDER BY c.key LIMIT :limit"), {"limit": limit})]
        lines = [f"effects {effect_totals(engine)}; queue {client.llen(QUEUE)}, unacked {client.hlen('unacked')}; "
                 f"first keys without an effect: {missing}"]
        for key in missing:
            rows = conn.execute(sa.text("SELECT id, sent_at FROM websauna_tasks_outbox WHERE args = :args"),
                                {"args": json.dumps([key])}).all() if outbox else []
            where = ", ".join(f"outbox row {task_id} sent_at={sent_at}" for task_id, sent_at in rows) or "no outbox row"
            seen = [line for task_id, _sent in rows for line in worker_log.splitlines() if task_id in line]
            lines.append(f"{key}: {where}, stranded in unacked: {key in stranded}, worker log: {seen}")
    fates = aof_fate(workdir, missing) if missing else {}
    lines += [f"{key} in Redis's append-only file: {fate}" for key, fate in fates.items()]
    return "\n".join(lines + ["worker log tail:", worker_log[-4000:]])


def run_outage(outbox: bool, servers, tmp_path, ws_celery_worker_factory, subprocess_env, producers) -> dict:
    broker, database, engine = servers
    ini = write_fault_ini(tmp_path, broker, database, outbox)
    run = fault_outage.start_outage(ini, engine, ws_celery_worker_factory, subprocess_env, producers, STOP_AT)
    stopped = time.monotonic()
    broker.stop()
    # Down for OUTAGE_SECONDS, or until most tasks are committed: the restart
    # must land while the producers are still committing.
    outage_ends = stopped + OUTAGE_SECONDS
    while time.monotonic() < outage_ends and committed_count(engine) < RESTART_BY * TASKS:
        time.sleep(0.05)
    committed_at_restart = committed_count(engine)
    broker.start()  # same port, same append-only file
    restarted = time.monotonic()
    client = broker.client()
    try:
        # Taken by the worker before the stop and not acknowledged: each comes
        # back after the visibility timeout (or is acknowledged late).
        unacked_at_restart = len(stranded_keys(client))
        result = fault_outage.finish_outage(run, engine, outbox, lambda: holds_messages(client),
                                            timeout=REDELIVER_AFTER + 90.0,
                                            holds_messages=lambda: worker_busy(broker, client))
        stranded = stranded_keys(client)
        queued = queued_keys(client)
        output = result.pop("output")
        report = missing_report(engine, client, broker.workdir, output, outbox)
    finally:
        client.close()

    lost = result.pop("lost_keys")
    return {
        **result,
        "lost": len(lost), "stranded": len(lost & stranded), "queued": len(lost & queued),
        "gone": len(lost - stranded - queued), "committed_at_restart": committed_at_restart,
        "outage": restarted - stopped, "drain": result["last_effect"] - restarted,
        "unacked_at_restart": unacked_at_restart, "crashed": "Unrecoverable error" in output, "report": report,
    }


def figures(result: dict) -> str:
    slowest = max(summary["slowest_commit_seconds"] for summary in result["summaries"])
    if result["crashed"]:
        worker = "the worker DIED on the lost connection (Unrecoverable error in its log)"
    elif result["same_worker"]:
        worker = f"the same worker process throughout, no restart ({result['broker_losses']} connection loss(es))"
    else:
        worker = "the worker is gone"
    return (f"{TASKS} tasks dispatched by {PRODUCERS} producer processes in {result['commits']} commits "
            f"({len(result['committed'])} keys committed); Redis down {result['outage']:.1f}s, from "
            f"{result['committed_at_stop']} to {result['committed_at_restart']} keys committed "
            f"({result['committed_at_restart'] - result['committed_at_stop']} committed while it was down); "
            f"effects present {result['effects']}, distinct keys {result['distinct']}, duplicates "
            f"{result['duplicates']}, lost {result['lost']} ({result['gone']} not in Redis at all, "
            f"{result['queued']} still queued, {result['stranded']} still in Redis's unacked set); "
            f"{result['unacked_at_restart']} message(s) taken by the worker before the stop were unacknowledged "
            f"when Redis came back (each back after the {VISIBILITY_TIMEOUT}s visibility timeout), "
            f"{result['skipped_redeliveries']} redelivered run(s) skipped as already done; last effect "
            f"{result['drain']:.1f}s after the restart ({result['after_producers']:.1f}s after the producers exited, "
            f"{result['total']:.1f}s after they started; {result['settled']}); slowest commit {slowest:.2f}s; "
            f"{worker}")


def test_redis_outage_with_the_outbox_loses_nothing(servers, tmp_path, ws_celery_worker_factory, subprocess_env,
                                                    producers):
    result = run_outage(True, servers, tmp_path, ws_celery_worker_factory, subprocess_env, producers)
    committed, counts = result["committed"], result["counts"]
    fast_path = sum(summary["fast_path_published"] for summary in result["summaries"])
    print(f"\nFIGURE: outbox on: {figures(result)}; of the {TASKS} outbox rows the producers' fast path published "
          f"{fast_path} and the worker's relay the other {TASKS - fast_path - result['unsent']}, "
          f"{result['unsent']} left unsent; {result['redelivered']} sent again by the relay because their task "
          f"had not finished {REDELIVER_AFTER}s after their publication")
    assert len(committed) == TASKS and result["commits"] == TASKS // PER_COMMIT
    assert result["committed_at_restart"] > result["committed_at_stop"], "the producers committed while Redis was down"
    assert result["committed_at_restart"] < TASKS, "Redis came back mid-stream"
    assert result["same_worker"], "the worker survives the restart by itself\n" + result["report"]
    wrong = {key: counts.get(key, 0) for key in committed if counts.get(key, 0) != 1}
    assert not wrong, f"every committed key exactly once; effects per key: {dict(list(wrong.items())[:20])}\n" \
        + result["report"]
    assert result["strangers"] == 0
    assert result["unsent"] == 0


def test_redis_outage_without_the_outbox_loses_committed_tasks(servers, tmp_path, ws_celery_worker_factory,
                                                               subprocess_env, producers):
    result = run_outage(False, servers, tmp_path, ws_celery_worker_factory, subprocess_env, producers)
    print(f"\nFIGURE: outbox off: {figures(result)}; the lost tasks belong to transactions that committed (their "
          "producer rows are there)")
    assert len(result["committed"]) == TASKS and result["commits"] == TASKS // PER_COMMIT
    assert result["committed_at_restart"] > result["committed_at_stop"], "the producers committed while Redis was down"
    assert result["committed_at_restart"] < TASKS, "Redis came back mid-stream"
    assert result["same_worker"], "the worker survives the restart by itself\n" + result["report"]
    assert result["queued"] == 0
    assert result["duplicates"] == 0, "idempotent: no key ran twice"
    assert result["strangers"] == 0
    assert result["lost"] >= 1 and result["gone"] >= 1, "an outage under producers without the outbox costs tasks"
