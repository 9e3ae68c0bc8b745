"""Beat schedules from the INI: normalization, errors naming the entry, a real beat + worker."""
from __future__ import annotations

from datetime import timedelta

import pytest
from celery.schedules import crontab, schedule
from pyramid.exceptions import ConfigurationError
from sqlalchemy import text

from websauna_tasks import get_celery
from websauna_tasks.schedule import (
    normalize_beat_schedule,
    normalize_schedule,
    parse_cron,
)
from websauna_tasks.testing import wait_for

# -- cron strings -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("expression, expected", [
    ("*/5 * * * *", crontab(minute="*/5")),
    ("0 3 * * *", crontab(minute=0, hour=3)),
    ("30 9 * * mon-fri", crontab(minute=30, hour=9, day_of_week="mon-fri")),
    ("0 0 1 */3 *", crontab(minute=0, hour=0, day_of_month=1, month_of_year="*/3")),
    ("  15,45  8-18   *  *  0 ", crontab(minute="15,45", hour="8-18", day_of_week=0)),
])
def test_cron_string_becomes_crontab_in_cron_field_order(expression, expected):
    result = parse_cron(expression)
    assert isinstance(result, crontab)
    assert result == expected


@pytest.mark.parametrize("expression, error", [
    ("*/5 * * *", "needs 5 fields"),
    ("0 0 * * * *", "needs 5 fields"),
    ("", "needs 5 fields"),
    ("61 * * * *", "invalid cron string"),
    ("* 24 * * *", "invalid cron string"),
    ("every minute * * *", "invalid cron string"),
    ("*/0 * * * *", "invalid cron string"),
    ("* * * * funday", "invalid cron string"),
])
def test_bad_cron_strings_are_configuration_errors(expression, error):
    with pytest.raises(ConfigurationError) as info:
        parse_cron(expression, "beat_schedule['nightly']['schedule']")
    message = str(info.value)
    assert message.startswith("beat_schedule['nightly']['schedule']: ")
    assert error in message
    assert repr(expression) in message


# -- one schedule value -------------------------------------------------------------------------------------------

def test_accepted_schedule_forms():
    assert normalize_schedule(timedelta(minutes=30)) == timedelta(minutes=30)
    assert normalize_schedule(10) == timedelta(seconds=10)
    assert normalize_schedule(1.5) == timedelta(seconds=1.5)
    assert normalize_schedule(1) == timedelta(seconds=1)  # the floor itself
    cron = crontab(minute=0, hour=3)
    assert normalize_schedule(cron) is cron
    every = schedule(timedelta(seconds=7))
    assert normalize_schedule(every) is every
    assert normalize_schedule("0 * * * *") == crontab(minute=0)


@pytest.mark.parametrize("value, error", [
    (0, "must be positive"),
    (-5, "must be positive"),
    (timedelta(0), "must be positive"),
    (timedelta(seconds=-1), "must be positive"),
    (schedule(0), "must be positive"),
    (True, "expected a timedelta"),
    (None, "expected a timedelta"),
    ([1, 2], "expected a timedelta"),
    ({"minute": 5}, "expected a timedelta"),
])
def test_rejected_schedule_values(value, error):
    with pytest.raises(ConfigurationError, match=error):
        normalize_schedule(value, "beat_schedule['x']['schedule']")


# -- whole beat_schedule ------------------------------------------------------------------------------------------

def test_normalize_beat_schedule_converts_cron_strings_and_keeps_the_rest():
    original = {
        "half-hourly": {"task": "app.half", "schedule": timedelta(minutes=30), "args": [1], "kwargs": {"a": 2}},
        "nightly": {"task": "app.night", "schedule": crontab(minute=0, hour=3), "options": {"queue": "slow"}},
        "five-minutes": {"task": "app.five", "schedule": "*/5 * * * *"},
        "seconds": {"task": "app.sec", "schedule": 90},
    }
    result = normalize_beat_schedule(original)
    assert result["half-hourly"] == original["half-hourly"]
    assert result["nightly"] == original["nightly"]
    assert result["five-minutes"] == {"task": "app.five", "schedule": crontab(minute="*/5")}
    assert result["seconds"]["schedule"] == timedelta(seconds=90)
    assert original["five-minutes"]["schedule"] == "*/5 * * * *", "the input must not be modified"


@pytest.mark.parametrize("entry, error", [
    ("not a dict", "must be a dict with 'task' and 'schedule'"),
    ({"schedule": 5}, "'task' must name a task"),
    ({"task": "", "schedule": 5}, "'task' must name a task"),
    ({"task": 5, "schedule": 5}, "'task' must name a task"),
    ({"task": "app.t"}, "'schedule' is missing"),
    ({"task": "app.t", "schedule": "* * *"}, "needs 5 fields"),
    ({"task": "app.t", "schedule": "99 * * * *"}, "invalid cron string"),
    ({"task": "app.t", "schedule": -1}, "must be positive"),
    ({"task": "app.t", "schedule": 5, "args": "abc"}, "'args' must be a list"),
    ({"task": "app.t", "schedule": 5, "kwargs": [1]}, "'kwargs' must be a dict"),
    ({"task": "app.t", "schedule": 5, "options": "fast"}, "'options' must be a dict"),
])
def test_entry_errors_name_the_entry(entry, error):
    with pytest.raises(ConfigurationError) as info:
        normalize_beat_schedule({"fine": {"task": "app.ok", "schedule": 1}, "broken-entry": entry})
    assert str(info.value).startswith("beat_schedule['broken-entry']")
    assert error in str(info.value)


@pytest.mark.parametrize("value", [[], "x", None, 5])
def test_beat_schedule_must_be_a_dict(value):
    with pytest.raises(ConfigurationError, match="beat_schedule must be a dict"):
        normalize_beat_schedule(value)


def test_entry_names_must_be_strings():
    with pytest.raises(ConfigurationError, match="entry names must be non-empty strings"):
        normalize_beat_schedule({1: {"task": "app.t", "schedule": 5}})


# -- from the INI, through includeme ------------------------------------------------------------------------------

def beat_config(redis_url, queue_name, entries: str) -> str:
    return "{'broker_url': %r, 'task_default_queue': %r, 'beat_schedule': %s}" % (redis_url, queue_name, entries)


def test_ini_beat_schedule_reaches_the_celery_app(make_app, redis_url, queue_name):
    router = make_app(**{"websauna.celery_config": beat_config(redis_url, queue_name, """{
        'interval': {'task': 'tests.add', 'schedule': timedelta(seconds=30), 'args': (1, 2)},
        'cron-call': {'task': 'tests.add', 'schedule': crontab(minute=0, hour='*/2')},
        'cron-string': {'task': 'tests.add', 'schedule': '15 4 * * sun'},
        'every': {'task': 'tests.add', 'schedule': schedule(45)},
    }""")})
    entries = get_celery(router.registry).conf.beat_schedule
    assert entries["interval"] == {"task": "tests.add", "schedule": timedelta(seconds=30), "args": (1, 2)}
    assert entries["cron-call"]["schedule"] == crontab(minute=0, hour="*/2")
    assert entries["cron-string"]["schedule"] == crontab(minute=15, hour=4, day_of_week="sun")
    assert entries["every"]["schedule"].run_every == timedelta(seconds=45)


def test_flat_beat_schedule_key_with_cron_string(make_app, redis_url, queue_name):
    router = make_app(**{
        "celery.broker_url": redis_url,
        "celery.beat_schedule": '{"hourly": {"task": "tests.add", "schedule": "0 * * * *", "args": [1, 1]}}',
    })
    entry = get_celery(router.registry).conf.beat_schedule["hourly"]
    assert entry == {"task": "tests.add", "schedule": crontab(minute=0), "args": [1, 1]}


@pytest.mark.parametrize("entries, error", [
    ("{'nightly-report': {'task': 'tests.add', 'schedule': '0 25 * * *'}}", "beat_schedule['nightly-report']"),
    ("{'no-task': {'schedule': timedelta(seconds=5)}}", "beat_schedule['no-task']: 'task' must name a task"),
    ("{'zero': {'task': 'tests.add', 'schedule': timedelta(0)}}", "beat_schedule['zero']['schedule']: an interval"),
])
def test_ini_beat_schedule_errors_name_the_entry(make_app, redis_url, queue_name, entries, error):
    with pytest.raises(ConfigurationError) as info:
        make_app(**{"websauna.celery_config": beat_config(redis_url, queue_name, entries)})
    assert error in str(info.value)


# -- a real beat and a real worker --------------------------------------------------------------------------------

def effects(db):
    with db.connect() as conn:
        return conn.execute(text("SELECT task_id, value FROM ws_test_effects ORDER BY id")).all()


@pytest.mark.slow
def test_real_beat_sends_ini_schedule_to_real_worker(write_ini, ws_celery_worker_factory, subprocess_env,
                                                     redis_url, database_url, queue_name, db, tmp_path,
                                                     redis_client):  # redis_client: deletes the queue afterwards
    # tests.record is a ScheduleOnCommitTask: beat calls apply_async(producer=...) with no tm,
    # which must send at once rather than demand a transaction manager.
    ini = write_ini({
        "websauna.celery_config": beat_config(redis_url, queue_name, """{
            'record-every-second': {'task': 'tests.record', 'schedule': timedelta(seconds=1), 'args': ('tick',)},
        }"""),
        "sqlalchemy.url": database_url,
    })
    ws_celery_worker_factory(ini, "worker", "-c", "1", "-l", "info", "--without-gossip", "--without-mingle",
                             env=subprocess_env)
    beat = ws_celery_worker_factory(ini, "beat", "-l", "info", "-s", str(tmp_path / "schedule"),
                                    ready="beat: Starting...", env=subprocess_env)
    wait_for(lambda: len(effects(db)) >= 2, timeout=30)
    rows = effects(db)
    assert all(value == "tick" for _, value in rows)
    assert len({task_id for task_id, _ in rows}) == len(rows), "each tick is its own task"
    assert "Scheduler: Sending due task record-every-second (tests.record)" in beat.output()
