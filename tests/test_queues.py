"""Declared queues: parsing, back-off, undeclared queues, and each limit proven with real ws-celery workers.

Worker tests record every run in PostgreSQL (tests/apps/queue_tasks.py) with
time.time() timestamps taken in the worker processes of this machine, and
check the recorded figures. Timing checks favour lower bounds (a limit may
make things slower, never faster); the few upper bounds are generous
because other suites may share the machine's two cores.
"""
from __future__ import annotations

import time
import uuid

import pytest
import transaction
from celery.result import AsyncResult
from pyramid.exceptions import ConfigurationError
from sqlalchemy import text

from tests.apps import deferred_functions, queue_tasks
from websauna_tasks import UndeclaredQueue, backoff_seconds, defer, get_celery, get_queues, list_dead_letters
from websauna_tasks.defer import DEFERRED_TASK_NAME
from websauna_tasks.queues import QueueConfig, RedisLimits, hold_slot, parse_queues

# -- helpers -------------------------------------------------------------------------------------


def make_queue_app(settings: dict[str, str]):
    from tests.apps.queue_app import main

    return main({}, **settings)


def queue_settings(redis_url: str, database_url: str, default_queue: str, queues: list[dict] | None,
                   **extra: str) -> dict[str, str]:
    celery = {"broker_url": redis_url, "result_backend": redis_url, "task_default_queue": default_queue,
              "result_expires": 600}
    settings = {"websauna.celery_config": repr(celery), "sqlalchemy.url": database_url}
    if queues is not None:
        settings["websauna_tasks.queues"] = repr(queues)
    settings.update(extra)
    return settings


def write_queue_ini(tmp_path, settings: dict[str, str]) -> str:
    lines = ["[app:main]", "use = call:tests.apps.queue_app:main"]
    lines += [f"{key} = {value}" for key, value in settings.items()]
    path = tmp_path / f"queues-{uuid.uuid4().hex[:6]}.ini"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def start_workers(factory, ini: str, env: dict[str, str], *worker_args: tuple[str, ...]):
    """Start several workers at once (their start-ups overlap), then wait until each is ready."""
    workers = [factory(ini, "worker", "-l", "info", "-n", f"w{index}-{uuid.uuid4().hex[:6]}@%h", *args,
                       ready=None, env=env)
               for index, args in enumerate(worker_args)]
    for worker in workers:
        worker.wait_for_output("ready.", timeout=60)
    return workers


def runs(db, label: str | None = None) -> list[dict]:
    query = f"SELECT * FROM {queue_tasks.RUNS_TABLE}" + (" WHERE label = :label" if label else "") + " ORDER BY id"
    with db.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(text(query), {"label": label})]


def wait_all(results, timeout: float = 30.0) -> list:
    return [result.get(timeout=timeout, propagate=False) for result in results]


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    # An end at the same instant as a start is counted first: touching is not overlapping.
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = highest = 0
    for _, change in events:
        running += change
        highest = max(highest, running)
    return highest


def busiest_second(starts: list[float]) -> int:
    """The most starts in any half-open window [t, t + 1s) beginning at a start."""
    starts = sorted(starts)
    return max(sum(1 for other in starts if start <= other < start + 1.0) for start in starts)


@pytest.fixture
def runs_db(db):
    with db.begin() as conn:
        conn.execute(text(f"DROP TABLE IF EXISTS {queue_tasks.RUNS_TABLE}"))
        conn.execute(text(queue_tasks.CREATE_RUNS_TABLE))
    return db


@pytest.fixture
def names(queue_name, redis_url):
    """Queue names private to this test; their Redis lists and limit keys are deleted afterwards."""
    import redis

    yield lambda suffix: f"{queue_name}-{suffix}"
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=f"*{queue_name}*", count=1000):
        client.delete(key)
    client.close()


# -- back-off ------------------------------------------------------------------------------------

def test_backoff_matches_the_cloud_tasks_example():
    # Cloud Tasks' RetryConfig.max_doublings: min 10s, max 300s, 3 doublings.
    assert [backoff_seconds(n, 10, 300, 3) for n in range(1, 10)] == [10, 20, 40, 80, 160, 240, 300, 300, 300]


def test_backoff_after_the_doublings_grows_by_the_last_doubled_step():
    assert [backoff_seconds(n, 1, 100, 2) for n in range(1, 8)] == [1, 2, 4, 8, 12, 16, 20]
    # No doubling: linear from the start.
    assert [backoff_seconds(n, 5, 100, 0) for n in range(1, 5)] == [5, 10, 15, 20]
    assert [backoff_seconds(n, 3, 3, 5) for n in range(1, 4)] == [3, 3, 3]


def test_backoff_edges():
    assert backoff_seconds(5000, 0.1, 3600, 10**9) == 3600, "huge doubling counts must not overflow"
    assert backoff_seconds(3, 0, 10, 3) == 0
    with pytest.raises(ValueError):
        backoff_seconds(0, 1, 2, 3)


@pytest.mark.parametrize("max_attempts, retried_after", [
    (None, set()), (0, set()), (1, set()), (3, {1, 2}), (-1, set(range(1, 200))),
])
def test_max_attempts_counts_runs_in_all(max_attempts, retried_after):
    queue = QueueConfig("q", max_attempts=max_attempts, min_backoff_seconds=1, max_backoff_seconds=1)
    retried = {failed for failed in range(1, 200) if queue.next_attempt_in(failed, 0.0) is not None}
    assert retried == retried_after


def test_max_retry_duration_refuses_an_attempt_that_would_start_after_it():
    queue = QueueConfig("q", max_attempts=-1, min_backoff_seconds=2, max_backoff_seconds=2,
                        max_retry_duration_seconds=10)
    assert queue.next_attempt_in(1, 7.9) == 2
    assert queue.next_attempt_in(1, 8.1) is None
    assert QueueConfig("q", max_attempts=-1).next_attempt_in(100, 10**6) is not None, "0 means no time limit"


# -- parsing -------------------------------------------------------------------------------------

EXAMPLE = ('[{"name": "emails", "rate_per_second": 5, "max_concurrent": 2, "max_attempts": 5, '
           '"min_backoff_seconds": 1, "max_backoff_seconds": 60, "max_doublings": 3, '
           '"max_retry_duration_seconds": 600}, {"name": "reports"}]')


def test_the_documented_example_parses():
    emails, reports = parse_queues(EXAMPLE)
    assert emails == QueueConfig("emails", rate_per_second=5.0, max_concurrent=2, max_attempts=5,
                                 min_backoff_seconds=1.0, max_backoff_seconds=60.0, max_doublings=3,
                                 max_retry_duration_seconds=600.0)
    assert reports == QueueConfig("reports")
    with pytest.raises(AttributeError):
        emails.max_attempts = 1  # frozen


@pytest.mark.parametrize("value, expected", [
    ('{"name": "a"}', "must be a list of dicts"),
    ('["a"]', "queue #1: must be a dict"),
    ('[{"rate_per_second": 1}]', "queue #1: name: a non-empty string is required"),
    ('[{"name": "a,b"}]', "queue 'a,b': name: must not contain commas or whitespace"),
    ('[{"name": "emails", "rate": 5}]', "queue 'emails': unknown key 'rate' (did you mean 'rate_per_second'?)"),
    ('[{"name": "emails", "rate_max_concurrent": 5}]', "did you mean 'max_concurrent'?"),
    ('[{"name": "emails", "max_atempts": 5}]',
     "queue 'emails': unknown key 'max_atempts' (did you mean 'max_attempts'?)"),
    ('[{"name": "emails", "max_concurrent": 2.5}]', "queue 'emails': max_concurrent: must be an integer, got 2.5"),
    ('[{"name": "emails", "max_attempts": True}]', "queue 'emails': max_attempts: must be an integer, got True"),
    ('[{"name": "emails", "rate_per_second": "5"}]', "queue 'emails': rate_per_second: must be a number, got '5'"),
    ('[{"name": "emails", "rate_per_second": 1e999}]', "queue 'emails': rate_per_second: must be a number"),
    ('[{"name": "emails", "min_backoff_seconds": -1}]', "queue 'emails': min_backoff_seconds: must be 0 or more"),
    ('[{"name": "emails", "max_attempts": -2}]', "queue 'emails': max_attempts: must be -1 (unlimited) or more"),
    ('[{"name": "emails", "rate_per_second": 0}]', "queue 'emails': rate_per_second: 0 would never run a task"),
    ('[{"name": "emails", "max_concurrent": 0}]', "queue 'emails': max_concurrent: 0 would never run a task"),
    ('[{"name": "emails", "min_backoff_seconds": 9, "max_backoff_seconds": 3}]',
     "queue 'emails': min_backoff_seconds (9) is greater than max_backoff_seconds (3)"),
    ('[{"name": "emails", "min_backoff_seconds": 5000}]',
     "queue 'emails': min_backoff_seconds (5000) is greater than max_backoff_seconds (600, the default)"),
    ('[{"name": "emails"}, {"name": "emails"}]', "queue 'emails': name: declared twice"),
    ('[{"name": __import__("os").getcwd()}]', "websauna_tasks.queues: "),
])
def test_invalid_declarations_name_the_queue_and_the_key(value, expected):
    with pytest.raises(ConfigurationError) as caught:
        parse_queues(value)
    assert expected in str(caught.value)
    assert str(caught.value).startswith("websauna_tasks.queues: ")


def test_invalid_declaration_fails_at_app_start(redis_url, database_url, queue_name):
    settings = queue_settings(redis_url, database_url, queue_name, None,
                              **{"websauna_tasks.queues": '[{"name": "emails", "max_attempts": "5"}]'})
    with pytest.raises(ConfigurationError, match="queue 'emails': max_attempts: must be an integer"):
        make_queue_app(settings)


@pytest.mark.parametrize("key, value, expected", [
    ("websauna_tasks.allow_undeclared_queues", "perhaps", "expected true or false"),
    ("websauna_tasks.queue_wait_seconds", "-1", "must be 0 to 3600 seconds"),
    ("websauna_tasks.limits_redis_url", "http://x", "expected a redis:// URL"),
])
def test_invalid_queue_settings_are_refused(redis_url, database_url, queue_name, key, value, expected):
    settings = queue_settings(redis_url, database_url, queue_name, [{"name": "q", "rate_per_second": 1}],
                              **{key: value})
    with pytest.raises(ConfigurationError, match=expected):
        make_queue_app(settings)


def test_backoff_longer_than_the_redis_visibility_timeout_is_refused(redis_url, database_url, queue_name):
    slow = [{"name": "slow", "max_attempts": 3, "max_backoff_seconds": 3600}]
    with pytest.raises(ConfigurationError, match=r"queue 'slow': max_backoff_seconds \(3600\) is not shorter than "
                                                 r"the Redis broker's visibility_timeout \(3600\)"):
        make_queue_app(queue_settings(redis_url, database_url, queue_name, slow))
    celery = {"broker_url": redis_url, "broker_transport_options": {"visibility_timeout": 7200}}
    make_queue_app({"websauna.celery_config": repr(celery), "sqlalchemy.url": database_url,
                    "websauna_tasks.queues": repr(slow)})


def test_limits_need_redis(database_url, redis_url, queue_name):
    memory = {"websauna.celery_config": repr({"broker_url": "memory://"}), "sqlalchemy.url": database_url}
    with pytest.raises(ConfigurationError) as caught:
        make_queue_app({**memory, "websauna_tasks.queues": repr([{"name": "emails", "max_concurrent": 2}])})
    assert "websauna_tasks.limits_redis_url" in str(caught.value) and "'emails'" in str(caught.value)
    # Attempts alone need no Redis; a Redis for the limits can be named.
    make_queue_app({**memory, "websauna_tasks.queues": repr([{"name": "emails", "max_attempts": 3}])})
    app = make_queue_app({**memory, "websauna_tasks.queues": repr([{"name": "emails", "max_concurrent": 2}]),
                          "websauna_tasks.limits_redis_url": redis_url})
    assert get_queues(app.registry).limits.url == redis_url
    # Eager mode runs tasks in the caller: no worker to limit, nothing to keep in Redis.
    eager = {"websauna.celery_config": repr({"broker_url": "memory://", "task_always_eager": True}),
             "sqlalchemy.url": database_url}
    app = make_queue_app({**eager, "websauna_tasks.queues": repr([{"name": "emails", "max_concurrent": 2}])})
    assert get_queues(app.registry).limits is None


def test_declared_queues_become_celery_queues_with_the_default(redis_url, database_url, queue_name):
    celery = {"broker_url": redis_url, "task_default_queue": queue_name,
              "task_queues": {"legacy": {"exchange": "legacy", "routing_key": "legacy.key"}}}
    app = make_queue_app({"websauna.celery_config": repr(celery), "sqlalchemy.url": database_url,
                          "websauna_tasks.queues": EXAMPLE})
    queues = get_celery(app.registry).amqp.queues
    assert set(queues) == {queue_name, "legacy", "emails", "reports"}
    assert queues["emails"].routing_key == "emails" and queues["legacy"].routing_key == "legacy.key"
    config = get_queues(app.registry)
    assert config.allowed == {queue_name, "legacy", "emails", "reports"}
    assert config.queues["emails"].max_concurrent == 2
    with pytest.raises(TypeError):
        config.queues["other"] = None  # read-only mapping


# -- undeclared queues ---------------------------------------------------------------------------

@pytest.fixture
def declared_app(redis_url, database_url, names, db):
    return make_queue_app(queue_settings(redis_url, database_url, names("default"), [{"name": names("emails")}]))


def test_undeclared_queue_is_refused_by_apply_async_and_defer(declared_app, names, redis_client):
    emails, typo = names("emails"), names("emals")
    with pytest.raises(UndeclaredQueue) as caught:
        queue_tasks.timed.apply_async(("x",), queue=typo, tm=None)
    assert f"queue '{typo}' is not declared" in str(caught.value)
    assert f"declared: {names('default')}, {emails}" in str(caught.value)
    assert "websauna_tasks.allow_undeclared_queues" in str(caught.value)

    tm = transaction.TransactionManager(explicit=True)
    with tm:
        with pytest.raises(UndeclaredQueue):
            queue_tasks.timed.apply_async(("x",), queue=typo, tm=tm)  # in the caller, not after the commit
    with pytest.raises(UndeclaredQueue, match=typo):
        defer(deferred_functions.record, "x", _queue=typo, _registry=declared_app.registry)
    assert redis_client.llen(typo) == 0

    queue_tasks.timed.apply_async(("ok",), queue=emails, tm=None)
    defer(deferred_functions.record, "d", _registry=declared_app.registry)  # "default": the app's default queue
    defer(deferred_functions.record, "e", _queue=emails, _registry=declared_app.registry)
    assert redis_client.llen(emails) == 2 and redis_client.llen(names("default")) == 1


def test_defer_default_is_the_declared_queue_named_default(redis_url, database_url, names, db):
    from websauna_tasks import dispatch

    class Sink:
        def __init__(self):
            self.messages = []

        def capture(self, message):
            self.messages.append(message)

    sink = Sink()
    previous = dispatch.set_message_sink(sink)
    try:
        app = make_queue_app(queue_settings(redis_url, database_url, names("default"), [{"name": "default"}]))
        defer(deferred_functions.record, "x", _registry=app.registry)
        app = make_queue_app(queue_settings(redis_url, database_url, names("default"), [{"name": names("q")}]))
        defer(deferred_functions.record, "y", _registry=app.registry)
    finally:
        dispatch.set_message_sink(previous)
    assert [message.options.get("queue") for message in sink.messages] == ["default", None]


def test_undeclared_queues_allowed_by_the_setting(redis_url, database_url, names, db, redis_client):
    app = make_queue_app(queue_settings(redis_url, database_url, names("default"), [{"name": names("emails")}],
                                        **{"websauna_tasks.allow_undeclared_queues": "true"}))
    queue_tasks.timed.apply_async(("x",), queue=names("other"), tm=None)
    defer(deferred_functions.record, "x", _queue=names("other"), _registry=app.registry)
    assert redis_client.llen(names("other")) == 2


def test_without_declared_queues_nothing_is_checked(redis_url, database_url, names, db, redis_client):
    make_queue_app(queue_settings(redis_url, database_url, names("default"), None))
    queue_tasks.timed.apply_async(("x",), queue=names("anything"), tm=None)
    assert redis_client.llen(names("anything")) == 1


# -- the Redis limits, without a worker ------------------------------------------------------------

@pytest.fixture
def limits(redis_url, names):
    return RedisLimits(redis_url, f"wstest:{names('limits')}:")


def test_concurrency_slots_are_counted_and_released(limits):
    first, second = limits.take_slot("q", 2), limits.take_slot("q", 2)
    assert first is not None and second is not None
    assert limits.take_slot("q", 2) is None
    first.release()
    third = limits.take_slot("q", 2)
    assert third is not None
    second.release()
    third.release()


def test_a_slot_that_is_not_renewed_expires(limits):
    # As when the worker holding it was killed: nobody renews its lease.
    assert limits.take_slot("q", 1, lease_seconds=0.3) is not None
    assert limits.take_slot("q", 1) is None
    time.sleep(0.5)
    assert limits.take_slot("q", 1) is not None


def test_a_held_slot_is_renewed_past_its_lease(limits):
    lease = hold_slot(limits, "q", 1, lease_seconds=0.3)
    time.sleep(1.0)
    assert limits.take_slot("q", 1) is None, "the keeper thread must have renewed the lease"
    lease.release()
    assert limits.take_slot("q", 1) is not None


def test_rate_reservations_are_spaced_by_the_rate(limits):
    waits = [limits.reserve_start("q", 10, max_wait=1.0) for _ in range(3)]
    assert [reserved for reserved, _ in waits] == [True, True, True]
    assert waits[0][1] == pytest.approx(0.0, abs=0.02)
    assert waits[1][1] == pytest.approx(0.1, abs=0.02) and waits[2][1] == pytest.approx(0.2, abs=0.02)
    reserved, wait = limits.reserve_start("q", 10, max_wait=0.15)
    assert not reserved and wait == pytest.approx(0.3, abs=0.02)
    # Refused reservations take nothing: the next free start is still 0.3 s away.
    assert limits.reserve_start("q", 10, max_wait=1.0)[1] == pytest.approx(0.3, abs=0.03)


# -- with real workers -----------------------------------------------------------------------------

def test_rate_holds_across_two_workers(redis_url, database_url, names, runs_db, tmp_path,
                                       ws_celery_worker_factory, subprocess_env):
    queue = names("rate")
    settings = queue_settings(redis_url, database_url, names("default"), [{"name": queue, "rate_per_second": 5}])
    start_workers(ws_celery_worker_factory, write_queue_ini(tmp_path, settings), subprocess_env,
                  ("-c", "2"), ("-c", "2"))
    make_queue_app(settings)
    results = [queue_tasks.timed.apply_async((f"r{i}",), queue=queue, tm=None) for i in range(20)]
    assert wait_all(results) == [f"r{i}" for i in range(20)]
    rows = runs(runs_db)
    starts = sorted(row["started"] for row in rows)
    span, busiest = starts[-1] - starts[0], busiest_second(starts)
    print(f"\nrate 5/s, 20 tasks, 2 workers x 2 processes: span {span:.2f}s, busiest second {busiest}, "
          f"pids {len({row['pid'] for row in rows})}")
    assert len(rows) == 20 and len({row["pid"] for row in rows}) >= 2
    # Starts are at least 1/5 s apart: 19 gaps. Tolerance 0.15 s for timer and clock jitter.
    assert span >= 19 / 5 - 0.15
    # The rate allows 5 starts in any [t, t + 1s); +2 because a start is recorded after the worker
    # process wakes up, and on a loaded machine that can be late (a one-second burst would give 10).
    assert busiest <= 5 + 2
    assert {row["retries"] for row in rows} == {0}, "waiting for the rate is not an attempt"


def test_max_concurrent_holds_across_two_workers(redis_url, database_url, names, runs_db, tmp_path,
                                                 ws_celery_worker_factory, subprocess_env):
    queue = names("concurrent")
    settings = queue_settings(redis_url, database_url, names("default"), [{"name": queue, "max_concurrent": 2}],
                              **{"websauna_tasks.queue_wait_seconds": "0.3"})
    workers = start_workers(ws_celery_worker_factory, write_queue_ini(tmp_path, settings), subprocess_env,
                            ("-c", "3"), ("-c", "3"))
    app = make_queue_app(settings)
    # Failing runs too: a slot they did not give back would starve the others for a minute.
    failing = [queue_tasks.fails_until.apply_async((f"f{i}",), queue=queue, tm=None) for i in range(3)]
    results = [queue_tasks.timed.apply_async((f"c{i}", 0.4), queue=queue, tm=None) for i in range(12)]
    assert sorted(wait_all(results)) == sorted(f"c{i}" for i in range(12)), "every task finishes"
    assert all(isinstance(error, RuntimeError) for error in wait_all(failing))
    limits = get_queues(app.registry).limits
    assert limits.client().zcard(limits.key(queue, "running")) == 0, "every slot was given back"
    rows = [row for row in runs(runs_db) if row["ended"] is not None]
    overlap = max_overlap([(row["started"], row["ended"]) for row in rows])
    requeued = sum(worker.output().count("(not an attempt)") for worker in workers)
    wall = max(row["ended"] for row in rows) - min(row["started"] for row in rows)
    print(f"\nmax_concurrent 2, 12 x 0.4 s, 2 workers x 3 processes: max overlap {overlap}, "
          f"wall {wall:.2f}s, re-queued {requeued} times")
    assert len(rows) == 12 and overlap == 2
    assert wall >= 12 * 0.4 / 2 - 0.05
    assert {row["retries"] for row in rows} == {0}, "waiting for a slot is not an attempt"


def attempt_queues(names) -> list[dict]:
    return [
        {"name": names("three"), "max_attempts": 3, "min_backoff_seconds": 0.2, "max_backoff_seconds": 0.2},
        {"name": names("zero"), "max_attempts": 0},
        {"name": names("one"), "max_attempts": 1},
        {"name": names("unlimited"), "max_attempts": -1, "min_backoff_seconds": 0.1, "max_backoff_seconds": 0.1},
        {"name": names("backoff"), "max_attempts": 6, "min_backoff_seconds": 0.25, "max_backoff_seconds": 1.5,
         "max_doublings": 2},
        {"name": names("duration"), "max_attempts": -1, "min_backoff_seconds": 0.5, "max_backoff_seconds": 0.5,
         "max_retry_duration_seconds": 2},
    ]


def test_attempts_backoff_and_retry_duration(redis_url, database_url, names, runs_db, tmp_path,
                                             ws_celery_worker_factory, subprocess_env):
    queues = attempt_queues(names)
    settings = queue_settings(redis_url, database_url, names("default"), queues)
    start_workers(ws_celery_worker_factory, write_queue_ini(tmp_path, settings), subprocess_env, ("-c", "4"))
    make_queue_app(settings)
    sent = {label: queue_tasks.fails_until.apply_async((label, succeed_on), queue=names(label), tm=None)
            for label, succeed_on in [("three", 0), ("zero", 0), ("one", 0), ("unlimited", 4), ("backoff", 0),
                                      ("duration", 0)]}
    outcome = {label: result.get(timeout=30, propagate=False) for label, result in sent.items()}
    count = {label: len(runs(runs_db, label)) for label in sent}

    assert count["three"] == 3 and isinstance(outcome["three"], RuntimeError)
    assert count["zero"] == 1 and count["one"] == 1
    assert count["unlimited"] == 4 and outcome["unlimited"] == 4 and sent["unlimited"].state == "SUCCESS"
    assert [row["retries"] for row in runs(runs_db, "three")] == [0, 1, 2]

    starts = [row["started"] for row in runs(runs_db, "backoff")]
    intervals = [later - earlier for earlier, later in zip(starts, starts[1:])]
    expected = [backoff_seconds(n, 0.25, 1.5, 2) for n in range(1, 6)]
    print(f"\nback-off 0.25..1.5 s, 2 doublings: expected {expected}, measured "
          f"{[round(interval, 3) for interval in intervals]}")
    assert count["backoff"] == 6 and expected == [0.25, 0.5, 1.0, 1.5, 1.5]
    for interval, wanted in zip(intervals, expected):
        assert wanted - 0.02 <= interval <= wanted + 1.0, (intervals, expected)

    starts = [row["started"] for row in runs(runs_db, "duration")]
    print(f"max_retry_duration 2 s at 0.5 s intervals: {len(starts)} runs over {starts[-1] - starts[0]:.2f}s")
    assert isinstance(outcome["duration"], RuntimeError), "retries must stop (unlimited attempts otherwise)"
    assert 2 <= len(starts) <= 5 and starts[-1] - starts[0] <= 2.0 + 0.05


def test_the_tasks_own_retry_rules_come_first(redis_url, database_url, names, runs_db, tmp_path,
                                             ws_celery_worker_factory, subprocess_env):
    generous = {"max_attempts": 5, "min_backoff_seconds": 0.1, "max_backoff_seconds": 0.1}
    queues = [{"name": names("generous"), **generous}, {"name": names("twice"), **generous, "max_attempts": 2}]
    settings = queue_settings(redis_url, database_url, names("default"), queues)
    worker, = start_workers(ws_celery_worker_factory, write_queue_ini(tmp_path, settings), subprocess_env,
                            ("-c", "3"))
    app = make_queue_app(settings)
    own = queue_tasks.own_retries.apply_async(("own",), queue=names("generous"), tm=None)
    auto = queue_tasks.auto_retries.apply_async(("auto",), queue=names("generous"), tm=None)
    conflict = queue_tasks.conflicting.apply_async(("conflict",), queue=names("twice"), tm=None)
    refused = get_celery(app.registry).send_task(DEFERRED_TASK_NAME, args=["os:getcwd", [], {}],
                                                 queue=names("generous"))
    own_error, auto_error, conflict_error, refused_error = wait_all([own, auto, conflict, refused])

    # self.retry() with max_retries=1: two runs, then its error is final (the queue would allow 5).
    assert isinstance(own_error, ValueError) and len(runs(runs_db, "own")) == 2
    # autoretry_for with max_retries=2: three runs.
    assert isinstance(auto_error, KeyError) and len(runs(runs_db, "auto")) == 3
    # Conflict retries are inside a run: 3 per attempt, 2 attempts.
    assert type(conflict_error).__name__ == "TransientError"
    assert [row["retries"] for row in runs(runs_db, "conflict")] == [0, 0, 0, 1, 1, 1]
    # A refused deferred path never runs: the intake moves it aside once, whatever the queue allows.
    assert type(refused_error).__name__ == "DeferNotAllowed"
    assert worker.output().count(f"message id {refused.id} task {DEFERRED_TASK_NAME}") == 1
    assert any(letter["id"] == refused.id and letter["kind"] == "refused_deferred"
               for letter in list_dead_letters(app.registry))


def test_worker_with_q_consumes_only_that_queue(redis_url, database_url, names, runs_db, tmp_path, redis_client,
                                                ws_celery_worker_factory, subprocess_env):
    emails, reports, default = names("emails"), names("reports"), names("default")
    settings = queue_settings(redis_url, database_url, default, [{"name": emails}, {"name": reports}])
    worker, = start_workers(ws_celery_worker_factory, write_queue_ini(tmp_path, settings), subprocess_env,
                            ("-Q", emails))
    make_queue_app(settings)
    queue_tasks.timed.apply_async(("to-reports",), queue=reports, tm=None)
    queue_tasks.timed.apply_async(("to-default",), tm=None)
    assert AsyncResult(queue_tasks.timed.apply_async(("to-emails",), queue=emails, tm=None).id).get(timeout=30)
    time.sleep(1.0)  # time enough for the worker to take anything else it would
    assert [row["label"] for row in runs(runs_db)] == ["to-emails"]
    assert redis_client.llen(reports) == 1 and redis_client.llen(default) == 1
    assert f".> {emails}" in worker.output() and f".> {reports}" not in worker.output()

