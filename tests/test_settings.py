"""The settings layer (websauna_tasks/settings.py): one parser per kind, one table, no reads elsewhere.

No Redis, no PostgreSQL: the layer is used directly, and full includes use a
``memory://`` broker and ``sqlite://``.
"""
from __future__ import annotations

import ast
import importlib
import math
import re
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest
import transaction
from celery.schedules import crontab, schedule
from hypothesis import given
from hypothesis import strategies as st
from pyramid.config import Configurator
from pyramid.exceptions import ConfigurationError
from pyramid.scripting import prepare
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session, scoped_session, sessionmaker

import websauna_tasks
from tests.conftest import include_in_memory
from websauna_tasks import get_celery
from websauna_tasks.schedule import (
    MAX_INTERVAL_SECONDS,
    MIN_INTERVAL_SECONDS,
    normalize_beat_schedule,
    normalize_schedule,
    periodic_entry,
)
from websauna_tasks.settings import (
    CELERY_CONFIG_KEY,
    DBSESSION_FACTORY_KEY,
    DEADLETTER_QUEUE_KEY,
    DEFER_ALLOWED_MODULES_KEY,
    MAX_MESSAGE_KEY,
    MAX_PAYLOAD_KEY,
    OUTBOX_KEY,
    QUEUES_KEY,
    SETTINGS,
    SETTINGS_BY_KEY,
    Boolean,
    Number,
    TaskSettings,
    get_task_settings,
    parse_setting,
    parse_settings,
)

PACKAGE_DIR = Path(websauna_tasks.__file__).parent
DOCS = PACKAGE_DIR.parent / "docs" / "configuration.md"
MEMORY = {CELERY_CONFIG_KEY: "{'broker_url': 'memory://'}"}

BOOLEANS = [setting for setting in SETTINGS if isinstance(setting.kind, Boolean)]
NUMBERS = [setting for setting in SETTINGS if isinstance(setting.kind, Number)]


def refused(settings: dict, *fragments: str) -> str:
    """Parse ``settings``; the ConfigurationError's text, which must hold every fragment."""
    with pytest.raises(ConfigurationError) as caught:
        parse_settings(settings)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def include(**settings: str) -> Configurator:
    return include_in_memory(**settings)


# -- the table and the parsed object ------------------------------------------------------------------

def test_every_declared_setting_is_a_field_of_task_settings_and_back():
    fields = {field.name for field in TaskSettings.__dataclass_fields__.values()}
    assert {setting.field for setting in SETTINGS} == fields
    assert len(SETTINGS_BY_KEY) == len(SETTINGS)


def test_every_websauna_tasks_key_constant_in_the_package_is_declared():
    # A setting added as a new *_KEY constant but not to the table would escape every check here.
    declared = set(SETTINGS_BY_KEY)
    registry_keys = set()
    for path in PACKAGE_DIR.rglob("*.py"):
        for name, value in module_constants(ast.parse(path.read_text())).items():
            if name.endswith("_KEY") and value.startswith(("websauna_tasks.", "websauna.")):
                if value not in declared:
                    registry_keys.add(value)
    # What remains are keys of the registry, a transaction or a session, not settings.
    assert registry_keys == {
        "websauna_tasks.engine", "websauna_tasks.sessionmaker", "websauna_tasks.transaction_events",
        "websauna_tasks.defer_allowed_prefixes", "websauna_tasks.dispatch_queue",
        "websauna_tasks.iteration_tables_ready", "websauna_tasks.name_store_instance",
        "websauna_tasks.cancel_store_instance",
        "websauna_tasks.queues_config", "websauna_tasks.request_template", "websauna_tasks.task_settings",
        "websauna_tasks.health_timeout", "websauna_tasks.console_mounted",
    }


def test_old_key_constants_still_import_from_their_modules():
    # Modules, not the functions of the same names that websauna_tasks exports.
    app, db, deadletter, defer, idempotency, iteration, names, outages, outbox, payload, queues, request, \
        tasks = (importlib.import_module(f"websauna_tasks.{name}") for name in (
            "app", "db", "deadletter", "defer", "idempotency", "iteration", "names", "outages", "outbox", "payload",
            "queues", "request", "tasks"))

    pairs = [
        (app.APP_NAME_KEY, "websauna_tasks.app_name"), (db.DBSESSION_FACTORY_KEY, DBSESSION_FACTORY_KEY),
        (deadletter.DEADLETTER_QUEUE_KEY, DEADLETTER_QUEUE_KEY), (defer.ALLOWED_MODULES_KEY, DEFER_ALLOWED_MODULES_KEY),
        (idempotency.RETENTION_KEY, "websauna_tasks.idempotency_retention_seconds"),
        (idempotency.CREATE_TABLE_KEY, "websauna_tasks.idempotency_create_table"),
        (idempotency.PRUNE_INTERVAL_KEY, "websauna_tasks.idempotency_prune_interval_seconds"),
        (iteration.TIME_BUDGET_KEY, "websauna_tasks.iteration_time_budget_seconds"),
        (iteration.BATCH_SIZE_KEY, "websauna_tasks.iteration_batch_size"),
        (iteration.MAX_FAILURES_KEY, "websauna_tasks.iteration_max_failures"),
        (names.NAME_STORE_KEY, "websauna_tasks.name_store"),
        (names.RETENTION_KEY, "websauna_tasks.name_retention_seconds"),
        (names.PENDING_KEY, "websauna_tasks.name_pending_seconds"),
        (outages.RETRIES_KEY, "websauna_tasks.db_outage_retries"),
        (outages.BACKOFF_MAX_KEY, "websauna_tasks.db_outage_backoff_max_seconds"),
        (outbox.OUTBOX_KEY, OUTBOX_KEY), (outbox.RETENTION_KEY, "websauna_tasks.outbox_retention_seconds"),
        (outbox.POLL_KEY, "websauna_tasks.outbox_poll_seconds"), (outbox.BATCH_KEY, "websauna_tasks.outbox_batch_size"),
        (outbox.IN_WORKER_KEY, "websauna_tasks.outbox_relay_in_worker"),
        (outbox.ON_COMMIT_KEY, "websauna_tasks.outbox_publish_on_commit"),
        (payload.MAX_PAYLOAD_KEY, MAX_PAYLOAD_KEY), (queues.QUEUES_KEY, QUEUES_KEY),
        (queues.ALLOW_UNDECLARED_KEY, "websauna_tasks.allow_undeclared_queues"),
        (queues.LIMITS_REDIS_URL_KEY, "websauna_tasks.limits_redis_url"),
        (queues.WAIT_SECONDS_KEY, "websauna_tasks.queue_wait_seconds"),
        (request.SITE_URL_KEY, "websauna.site_url"),
        (tasks.RETRY_ATTEMPTS_KEY, "websauna_tasks.retry_attempts"),
    ]
    for constant, key in pairs:
        assert constant == key
        assert key in SETTINGS_BY_KEY
    assert payload.DEFAULT_MAX_PAYLOAD_BYTES == SETTINGS_BY_KEY[MAX_PAYLOAD_KEY].default
    assert deadletter.DEFAULT_DEADLETTER_QUEUE == SETTINGS_BY_KEY[DEADLETTER_QUEUE_KEY].default


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda setting: setting.key)
@pytest.mark.parametrize("raw", [None, "", "   "], ids=["absent", "empty", "blank"])
def test_absent_or_empty_means_the_default(setting, raw):
    settings = {} if raw is None else {setting.key: raw}
    value = parse_setting(settings, setting.key)
    if setting.key == DEFER_ALLOWED_MODULES_KEY and raw is not None:
        assert value == ()  # documented: left empty, no module is allowed (only @deferrable functions)
    elif setting.key == CELERY_CONFIG_KEY:
        assert value == {}
    else:
        assert value == setting.default


def test_defaults_of_a_whole_parse():
    parsed = parse_settings({})
    assert parsed.outbox is False and parsed.outbox_relay_in_worker is True
    assert parsed.max_payload_bytes == 512 * 1024
    assert parsed.max_message_bytes == 4 * 1024 * 1024
    assert parsed.deadletter_queue == "websauna_tasks.deadletter"
    assert parsed.queues is None and parsed.dbsession_factory is None
    with pytest.raises(AttributeError):
        parsed.outbox = True  # frozen


@pytest.mark.parametrize(("payload", "message"), [
    ("0", 64 * 1024 * 1024), ("100", 4 * 1024 * 1024), ("4194304", 8 * 1024 * 1024),
])
def test_max_message_bytes_follows_max_payload_bytes_unless_set(payload, message):
    assert parse_settings({MAX_PAYLOAD_KEY: payload}).max_message_bytes == message
    assert parse_settings({MAX_PAYLOAD_KEY: payload, MAX_MESSAGE_KEY: "1000"}).max_message_bytes == 1000


# -- booleans: one rule ------------------------------------------------------------------------------

TRUE_SPELLINGS = ["true", "True", "TRUE", "yes", "Yes", "on", "ON", "1", " true ", "\tyes\n", True, 1]
FALSE_SPELLINGS = ["false", "False", "FALSE", "no", "NO", "off", "Off", "0", " off ", "\nno\t", False, 0]
BAD_BOOLEANS = ["maybe", "ture", "y", "n", "2", "-1", "t", "enable", "yes please", "1.0", 2, 1.0, [True]]


@pytest.mark.parametrize("setting", BOOLEANS, ids=lambda setting: setting.key)
@pytest.mark.parametrize("raw", TRUE_SPELLINGS, ids=repr)
def test_true_spellings(setting, raw):
    assert parse_setting({setting.key: raw}, setting.key) is True


@pytest.mark.parametrize("setting", BOOLEANS, ids=lambda setting: setting.key)
@pytest.mark.parametrize("raw", FALSE_SPELLINGS, ids=repr)
def test_false_spellings(setting, raw):
    assert parse_setting({setting.key: raw}, setting.key) is False


@pytest.mark.parametrize("setting", BOOLEANS, ids=lambda setting: setting.key)
@pytest.mark.parametrize("raw", BAD_BOOLEANS, ids=repr)
def test_anything_else_is_refused_naming_the_key_and_the_value(setting, raw):
    refused({setting.key: raw}, setting.key, repr(raw), "expected true or false")


def test_a_mistyped_outbox_flag_stops_the_application():
    # It used to mean "off", silently: the guarantee the operator asked for was gone.
    with pytest.raises(ConfigurationError, match=r"websauna_tasks.outbox: .*got 'maybe'"):
        include(**{OUTBOX_KEY: "maybe"})


@given(st.text(max_size=12))
def test_a_boolean_is_true_false_or_refused(raw):
    normalized = raw.strip().lower()
    key = "websauna_tasks.idempotency_create_table"
    if normalized in ("true", "yes", "on", "1"):
        assert parse_setting({key: raw}, key) is True
    elif normalized in ("false", "no", "off", "0"):
        assert parse_setting({key: raw}, key) is False
    elif not normalized:
        assert parse_setting({key: raw}, key) is True  # empty: the default
    else:
        with pytest.raises(ConfigurationError, match=re.escape(repr(raw))):
            parse_setting({key: raw}, key)


# -- numbers: finite, whole where counted, in range ------------------------------------------------

NOT_NUMBERS = ["nan", "NaN", "-nan", "inf", "-inf", "+inf", "Infinity", "1e309", "-1e309", "1" * 400 + ".0",
               "abc", "1,5", "1_000", "0x10", "١٢", "10 s", "--1", "1e", ".", float("nan"), float("inf"), True]


@pytest.mark.parametrize("setting", NUMBERS, ids=lambda setting: setting.key)
@pytest.mark.parametrize("raw", NOT_NUMBERS, ids=repr)
def test_non_finite_and_non_numbers_are_refused(setting, raw):
    message = refused({setting.key: raw}, setting.key, repr(raw), setting.kind.range_text)
    assert message.startswith(f"{setting.key}: ")


@pytest.mark.parametrize("setting", NUMBERS, ids=lambda setting: setting.key)
def test_the_range_is_enforced_at_both_ends(setting):
    kind = setting.kind
    assert parse_setting({setting.key: _text(kind.minimum)}, setting.key) == kind.minimum
    assert parse_setting({setting.key: _text(kind.maximum)}, setting.key) == kind.maximum
    for outside in (kind.maximum * 2 + 1, -1 - kind.maximum):
        refused({setting.key: _text(outside)}, setting.key, "must be " + kind.range_text, repr(_text(outside)))
    if kind.minimum > 0:
        below = kind.minimum / 2
        if kind.whole:
            below = kind.minimum - 1
        if below != 0 or not kind.zero_means:
            refused({setting.key: _text(below)}, setting.key, "must be " + kind.range_text)
    if kind.zero_means:
        assert parse_setting({setting.key: "0"}, setting.key) == 0


@pytest.mark.parametrize("setting", [setting for setting in NUMBERS if setting.kind.whole],
                         ids=lambda setting: setting.key)
def test_counts_must_be_whole(setting):
    value = setting.kind.minimum + 1.5
    refused({setting.key: str(value)}, setting.key, "expected a whole number", repr(str(value)))
    whole = int(setting.kind.minimum + 1)
    assert parse_setting({setting.key: f"{whole}.0"}, setting.key) == whole
    assert isinstance(parse_setting({setting.key: str(whole)}, setting.key), int)


@pytest.mark.parametrize("setting", NUMBERS, ids=lambda setting: setting.key)
@given(data=st.data())
def test_any_finite_number_in_range_is_kept_and_any_outside_refused(setting, data):
    kind = setting.kind
    if kind.whole:
        value = data.draw(st.integers(min_value=-2 * int(kind.maximum), max_value=2 * int(kind.maximum)))
    else:
        value = data.draw(st.floats(min_value=-2 * kind.maximum, max_value=2 * kind.maximum, allow_nan=False))
    raw = repr(value)
    inside = kind.minimum <= value <= kind.maximum or (value == 0 and kind.zero_means)
    if inside:
        assert parse_setting({setting.key: raw}, setting.key) == value
    else:
        with pytest.raises(ConfigurationError, match=re.escape(setting.key)):
            parse_setting({setting.key: raw}, setting.key)


def _text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


# -- text settings -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("key", "raw", "fragment"), [
    ("websauna.site_url", "shop.example.com", "http:// or https://"),
    ("websauna.site_url", "ftp://x", "http:// or https://"),
    ("websauna.site_url", "https://", "http:// or https://"),
    ("websauna_tasks.limits_redis_url", "http://x", "expected a redis:// URL"),
    ("websauna_tasks.name_store", "postgres", "'sql' or 'memory'"),
    ("websauna_tasks.app_name", "my app", "whitespace"),
    ("websauna_tasks.deadletter_queue", " dead", "expected a Redis key name"),
    ("websauna_tasks.defer_allowed_modules", "tests os;rm", "not a module name"),
    ("websauna_tasks.queues", "[{'name': 'a', 'rate': 'x'}]", "did you mean 'rate_per_second'"),
    ("websauna.celery_config", "{'x': __import__('os')}", "may be called"),
])
def test_text_settings_are_checked(key, raw, fragment):
    refused({key: raw}, key, fragment)


def test_text_settings_accepted():
    parsed = parse_settings({"websauna.site_url": "https://shop.example.com", "websauna_tasks.name_store": "sql",
                             "websauna_tasks.limits_redis_url": " redis://h:1/2 ",
                             "websauna_tasks.defer_allowed_modules": "a.b, c"})
    assert parsed.site_url == "https://shop.example.com"
    assert parsed.name_store == "sql"
    assert parsed.limits_redis_url == "redis://h:1/2"
    assert parsed.defer_allowed_modules == ("a.b", "c")


# -- dotted names: the right kind of object -----------------------------------------------------------

NOT_CALLABLE = 42
maker = sessionmaker()
scoped = scoped_session(sessionmaker())


def session_for(request) -> Session:
    return Session()


def returns_an_int(request) -> int:
    return 0


def needs_two(request, other):
    return None


def takes_nothing():
    return None


class SessionFactoryObject:
    def __call__(self, request):
        return Session()


factory_object = SessionFactoryObject()


@pytest.mark.parametrize(("raw", "fragment"), [
    ("os:getcwd", "is a built-in function"),
    ("os:system", "is a built-in function"),
    ("os", "is not callable (a module)"),
    ("tests.test_settings:NOT_CALLABLE", "is not callable (a int)"),
    ("sqlalchemy.orm:Session", "is a class"),
    ("tests.test_settings:SessionFactoryObject", "is a class"),
    ("tests.test_settings:scoped", "is a scoped_session"),
    ("tests.test_settings:needs_two", "cannot be called with the request alone"),
    ("tests.test_settings:takes_nothing", "cannot be called with the request alone"),
    ("tests.test_settings:returns_an_int", "returns int, not a Session"),
    ("no_such_module_anywhere:factory", "cannot import"),
    ("tests.test_settings:no_such_name", "cannot import"),
])
def test_a_dbsession_factory_that_is_not_one_is_refused(raw, fragment):
    refused({DBSESSION_FACTORY_KEY: raw}, DBSESSION_FACTORY_KEY, repr(raw), fragment)


@pytest.mark.parametrize(("raw", "expected"), [
    ("tests.test_settings:session_for", session_for),
    ("tests.test_settings:maker", maker),
    ("tests.test_settings:factory_object", factory_object),
    ("tests.test_tasks:fake_session_factory", None),
])
def test_dbsession_factories_that_are_accepted(raw, expected):
    found = parse_setting({DBSESSION_FACTORY_KEY: raw}, DBSESSION_FACTORY_KEY)
    assert callable(found)
    if expected is not None:
        assert found is expected


def test_a_relative_dotted_name_is_resolved_from_the_package():
    import tests

    assert parse_settings({DBSESSION_FACTORY_KEY: ".test_settings:session_for"}, package=tests).dbsession_factory \
        is session_for


def test_a_sessionmaker_factory_joins_request_dbsession_to_the_transaction():
    engine = create_engine("sqlite://")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE rows (value TEXT)"))
    sqlite_maker = sessionmaker(bind=engine)
    config = Configurator(settings={**MEMORY, DBSESSION_FACTORY_KEY: sqlite_maker})
    config.include("pyramid_tm")
    config.include("websauna_tasks")
    registry = config.make_wsgi_app().registry
    from websauna_tasks.db import get_engine

    assert get_engine(registry) is engine
    for value, commit in (("kept", True), ("dropped", False)):
        env = prepare(registry=registry)
        try:
            request = env["request"]
            request.tm = transaction.TransactionManager(explicit=True)
            request.tm.begin()
            request.dbsession.execute(text("INSERT INTO rows VALUES (:v)"), {"v": value})
            request.tm.commit() if commit else request.tm.abort()
        finally:
            env["closer"]()
    with engine.connect() as conn:
        assert [row[0] for row in conn.execute(text("SELECT value FROM rows"))] == ["kept"]


# -- queue names that are Redis keys already in use ------------------------------------------------

@pytest.mark.parametrize(("name", "fragment"), [
    ("unacked", "unacknowledged messages"),
    ("unacked_index", "unacknowledged messages"),
    ("unacked_mutex", "unacknowledged messages"),
    ("_kombu.binding.celery", "exchange bindings"),
    ("_kombu.anything", "exchange bindings"),
    ("websauna_tasks.deadletter", "dead-letter list"),
    ("websauna_tasks:name:app:x", "task names and queue limits"),
    ("websauna_tasks:queue:app:emails:slots", "task names and queue limits"),
    ("emails\x06\x163", "priority"),
])
def test_queue_names_that_collide_with_keys_in_use_are_refused(name, fragment):
    refused({QUEUES_KEY: repr([{"name": "fine"}, {"name": name}])}, QUEUES_KEY, repr(name), "cannot be used", fragment)
    celery = {"broker_url": "memory://", "task_default_queue": name}
    refused({CELERY_CONFIG_KEY: repr(celery)}, "task_default_queue", repr(name), fragment)
    celery = {"broker_url": "memory://", "task_queues": {name: {}}}
    refused({CELERY_CONFIG_KEY: repr(celery)}, "task_queues", repr(name), fragment)


def test_the_dead_letter_list_and_the_queues_are_checked_against_each_other():
    refused({DEADLETTER_QUEUE_KEY: "graveyard", QUEUES_KEY: "[{'name': 'graveyard'}]"},
            "queue 'graveyard'", "dead-letter list")
    refused({DEADLETTER_QUEUE_KEY: "unacked"}, DEADLETTER_QUEUE_KEY, "'unacked'", "unacknowledged messages")
    refused({DEADLETTER_QUEUE_KEY: "_kombu.binding.x"}, DEADLETTER_QUEUE_KEY, "exchange bindings")
    parsed = parse_settings({DEADLETTER_QUEUE_KEY: "graveyard", QUEUES_KEY: "[{'name': 'websauna_tasks.deadletter'}]"})
    assert [queue.name for queue in parsed.queues] == ["websauna_tasks.deadletter"]


def test_unacked_keys_renamed_by_transport_options_are_the_ones_reserved():
    celery = {"broker_url": "memory://", "broker_transport_options": {"unacked_key": "held"}}
    refused({CELERY_CONFIG_KEY: repr(celery), QUEUES_KEY: "[{'name': 'held'}]"}, "queue 'held'", "unacknowledged")
    parsed = parse_settings({CELERY_CONFIG_KEY: repr(celery), QUEUES_KEY: "[{'name': 'unacked'}]"})
    assert parsed.queues[0].name == "unacked"


def test_the_library_keeps_its_redis_keys_under_the_reserved_prefix():
    # The prefix refused for queue names must be the one names.py and queues.py really use.
    from websauna_tasks.names import get_name_store
    from websauna_tasks.queues import get_queues
    from websauna_tasks.settings import LIBRARY_KEY_PREFIX

    unreachable = "redis://127.0.0.1:1/0"  # never connected to: building the stores does no I/O
    config = include(**{"websauna_tasks.name_store": unreachable, "websauna_tasks.limits_redis_url": unreachable,
                        QUEUES_KEY: "[{'name': 'emails', 'max_concurrent': 2}]"})
    app = get_celery(config.registry)
    assert get_name_store(config.registry, app).prefix.startswith(LIBRARY_KEY_PREFIX)
    assert get_queues(config.registry).limits.key("emails", "running").startswith(LIBRARY_KEY_PREFIX)


def test_a_colliding_queue_stops_the_application():
    with pytest.raises(ConfigurationError, match="queue 'unacked'"):
        include(**{QUEUES_KEY: "[{'name': 'unacked'}]"})


# -- beat: a floor and a ceiling, and never a raw OverflowError ----------------------------------------

@pytest.mark.parametrize("value", [
    0.999, 0.0000001, 1e-300, timedelta(milliseconds=999), timedelta(microseconds=1), schedule(0.5),
    schedule(run_every=timedelta(milliseconds=10)),
])
def test_intervals_below_the_floor_are_refused(value):
    with pytest.raises(ConfigurationError, match="at least 1 second"):
        normalize_schedule(value, "beat_schedule['fast']['schedule']")


def test_the_floor_itself_is_accepted():
    assert MIN_INTERVAL_SECONDS == 1.0
    assert normalize_schedule(1, "w") == timedelta(seconds=1)
    assert normalize_schedule(timedelta(seconds=1), "w") == timedelta(seconds=1)
    assert normalize_schedule(schedule(1), "w").run_every == timedelta(seconds=1)
    assert normalize_schedule(MAX_INTERVAL_SECONDS, "w") == timedelta(seconds=MAX_INTERVAL_SECONDS)


@pytest.mark.parametrize(("value", "fragment"), [
    (1e308 * 10, "finite"), (float("nan"), "finite"), (-math.inf, "finite"),
    (10 ** 37, "at most"), (int("9" * 38), "at most"), (10 ** 5000, "at most"),
    (timedelta(days=999_999_999), "at most"), (MAX_INTERVAL_SECONDS + 1, "at most"),
], ids=["1e308*10", "nan", "-inf", "10**37", "38 nines", "10**5000", "999999999 days", "ceiling+1"])
def test_overflowing_intervals_are_configuration_errors(value, fragment):
    with pytest.raises(ConfigurationError, match=fragment) as caught:
        normalize_schedule(value, "beat_schedule['huge']['schedule']")
    assert str(caught.value).startswith("beat_schedule['huge']['schedule']: ")


@pytest.mark.parametrize("source", [
    "1e308*10", "1e308*10 - 1e308*10", "1e309", "-1e309", "10000000000000000000000000000000000000",
    "99999999999999999999999999999999999999", "0.0000001", "0.5", "timedelta(milliseconds=500)",
    "timedelta(seconds=1e308*10)", "schedule(0.5)", "schedule(run_every=1e308*10)",
    "schedule(run_every=timedelta(days=99999999))", "timedelta(days=99999999)",
])
def test_ini_beat_entries_are_configuration_errors_naming_the_entry(source):
    celery = "{'broker_url': 'memory://', 'beat_schedule': {'bad-entry': {'task': 'x.y', 'schedule': %s}}}" % source
    with pytest.raises(ConfigurationError) as caught:
        include(**{CELERY_CONFIG_KEY: celery})
    assert "beat_schedule['bad-entry']" in str(caught.value) or "websauna.celery_config" in str(caught.value)


def test_a_flat_json_beat_schedule_with_huge_numbers_is_refused():
    with pytest.raises(ConfigurationError, match=r"beat_schedule\['flat'\].*finite"):
        include(**{"celery.beat_schedule": '{"flat": {"task": "t.flat", "schedule": 1e400}}'})


@pytest.mark.parametrize("value", [float("nan"), 1e308 * 10, 10 ** 37, 0.5, timedelta(0)])
def test_code_periodic_entries_go_through_the_same_check(value):
    with pytest.raises(ConfigurationError) as caught:
        periodic_entry("app.job", value, where="@task app.job")
    assert str(caught.value).startswith("@task app.job: periodic: ")


@given(st.one_of(st.floats(), st.integers(min_value=-(10 ** 40), max_value=10 ** 40)))
def test_any_number_is_an_interval_in_bounds_or_a_configuration_error(value):
    try:
        result = normalize_schedule(value, "w")
    except ConfigurationError as exc:
        assert str(exc).startswith("w: ")
        assert not (MIN_INTERVAL_SECONDS <= value <= MAX_INTERVAL_SECONDS)
    else:
        assert MIN_INTERVAL_SECONDS <= result.total_seconds() <= MAX_INTERVAL_SECONDS


def test_cron_entries_are_not_intervals():
    entries = normalize_beat_schedule({"every-minute": {"task": "t", "schedule": "* * * * *"},
                                       "c": {"task": "t", "schedule": crontab(minute="*")}})
    assert entries["every-minute"]["schedule"] == crontab()


# -- the layer is what the application uses --------------------------------------------------------------

def test_includeme_parses_once_and_every_module_takes_its_values_from_there():
    from websauna_tasks.deadletter import get_dead_letters
    from websauna_tasks.defer import allowed_prefixes
    from websauna_tasks.payload import payload_limit
    from websauna_tasks.queues import get_queues
    from websauna_tasks.state import app_state

    config = include(**{
        MAX_PAYLOAD_KEY: "1000", DEADLETTER_QUEUE_KEY: "graveyard", DEFER_ALLOWED_MODULES_KEY: "a b",
        QUEUES_KEY: "[{'name': 'emails', 'max_attempts': 3}]", "websauna_tasks.queue_wait_seconds": "2.5",
        "websauna_tasks.allow_undeclared_queues": "YES", "websauna_tasks.db_outage_retries": "4",
        "websauna_tasks.app_name": "shop",
    })
    registry = config.registry
    parsed = get_task_settings(registry)
    assert get_task_settings(registry) is parsed  # kept, not parsed again
    app = get_celery(registry)
    assert app.main == "shop"
    assert payload_limit(app) == 1000
    assert get_dead_letters(app).key == "graveyard"
    assert allowed_prefixes(registry) == ("a", "b")
    queues = get_queues(registry)
    assert list(queues.queues) == ["emails"] and queues.allow_undeclared and queues.wait_seconds == 2.5
    assert app_state(app).outage_policy.retries == 4


@pytest.mark.parametrize("settings", [
    {}, {MAX_PAYLOAD_KEY: "0"}, {MAX_PAYLOAD_KEY: "4194304"}, {MAX_MESSAGE_KEY: "0"}, {MAX_MESSAGE_KEY: "1234"},
    {MAX_PAYLOAD_KEY: "100", MAX_MESSAGE_KEY: " 99 "},
], ids=repr)
def test_the_intake_limit_is_the_layers_value(settings):
    from websauna_tasks.state import app_state

    intake = app_state(get_celery(include(**settings).registry)).intake
    assert intake.max_bytes == parse_settings(settings).max_message_bytes


def test_the_outbox_takes_its_numbers_from_the_layer():
    from websauna_tasks.outbox import get_outbox

    config = include(**{OUTBOX_KEY: "on", "sqlalchemy.url": "sqlite://", "websauna_tasks.outbox_poll_seconds": "0.25",
                        "websauna_tasks.outbox_batch_size": "7", "websauna_tasks.outbox_relay_in_worker": "no",
                        "websauna_tasks.outbox_redeliver_max": "2"})
    outbox = get_outbox(get_celery(config.registry))
    assert (outbox.poll_seconds, outbox.batch_size, outbox.relay_in_worker) == (0.25, 7, False)
    assert outbox.redeliverer.max_redeliveries == 2


# -- nothing but the layer reads a setting ------------------------------------------------------------

# config.py parses websauna.celery_config (with the flat celery.* keys) for the layer.
EXEMPT = {("config.py", CELERY_CONFIG_KEY)}
_READ_METHODS = {"get", "pop", "setdefault"}
# Calls of the layer itself: a module handing it a mapping to parse does not parse anything.
_LAYER_FUNCTIONS = {"parse_setting", "parse_settings"}


def module_constants(tree: ast.Module) -> dict[str, str]:
    constants = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    constants[target.id] = node.value.value
    return constants


def package_files() -> dict[str, Path]:
    """Module name inside the package ("dispatch", "outbox._relay"; "outbox" for its __init__.py) -> its file."""
    files = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = path.relative_to(PACKAGE_DIR).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imported_module(name: str, path: Path, node: ast.ImportFrom) -> str | None:
    """The package's module a relative ``from ... import`` in module ``name`` (at ``path``) names."""
    package = [part for part in name.split(".") if part]
    if path.name != "__init__.py":
        package = package[:-1]
    if node.level == 0 or node.level - 1 > len(package):
        return None
    base = package[:len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def package_constants() -> dict[str, dict[str, str]]:
    """Module name -> its string constants, including those imported from other modules (under any alias)."""
    files = package_files()
    trees = {name: ast.parse(path.read_text()) for name, path in files.items()}
    constants = {name: module_constants(tree) for name, tree in trees.items()}
    for _ in range(3):  # re-exports of re-exports
        for name, tree in trees.items():
            for node in ast.walk(tree):
                source = imported_module(name, files[name], node) if isinstance(node, ast.ImportFrom) else None
                if source in constants:
                    for alias in node.names:
                        value = constants[source].get(alias.name)
                        if value is not None:
                            constants[name][alias.asname or alias.name] = value
    return constants


def setting_reads(source: str, constants: dict[str, str]) -> list[tuple[int, str]]:
    """(line, key) of each read of a setting: ``m.get(KEY)``, ``m[KEY]``, ``KEY in m``, ``f(settings, KEY)``.

    A key is a declared setting, named literally or by a constant; any other
    ``websauna_tasks.``/``websauna.`` text counts too when it is read from
    something called settings.
    """
    declared = set(SETTINGS_BY_KEY)

    def key_of(node: ast.AST) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.Name):
            return constants.get(node.id)
        if isinstance(node, ast.Attribute):
            return constants.get(node.attr)
        return None

    def about_settings(node: ast.AST) -> bool:
        return "settings" in ast.unparse(node).lower()

    def counts(key: str | None, container: ast.AST) -> bool:
        if key is None:
            return False
        return key in declared or (key.startswith(("websauna_tasks.", "websauna.")) and about_settings(container))

    reads = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            func = node.func
            if (func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)) in _LAYER_FUNCTIONS:
                continue
            if isinstance(func, ast.Attribute) and func.attr in _READ_METHODS and node.args:
                if counts(key_of(node.args[0]), func.value):
                    reads.append((node.lineno, key_of(node.args[0])))
                    continue
            arguments = list(node.args) + [keyword.value for keyword in node.keywords]
            keys = [key_of(argument) for argument in arguments]
            if any(key in declared for key in keys) and any(about_settings(argument) for argument in arguments):
                reads.append((node.lineno, next(key for key in keys if key in declared)))
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
            if counts(key_of(node.slice), node.value):
                reads.append((node.lineno, key_of(node.slice)))
        elif isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], (ast.In, ast.NotIn)):
            if counts(key_of(node.left), node.comparators[0]):
                reads.append((node.lineno, key_of(node.left)))
    return reads


def test_the_scan_reads_subpackages_and_their_relative_imports():
    # outbox/ is a subpackage: its modules take the keys from two levels up, its face re-exports them.
    constants = package_constants()
    assert constants["outbox._outbox"]["OUTBOX_KEY"] == OUTBOX_KEY
    assert constants["outbox"]["RETENTION_KEY"] == "websauna_tasks.outbox_retention_seconds"


def test_no_module_but_the_settings_layer_reads_a_setting():
    constants = package_constants()
    found = []
    for name, path in package_files().items():
        relative = str(path.relative_to(PACKAGE_DIR))
        if relative == "settings.py":
            continue
        for line, key in setting_reads(path.read_text(), constants[name]):
            if (relative, key) not in EXEMPT:
                found.append(f"{relative}:{line}: reads {key}")
    assert not found, "settings read outside websauna_tasks/settings.py (parse them there):\n" + "\n".join(found)


@pytest.mark.parametrize("stray", [
    'registry.settings.get("websauna_tasks.outbox")',
    "registry.settings.get(OUTBOX_KEY, False)",
    'settings["websauna_tasks.max_payload_bytes"]',
    "(registry.settings or {}).get(MY_KEY)",
    "number_setting(settings, RETENTION_KEY, 5.0)",
    '"websauna_tasks.anything_new" in request.registry.settings',
    'config.get_settings().get("websauna_tasks.not_declared_yet")',
    "settings.get(settings_module.OUTBOX_KEY)",
])
def test_the_scan_finds_a_stray_read(stray):
    constants = {"OUTBOX_KEY": OUTBOX_KEY, "MY_KEY": MAX_MESSAGE_KEY,
                 "RETENTION_KEY": "websauna_tasks.outbox_retention_seconds"}
    source = textwrap.dedent(f"""
        def configure(registry, settings, request, config, settings_module):
            value = {stray}
            return value
    """)
    assert [key for _, key in setting_reads(source, constants)], stray


@pytest.mark.parametrize("innocent", [
    "registry.get(_TABLES_KEY)",
    'txn.data("websauna_tasks.dispatch_queue")',
    'session.info["websauna_tasks.transaction_events"]',
    'ConfigurationError(f"{OUTBOX_KEY}: the outbox is off")',
    "get_task_settings(registry).outbox",
    "parse_setting(settings, OUTBOX_KEY)",
])
def test_the_scan_leaves_other_keys_alone(innocent):
    constants = {"OUTBOX_KEY": OUTBOX_KEY, "_TABLES_KEY": "websauna_tasks.iteration_tables_ready"}
    source = f"def f(registry, txn, session, get_task_settings):\n    return {innocent}\n"
    assert setting_reads(source, constants) == []


# -- docs/configuration.md's table is this table -------------------------------------------------------

def docs_rows() -> dict[str, list[str]]:
    text_ = DOCS.read_text()
    section = text_.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| `"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            rows[cells[0].strip("`")] = [cell.replace("`", "") for cell in cells[1:]]
    return rows


def test_the_docs_table_lists_exactly_the_declared_settings():
    rows = docs_rows()
    assert sorted(rows) == sorted(SETTINGS_BY_KEY)


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda setting: setting.key)
def test_each_docs_row_matches_the_layer(setting):
    row = docs_rows()[setting.key]
    assert len(row) == 4, row
    kind_text, default_text, range_text, meaning = row
    assert kind_text == setting.kind.type_text
    assert default_text == setting.default_shown
    assert range_text == setting.kind.range_text
    assert meaning
