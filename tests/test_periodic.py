"""@task(periodic=...): config.scan() adds the task to beat_schedule; a real beat runs it."""
from __future__ import annotations

import importlib.util
import sys
import textwrap
import uuid
from datetime import timedelta
from zoneinfo import ZoneInfo

import pytest
from celery.beat import Scheduler
from celery.schedules import crontab
from pyramid.config import Configurator
from pyramid.exceptions import ConfigurationError
from sqlalchemy import text

from tests.apps.extra_apps import write_ini
from websauna_tasks import get_celery, task
from websauna_tasks.testing import wait_for

CODE_ENTRIES = {"tests.periodic.tick", "tests.periodic.weekly_report", "tests.apps.periodic_tasks.every_ninety_seconds"}


def configurator(beat_schedule: dict | None = None, **celery: object) -> Configurator:
    config = {"broker_url": "memory://", **celery}
    if beat_schedule is not None:
        config["beat_schedule"] = beat_schedule
    configurator = Configurator(settings={"websauna.celery_config": repr(config)})
    configurator.include("pyramid_tm")
    configurator.include("websauna_tasks")
    return configurator


def beat_schedule_of(config: Configurator) -> dict:
    return get_celery(config.registry).conf.beat_schedule


@pytest.fixture
def make_module(tmp_path):
    """Import a module written from ``source`` (each call a new, unique module), for one scan."""
    created = []

    def factory(source: str):
        name = f"ws_periodic_case_{uuid.uuid4().hex[:10]}"
        path = tmp_path / f"{name}.py"
        path.write_text("from datetime import timedelta\n"
                        "from celery.schedules import crontab, schedule\n"
                        "from websauna_tasks import task\n" + textwrap.dedent(source))
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # venusian finds the declaring module through sys.modules
        created.append(name)
        spec.loader.exec_module(module)
        return module

    yield factory
    for name in created:
        sys.modules.pop(name, None)


# -- scan -> beat_schedule ----------------------------------------------------------------------------------------

def test_scan_adds_periodic_tasks_next_to_the_ini_entries():
    config = configurator({"nightly": {"task": "myapp.backup", "schedule": "0 3 * * *"}})
    config.scan("tests.apps.periodic_tasks")
    entries = beat_schedule_of(config)
    assert set(entries) == {"nightly"} | CODE_ENTRIES
    assert entries["nightly"] == {"task": "myapp.backup", "schedule": crontab(minute=0, hour=3)}
    assert entries["tests.periodic.tick"] == {
        "task": "tests.periodic.tick", "schedule": timedelta(seconds=1), "args": ("tick",), "options": {"expires": 5},
    }
    assert entries["tests.periodic.weekly_report"] == {
        "task": "tests.periodic.weekly_report",
        "schedule": crontab(minute=15, hour=3, day_of_week="mon"),
        "kwargs": {"kind": "weekly"},
        "options": {"expires": 3600, "priority": 3},
    }
    # The entry name is the task's name, here the one Celery derives from module and function.
    assert entries["tests.apps.periodic_tasks.every_ninety_seconds"] == {
        "task": "tests.apps.periodic_tasks.every_ninety_seconds", "schedule": timedelta(seconds=90),
    }


def test_beat_scheduler_of_the_app_sees_the_code_entries():
    config = configurator({"nightly": {"task": "myapp.backup", "schedule": "0 3 * * *"}})
    config.scan("tests.apps.periodic_tasks")
    scheduled = Scheduler(app=get_celery(config.registry)).schedule
    assert {"nightly"} | CODE_ENTRIES <= set(scheduled)
    assert scheduled["tests.periodic.tick"].task == "tests.periodic.tick"
    assert scheduled["tests.periodic.tick"].args == ("tick",)


def test_periodic_options_are_not_passed_to_celery():
    config = configurator()
    config.scan("tests.apps.periodic_tasks")
    celery_task = get_celery(config.registry).tasks["tests.periodic.tick"]
    # Celery turns every task() option into an attribute of the task class.
    for option in ("periodic", "periodic_args", "periodic_kwargs", "periodic_options"):
        assert not hasattr(celery_task, option), option
    assert celery_task.name == "tests.periodic.tick"


def test_schedule_objects_are_accepted_and_each_app_gets_its_own_copy(make_module):
    module = make_module("""
        NIGHTLY = crontab(minute=0, hour="*/2")
        EVERY = schedule(timedelta(seconds=7))

        @task(name="cases.cron", periodic=NIGHTLY)
        def cron():
            pass

        @task(name="cases.every", periodic=EVERY)
        def every():
            pass
    """)
    helsinki = configurator(timezone="Europe/Helsinki")
    tokyo = configurator(timezone="Asia/Tokyo")
    for config in (helsinki, tokyo):
        config.scan(module)
    first, second = beat_schedule_of(helsinki), beat_schedule_of(tokyo)
    assert first["cases.cron"]["schedule"] == module.NIGHTLY
    assert first["cases.every"]["schedule"].run_every == timedelta(seconds=7)
    assert first["cases.cron"]["schedule"] is not module.NIGHTLY
    assert first["cases.cron"]["schedule"] is not second["cases.cron"]["schedule"]
    # Beat binds a schedule to its app, and crontab caches that app's timezone:
    # a shared object would give the second app the first one's timezone.
    helsinki_cron = Scheduler(app=get_celery(helsinki.registry)).schedule["cases.cron"].schedule
    tokyo_cron = Scheduler(app=get_celery(tokyo.registry)).schedule["cases.cron"].schedule
    assert helsinki_cron.tz == ZoneInfo("Europe/Helsinki")
    assert tokyo_cron.tz == ZoneInfo("Asia/Tokyo")


def test_cron_strings_follow_the_app_timezone():
    config = configurator(timezone="America/New_York")
    config.scan("tests.apps.periodic_tasks")
    entry = Scheduler(app=get_celery(config.registry)).schedule["tests.periodic.weekly_report"]
    assert entry.schedule.tz == ZoneInfo("America/New_York")


# -- errors at scan time ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, error", [
    ("'61 * * * *'", "invalid cron string '61 * * * *'"),
    ("'*/5 * * *'", "needs 5 fields"),
    ("'daily'", "needs 5 fields"),
    ("0", "an interval must be positive"),
    ("-30", "an interval must be positive"),
    ("timedelta(0)", "an interval must be positive"),
    ("schedule(0)", "an interval must be positive"),
    ("True", "expected a timedelta"),
    ("[5]", "expected a timedelta"),
])
def test_bad_periodic_value_is_a_configuration_error_naming_the_task(make_module, value, error):
    module = make_module(f"""
        @task(name="cases.job", periodic={value})
        def job():
            pass
    """)
    config = configurator()
    with pytest.raises(ConfigurationError) as info:
        config.scan(module)
    message = str(info.value)
    assert message.startswith(f"@task {module.__name__}.job (task 'cases.job'): periodic: ")
    assert error in message
    assert "cases.job" not in get_celery(config.registry).conf.beat_schedule


@pytest.mark.parametrize("options, error", [
    ("periodic_args='abc'", "periodic_args must be a list"),
    ("periodic_kwargs=[1]", "periodic_kwargs must be a dict"),
    ("periodic_options='fast'", "periodic_options must be a dict"),
    ("periodic_args=(1, 2, 3)", "do not fit the task's signature"),
    ("periodic_kwargs={'colour': 'red'}", "do not fit the task's signature"),
])
def test_bad_periodic_arguments_name_the_task(make_module, options, error):
    module = make_module(f"""
        @task(name="cases.job", bind=True, periodic=60, {options})
        def job(self, size=1):
            pass
    """)
    with pytest.raises(ConfigurationError) as info:
        configurator().scan(module)
    assert str(info.value).startswith(f"@task {module.__name__}.job (task 'cases.job'): ")
    assert error in str(info.value)


def test_periodic_arguments_that_fit_a_bound_task_are_accepted(make_module):
    module = make_module("""
        @task(name="cases.job", bind=True, periodic=60, periodic_args=(5,), periodic_kwargs={"unit": "s"})
        def job(self, size, unit="m"):
            pass
    """)
    config = configurator()
    config.scan(module)
    assert beat_schedule_of(config)["cases.job"]["args"] == (5,)


@pytest.mark.parametrize("options", [{"periodic_args": (1,)}, {"periodic_options": {"queue": "q"}},
                                     {"periodic": None, "periodic_kwargs": {"a": 1}}])
def test_companion_options_without_a_schedule_are_refused_at_declaration(options):
    with pytest.raises(TypeError, match="without periodic="):
        task(**options)


def test_periodic_none_is_an_ordinary_task(make_module):
    module = make_module("""
        @task(name="cases.plain", periodic=None)
        def plain():
            return 1
    """)
    config = configurator()
    config.scan(module)
    assert beat_schedule_of(config) == {}
    assert module.plain.name == "cases.plain"


def test_clash_with_an_ini_entry_names_both():
    config = configurator({"tests.periodic.tick": {"task": "myapp.other", "schedule": 30}})
    with pytest.raises(ConfigurationError) as info:
        config.scan("tests.apps.periodic_tasks")
    message = str(info.value)
    assert "@task tests.apps.periodic_tasks.tick (task 'tests.periodic.tick')" in message
    assert "websauna.celery_config" in message
    assert "already have an entry 'tests.periodic.tick' (task 'myapp.other')" in message


def test_clash_between_two_periodic_tasks_names_both(make_module):
    first = make_module("""
        @task(name="cases.same", periodic=60)
        def one():
            pass
    """)
    second = make_module("""
        @task(name="cases.same", periodic="0 * * * *")
        def two():
            pass
    """)
    config = configurator()
    config.scan(first)
    with pytest.raises(ConfigurationError) as info:
        config.scan(second)
    message = str(info.value)
    assert f"{first.__name__}.one" in message and f"{second.__name__}.two" in message
    assert "'cases.same'" in message
    assert beat_schedule_of(config)["cases.same"]["schedule"] == timedelta(seconds=60)


@pytest.mark.parametrize("periodic_first", [True, False])
# Celery 5.7 warns before we refuse (it binds the name first, then we look at what it bound).
@pytest.mark.filterwarnings("ignore:Task name 'cases.same' is already registered")
def test_a_plain_task_taking_a_periodic_tasks_name_is_a_clash(make_module, periodic_first):
    periodic = make_module("""
        @task(name="cases.same", periodic=60)
        def scheduled():
            pass
    """)
    plain = make_module("""
        @task(name="cases.same")
        def unscheduled():
            pass
    """)
    config = configurator()
    first, second = (periodic, plain) if periodic_first else (plain, periodic)
    config.scan(first)
    with pytest.raises(ConfigurationError) as info:
        config.scan(second)
    message = str(info.value)
    assert f"{periodic.__name__}.scheduled" in message and f"{plain.__name__}.unscheduled" in message


def test_scanning_the_same_module_again_is_not_a_clash():
    config = configurator({"nightly": {"task": "myapp.backup", "schedule": 60}})
    config.scan("tests.apps.periodic_tasks")
    before = dict(beat_schedule_of(config))
    config.scan("tests.apps.periodic_tasks")
    assert beat_schedule_of(config) == before


def test_two_apps_in_one_process_keep_their_own_entries(make_app):
    with_ini = configurator({"only-here": {"task": "myapp.backup", "schedule": 60}})
    with_ini.scan("tests.apps.periodic_tasks")
    without_scan = configurator()
    other = configurator({"only-there": {"task": "myapp.other", "schedule": 30}})
    other.scan("tests.apps.periodic_tasks")
    # tests.apps.testapp does not scan tests.apps.periodic_tasks: none of its entries may leak into it.
    testapp_router = make_app(**{"websauna.celery_config": "{'broker_url': 'memory://'}"})

    assert set(beat_schedule_of(with_ini)) == {"only-here"} | CODE_ENTRIES
    assert set(beat_schedule_of(other)) == {"only-there"} | CODE_ENTRIES
    assert beat_schedule_of(without_scan) == {}
    assert get_celery(testapp_router.registry).conf.beat_schedule == {}
    assert beat_schedule_of(with_ini) is not beat_schedule_of(other)
    assert beat_schedule_of(with_ini)["tests.periodic.tick"] is not beat_schedule_of(other)["tests.periodic.tick"]


def test_periodic_task_still_behaves_as_a_task():
    config = configurator(task_always_eager=True)
    config.scan("tests.apps.periodic_tasks")
    from tests.apps import periodic_tasks

    assert periodic_tasks.weekly_report.apply(kwargs={"kind": "monthly"}).get() == "monthly"
    assert periodic_tasks.every_ninety_seconds.name == "tests.apps.periodic_tasks.every_ninety_seconds"


# -- a real beat and a real worker, nothing scheduled in the INI ---------------------------------------------------

def tick_rows(db):
    with db.connect() as conn:
        return conn.execute(text("SELECT task_id, value FROM ws_test_effects WHERE value = 'tick' ORDER BY id")).all()


@pytest.mark.slow
def test_real_beat_runs_tasks_declared_periodic_in_code(ws_celery_worker_factory, subprocess_env, redis_url,
                                                        database_url, queue_name, db, tmp_path,
                                                        redis_client):  # redis_client: deletes the queue afterwards
    celery = {"broker_url": redis_url, "task_default_queue": queue_name}
    ini = write_ini(tmp_path / "periodic.ini", "periodic_main",
                    {"websauna.celery_config": repr(celery), "sqlalchemy.url": database_url})
    worker = ws_celery_worker_factory(ini, "worker", "-c", "1", "-l", "info", "--without-gossip",
                                      "--without-mingle", env=subprocess_env)
    beat = ws_celery_worker_factory(ini, "beat", "-l", "info", "-s", str(tmp_path / "beat-schedule"),
                                    ready="beat: Starting...", env=subprocess_env)
    wait_for(lambda: len(tick_rows(db)) >= 2, timeout=30,
             describe=lambda: f"beat:\n{beat.output()[-3000:]}\nworker:\n{worker.output()[-3000:]}")
    rows = tick_rows(db)
    assert len({task_id for task_id, _ in rows}) == len(rows), "each tick is its own task run"
    assert "Sending due task tests.periodic.tick (tests.periodic.tick)" in beat.output()
