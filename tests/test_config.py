"""The safe ``websauna.celery_config`` parser and the flat ``celery.*`` keys."""
from __future__ import annotations

import os
import sys
import time
from datetime import timedelta

import pytest
from celery.schedules import crontab, schedule
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyramid.exceptions import ConfigurationError
from pyramid.paster import get_app

from websauna_tasks import get_celery
from websauna_tasks.config import (
    MAX_CONFIG_CHARS,
    celery_config_from_settings,
    coerce_flat_value,
    parse_celery_config,
    parse_literal,
)

# Set by payloads below if anything in them were ever executed.
PWNED_ENV = "WS_TEST_CONFIG_PWNED"
pwned_global = []


@pytest.fixture
def marker(tmp_path):
    """A file path that a payload would create if it ran; asserted absent afterwards."""
    path = tmp_path / "pwned"
    os.environ.pop(PWNED_ENV, None)
    yield str(path)
    assert not path.exists(), "a config payload was executed (file created)"
    assert PWNED_ENV not in os.environ, "a config payload was executed (env var set)"
    assert pwned_global == [], "a config payload was executed (global changed)"


def refused(source: str) -> str:
    with pytest.raises(ConfigurationError) as info:
        parse_celery_config(source)
    return str(info.value)


# -- what is accepted -------------------------------------------------------------------------------------------

def test_plain_literals_and_nesting():
    source = """
        {"broker_url": "redis://localhost:6379/3", "task_always_eager": False, "worker_prefetch_multiplier": 4,
         "result_expires": 60 * 60, "ratio": -0.5, "nothing": None, "accept_content": ["json", "pickle"],
         "pair": (1, "two"), "tags": {"a", "b"},
         "broker_transport_options": {"visibility_timeout": 2 * 3600, "nested": {"deep": [1, {"x": (2,)}]}},
         "task_routes": {"tests.*": {"queue": "q" "1"}}}
    """
    assert parse_celery_config(source) == {
        "broker_url": "redis://localhost:6379/3",
        "task_always_eager": False,
        "worker_prefetch_multiplier": 4,
        "result_expires": 3600,
        "ratio": -0.5,
        "nothing": None,
        "accept_content": ["json", "pickle"],
        "pair": (1, "two"),
        "tags": {"a", "b"},
        "broker_transport_options": {"visibility_timeout": 7200, "nested": {"deep": [1, {"x": (2,)}]}},
        "task_routes": {"tests.*": {"queue": "q1"}},
    }


def test_arithmetic_keeps_number_types():
    config = parse_celery_config("{'a': 1 + 2, 'b': 7 - 10, 'c': 3 / 2, 'd': +5, 'e': -(2 * 3)}")
    assert config == {"a": 3, "b": -3, "c": 1.5, "d": 5, "e": -6}
    assert type(config["a"]) is int and type(config["c"]) is float


def test_timedelta_crontab_and_schedule_calls():
    config = parse_celery_config(
        "{'a': timedelta(minutes=30), 'b': timedelta(1, 30), 'c': crontab(minute='*/5', hour=3),"
        " 'd': crontab(minute=[0, 30]), 'e': schedule(10), 'f': schedule(run_every=timedelta(seconds=5)),"
        " 'g': crontab(), 'h': crontab(day_of_week='mon-fri', hour='9-17')}"
    )
    assert config["a"] == timedelta(minutes=30)
    assert config["b"] == timedelta(days=1, seconds=30)
    assert config["c"] == crontab(minute="*/5", hour=3)
    assert config["d"] == crontab(minute="0,30")
    assert isinstance(config["e"], schedule) and config["e"].run_every == timedelta(seconds=10)
    assert config["f"].run_every == timedelta(seconds=5)
    assert config["g"] == crontab()
    assert config["h"] == crontab(day_of_week="1-5", hour="9-17")


def test_beat_schedule_with_all_schedule_forms():
    config = parse_celery_config("""{
        "beat_schedule": {
            "every-half-hour": {"task": "x.half", "schedule": timedelta(minutes=30), "args": (1,)},
            "nightly": {"task": "x.night", "schedule": crontab(minute=0, hour=3), "kwargs": {"full": True}},
            "cron-string": {"task": "x.cron", "schedule": "*/5 * * * *", "options": {"queue": "slow"}},
            "seconds": {"task": "x.sec", "schedule": 10.5},
        }
    }""")
    entries = config["beat_schedule"]
    assert entries["every-half-hour"] == {"task": "x.half", "schedule": timedelta(minutes=30), "args": (1,)}
    assert entries["nightly"]["schedule"] == crontab(minute=0, hour=3)
    assert entries["nightly"]["kwargs"] == {"full": True}
    # The parser keeps a cron string as text; make_celery turns it into a crontab (see test_schedule.py).
    assert entries["cron-string"]["schedule"] == "*/5 * * * *"
    assert entries["seconds"]["schedule"] == 10.5


def test_ini_continuation_lines_and_comments_are_accepted():
    source = '\n    {"a": 1,  # the answer minus 41\n     "b": [2,\n           3]}\n'
    assert parse_celery_config(source) == {"a": 1, "b": [2, 3]}


# -- injection and abuse: refused, quoted, never executed --------------------------------------------------------

INJECTIONS = [
    # (payload template, a fragment the error must quote)
    ("{{'x': __import__('os').system('touch {m}')}}", "__import__('os').system("),
    ("{{'x': open('{m}', 'w')}}", "open('"),
    ("{{'x': __import__('os').environ.__setitem__('" + PWNED_ENV + "', '1')}}", "__import__('os')"),
    ("{{'x': tests.test_config.pwned_global.append(1)}}", "tests.test_config.pwned_global.append(1)"),
    ("{{'x': os}}", "os"),
    ("{{'x': ().__class__.__bases__[0].__subclasses__()}}", "().__class__.__bases__[0].__subclasses__()"),
    ("{{'x': ().__class__.__bases__}}", "().__class__.__bases__"),
    ("{{'x': (lambda: __import__('os').system('touch {m}'))()}}", "lambda"),
    ("{{'x': lambda: 1}}", "lambda: 1"),
    ("{{'x': [open('{m}', 'w') for _ in 'a']}}", "for _ in 'a'"),
    ("{{'x': {{k: 1 for k in 'ab'}}}}", "for k in 'ab'"),
    ("{{'x': (open('{m}', 'w') for _ in 'a')}}", "for _ in 'a'"),
    ("{{'x': f\"{{open('{m}', 'w')}}\"}}", "f\"{open("),
    ("{{'x': (y := open('{m}', 'w'))}}", ":= open('"),
    ("{{'x': 9 ** 9 ** 9 ** 9}}", "9 ** 9 ** 9 ** 9"),
    ("{{'x': 2 ** 10}}", "2 ** 10"),
    ("{{'x': {{**__import__('os').environ}}}}", "__import__('os').environ"),
    ("{{**{{'x': 1}}}}", "{'x': 1}"),
    ("{{'x': [*open('{m}', 'w')]}}", "*open('"),
    ("{{'x': timedelta(*[1])}}", "*[1]"),
    ("{{'x': crontab(**{{'minute': 1}})}}", "{'minute': 1}"),
    ("{{'x': ['a', 'b'][0]}}", "['a', 'b'][0]"),
    ("{{'x': __builtins__['exec']('open(\"{m}\", \"w\")')}}", "__builtins__["),
    ("{{'x': timedelta(days=__import__('os'))}}", "__import__('os')"),
    ("{{'x': timedelta(days=open('{m}', 'w'))}}", "open('"),
    ("{{'x': crontab(minute=open('/etc/passwd').read())}}", "open('/etc/passwd').read()"),
    ("{{'x': crontab(minute=exec('open(\"{m}\", \"w\")'))}}", "exec("),
    ("{{'x': timedelta.max}}", "timedelta.max"),
    ("{{'x': getattr(timedelta, 'max')}}", "getattr(timedelta, 'max')"),
    ("{{'x': dict(a=1)}}", "dict(a=1)"),
    ("{{'x': b'bytes'}}", "b'bytes'"),
    ("{{'x': 1j}}", "1j"),
    ("{{'x': ...}}", "..."),
    ("{{'x': 1 if True else 2}}", "1 if True else 2"),
    ("{{'x': not True}}", "not True"),
    ("{{'x': 1 < 2}}", "1 < 2"),
    ("{{'x': True and open('{m}', 'w')}}", "True and open('"),
    ("{{'x': 7 // 2}}", "7 // 2"),
    ("{{'x': 7 % 2}}", "7 % 2"),
    ("{{'x': 'a' * 10}}", "'a' * 10"),
    ("{{'x': [1] + [2]}}", "[1] + [2]"),
    ("{{'x': -'a'}}", "-'a'"),
    ("{{'x': 1 / 0}}", "1 / 0"),
    ("{{'x': await open('{m}')}}", "await open('"),
    ("{{'x': (yield)}}", "yield"),
    ("{{'x': timedelta(days=10 ** 9)}}", "10 ** 9"),
    ("{{'x': timedelta(days=1e300)}}", "timedelta(days=1e300)"),
    ("{{'x': timedelta(days='1')}}", "timedelta(days='1')"),
    ("{{'x': crontab(minute='99')}}", "crontab(minute='99')"),
    ("{{'x': crontab(minute='*/0')}}", "crontab(minute='*/0')"),
    ("{{'x': crontab(minute=1.5)}}", "crontab(minute=1.5)"),
    ("{{'x': crontab(minute=True)}}", "crontab(minute=True)"),
    ("{{'x': crontab(nowfun='x')}}", "crontab(nowfun='x')"),
    ("{{'x': crontab(1, 2, 3, 4, 5, 6)}}", "crontab(1, 2, 3, 4, 5, 6)"),
    ("{{'x': schedule('x')}}", "schedule('x')"),
    ("{{'x': schedule(5, relative=1)}}", "schedule(5, relative=1)"),
    ("{{'x': {{([1],): 2}}}}", "([1],)"),
    ("{{'x': {{1, [2]}}}}", "{1, [2]}"),
    # Big ints (which would overflow when meeting a float, or fail str()) are refused.
    ("{{'x': " + "1" * 400 + " / 1}}", "number too large: '1111111111"),
    ("{{'x': 1.5 * " + "1" * 400 + "}}", "number too large: '1111111111"),
    ("{{'x': " + "9" * 100 + "}}", "number too large: '9999999999"),
    ("{{'x': " + " * ".join(["4294967295"] * 5) + "}}", "number too large: '4294967295 * 4294967295"),
    ("{{'x': 1}}; open('{m}', 'w')", "open('"),
    ("{{'x': 1}}\nopen('{m}', 'w')", "open('"),
    ("import os", "import os"),
]


@pytest.mark.parametrize("template, quoted", INJECTIONS, ids=[template[:40] for template, _ in INJECTIONS])
def test_refused_quoting_the_offending_text_and_nothing_runs(template, quoted, marker):
    message = refused(template.format(m=marker))
    assert message.startswith("websauna.celery_config: ")
    assert quoted.replace("{m}", marker) in message


def test_power_tower_is_refused_without_being_computed(marker):
    started = time.monotonic()
    refused("{'x': 9 ** 9 ** 9 ** 9 ** 9}")
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("source", [
    "[" * 60 + "]" * 60,                               # the reader's depth limit
    "{'a': " * 60 + "1" + "}" * 60,
    "[" * 100_000 + "]" * 100_000,                     # the parser's own limit
    "-" * 100_000 + "1",
    "+".join(["1"] * 100_000),
    "crontab(minute=" * 60 + "1" + ")" * 60,
])
def test_very_deep_nesting_is_a_configuration_error(source):
    message = refused(source)
    assert "nested too deeply" in message or "cannot be parsed" in message or "not a Python literal" in message
    assert source[:10] in message


def test_very_long_input_is_refused_before_parsing(marker):
    source = "{'x': open('%s', 'w'), 'pad': '%s'}" % (marker, "a" * MAX_CONFIG_CHARS)
    started = time.monotonic()
    message = refused(source)
    assert time.monotonic() - started < 1.0
    assert f"longer than {MAX_CONFIG_CHARS} characters" in message
    assert "{'x': open(" in message
    assert len(message) < 500


@pytest.mark.parametrize("source, kind", [
    ("[1, 2]", "list"), ("'text'", "str"), ("42", "int"), ("None", "NoneType"), ("(1,)", "tuple"),
    ("timedelta(seconds=1)", "timedelta"), ("{'a', 'b'}", "set"),
])
def test_top_level_must_be_a_dict(source, kind):
    message = refused(source)
    assert f"must be a dict literal, got {kind}" in message
    assert source in message


def test_top_level_keys_must_be_strings():
    assert "keys must be strings, got 1" in refused("{1: 'x'}")


@pytest.mark.parametrize("source", ["", "   ", "{", "{'a': }", "{'a' 1}", "{'a': 1}}"])
def test_syntax_errors_are_configuration_errors(source):
    assert "not a Python literal" in refused(source)


def test_null_byte_is_a_configuration_error():
    # SyntaxError or ValueError depending on the Python version: either way a ConfigurationError.
    assert "'\\x00'" in refused("{'a': '\x00'}")


# Tokens that make random programs reach deep into the reader, and payloads that must never run.
FUZZ_TOKENS = [
    "{", "}", "[", "]", "(", ")", ",", ":", "'a'", '"b"', "1", "0", "2.5", "-", "+", "*", "/", "**", "//",
    " ", "\n", "timedelta", "crontab", "schedule", "minute=", "seconds=", "run_every=", "'*/5'", "True", "None",
    "b'x'", "lambda", "x", ".", "__class__", "__import__('os')", "open('/tmp/ws-fuzz-never', 'w')",
    "os.environ.__setitem__('" + PWNED_ENV + "', '1')", "for", "in", "if", "else", ":=", "*", "f'{1}'",
    "'beat_schedule'", "'task'", "'schedule'", "9" * 50, "1e308", "[0, 30]", "#",
]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=300), st.lists(st.sampled_from(FUZZ_TOKENS), max_size=60).map("".join)))
def test_fuzz_any_text_is_a_dict_or_a_configuration_error(source):
    try:
        result = parse_celery_config(source)
    except ConfigurationError as exc:
        assert str(exc).startswith("websauna.celery_config: ")
    else:
        assert isinstance(result, dict)
        assert all(isinstance(key, str) for key in result)
    assert not os.path.exists("/tmp/ws-fuzz-never")
    assert PWNED_ENV not in os.environ


# -- flat ``celery.<name>`` keys ---------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("1024", 1024), (" -3 ", -3), ("+7", 7), ("0.5", 0.5), ("1e3", 1000.0), (".25", 0.25),
    ("true", True), ("Yes", True), ("on", True), ("False", False), ("no", False), ("OFF", False),
    ("none", None), ("null", None),
    ('["json", "pickle"]', ["json", "pickle"]), ('{"visibility_timeout": 7200}', {"visibility_timeout": 7200}),
    ('"quoted text"', "quoted text"),
    ("redis://localhost:6379/0", "redis://localhost:6379/0"), ("my-queue", "my-queue"),
    # Words that float() would take for numbers stay words.
    ("inf", "inf"), ("nan", "nan"), ("Infinity", "Infinity"), ("0x10", "0x10"), ("1_000", "1_000"),
    ("١٢", "١٢"), ("", ""), ("  ", ""),
])
def test_flat_values_are_typed(raw, expected):
    value = coerce_flat_value("name", raw)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("raw", ["[1, 2", "{'single': 'quotes'}", '"unterminated'])
def test_flat_value_that_looks_like_json_but_is_not_is_refused(raw):
    with pytest.raises(ConfigurationError) as info:
        coerce_flat_value("broker_transport_options", raw)
    assert str(info.value).startswith("celery.broker_transport_options: looks like JSON but is not valid")
    assert raw in str(info.value)


def test_flat_int_beyond_python_digit_limit_is_a_configuration_error():
    with pytest.raises(ConfigurationError, match="celery.big: number too large"):
        coerce_flat_value("big", "9" * 5000)


def test_flat_keys_merge_and_the_dict_wins():
    config = celery_config_from_settings({
        "celery.broker_url": "redis://flat/1",
        "celery.worker_max_tasks_per_child": "1024",
        "celery.beat_schedule": '{"flat": {"task": "t.flat", "schedule": 5}}',
        "celery.": "ignored: no name",
        "celeryish": "ignored: other prefix",
        "websauna.celery_config": "{'broker_url': 'redis://dict/2', 'beat_schedule': {'d': {'task': 't.d', "
                                  "'schedule': timedelta(seconds=1)}}}",
    })
    assert config == {
        "broker_url": "redis://dict/2",
        "worker_max_tasks_per_child": 1024,
        "beat_schedule": {"d": {"task": "t.d", "schedule": timedelta(seconds=1)}},
    }


def test_flat_keys_alone_and_empty_dict_setting():
    config = celery_config_from_settings({"celery.task_acks_late": "yes", "websauna.celery_config": "  "})
    assert config == {"task_acks_late": True}


def test_ini_file_through_includeme_types_flat_keys(write_ini, redis_url, queue_name):
    ini = write_ini({
        "websauna.celery_config": "{'broker_url': %r, 'task_default_queue': %r,\n"
                                  " 'worker_prefetch_multiplier': 2}" % (redis_url, queue_name),
        "celery.worker_max_tasks_per_child": "1024",
        "celery.worker_prefetch_multiplier": "8",
        "celery.task_acks_late": "true",
        "celery.broker_transport_options": '{"visibility_timeout": 7200}',
        "celery.result_expires": "1.5",
    })
    app = get_celery(get_app(ini).registry)
    assert app.conf.worker_max_tasks_per_child == 1024
    assert type(app.conf.worker_max_tasks_per_child) is int
    assert app.conf.worker_prefetch_multiplier == 2  # the dict wins
    assert app.conf.task_acks_late is True
    assert app.conf.broker_transport_options == {"visibility_timeout": 7200}
    assert app.conf.result_expires == 1.5
    assert app.conf.task_default_queue == queue_name
    assert app.conf.broker_url == redis_url


def test_ini_file_with_injection_fails_in_includeme_without_running_it(write_ini, marker):
    ini = write_ini({"websauna.celery_config": "{'broker_url': __import__('os').system('touch %s')}" % marker})
    with pytest.raises(ConfigurationError, match=r"__import__\('os'\)\.system"):
        get_app(ini)


def test_make_app_with_a_dict_literal_setting(make_app, redis_url, queue_name):
    router = make_app(**{
        "websauna.celery_config": repr({"broker_url": redis_url, "task_default_queue": queue_name}),
        "celery.worker_concurrency": "3",
    })
    app = get_celery(router.registry)
    assert app.conf.worker_concurrency == 3
    assert app.conf.task_default_queue == queue_name


# -- grammar fuzz: Python-ish expressions, and an audit hook proving nothing is imported or run -----------------

_LEAVES = st.one_of(
    st.integers(-10**6, 10**6).map(str), st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.text(max_size=8).map(repr), st.sampled_from(["True", "None", "...", "b'x'", "1j", "9" * 60]),
    st.sampled_from(["x", "os", "timedelta", "crontab", "schedule", "__import__", "open", "pwned_global",
                     "__builtins__", "eval", "exec", "compile", "globals"]),
)


def _python_ish(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    def call(name_args):
        name, args, kwargs = name_args
        return f"{name}({', '.join(args + [f'{k}={v}' for k, v in kwargs])})"

    names = st.sampled_from(["timedelta", "crontab", "schedule", "__import__", "open", "eval", "getattr",
                             "pwned_global.append", "__import__('os').system", "exec", "type"])
    keywords = st.sampled_from(["seconds", "minute", "hour", "run_every", "days", "nowfun", "x"])
    return st.one_of(
        st.tuples(names, st.lists(children, max_size=3), st.lists(st.tuples(keywords, children), max_size=2))
        .map(call),
        st.lists(children, max_size=4).map(lambda items: "[" + ", ".join(items) + "]"),
        st.lists(children, max_size=4).map(lambda items: "(" + ", ".join(items) + ",)"),
        st.lists(children, max_size=4).map(lambda items: "{" + ", ".join(items) + "}"),
        st.lists(st.tuples(children, children), max_size=4).map(
            lambda pairs: "{" + ", ".join(f"{k}: {v}" for k, v in pairs) + "}"),
        st.tuples(children, st.sampled_from(["__class__", "__globals__", "system", "append", "__subclasses__()"]))
        .map(lambda pair: f"{pair[0]}.{pair[1]}"),
        st.tuples(children, st.sampled_from(["+", "-", "*", "/", "**", "//", "%", "and", "or", "<", "if 1 else"]),
                  children).map(" ".join),
        st.tuples(st.sampled_from(["-", "+", "not ", "~", "*", "**"]), children).map("".join),
        children.map(lambda body: f"lambda: {body}"),
        st.tuples(children, children).map(lambda pair: f"[{pair[0]} for x in {pair[1]}]"),
        st.tuples(children, children).map(lambda pair: f"{{{pair[0]}: x for x in {pair[1]}}}"),
        children.map(lambda body: f"f'{{{body}}}'"),
        children.map(lambda body: f"(x := {body})"),
        st.tuples(children, children).map(lambda pair: f"{pair[0]}[{pair[1]}]"),
        children.map(lambda body: "{'a': " + body + "}"),
    )


PYTHON_ISH = st.recursive(_LEAVES, _python_ish, max_leaves=40)
# Events that would mean part of the input was imported, compiled to code or run.
_FORBIDDEN_EVENTS = ("import", "exec", "open", "os.system", "subprocess.Popen", "os.exec", "os.spawn",
                     "builtins.input", "ctypes", "os.putenv", "os.remove", "pickle.find_class")
_audit = {"active": False, "events": []}


def _audit_hook(event: str, args: tuple) -> None:
    if not _audit["active"]:
        return
    if event == "compile":
        # ast.parse compiles to an AST only (no code object), under "<unknown>".
        if len(args) < 2 or args[1] != "<unknown>":
            _audit["events"].append((event, repr(args)[:200]))
    elif event.startswith(_FORBIDDEN_EVENTS):
        _audit["events"].append((event, repr(args)[:200]))


sys.addaudithook(_audit_hook)  # cannot be removed: inert unless _audit["active"]


def _parse_audited(function, source):
    _audit["events"] = []
    _audit["active"] = True
    try:
        return function(source)
    finally:
        _audit["active"] = False


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(PYTHON_ISH, PYTHON_ISH.map(lambda body: "{'beat_schedule': " + body + "}"),
                 st.integers(50, 200).map(lambda depth: "(" * depth + "1" + ")" * depth),
                 st.integers(41, 80).map(lambda depth: "{'a': " * depth + "1" + "}" * depth),
                 st.text(max_size=200)))
def test_fuzz_python_ish_expressions_only_configuration_error_and_nothing_runs(source):
    for function in (parse_celery_config, parse_literal):
        try:
            _parse_audited(function, source)
        except ConfigurationError:
            pass
        # Anything else (TypeError, RecursionError, OverflowError...) fails the test.
        assert _audit["events"] == [], f"parsing {source!r} imported, compiled or ran something: {_audit['events']}"
    assert pwned_global == []
    assert PWNED_ENV not in os.environ


def test_audit_hook_sees_what_it_guards_against():
    """The fuzz test's hook is able to fail: an eval or import in the window is recorded."""
    _parse_audited(lambda source: eval(compile(source, "<fuzz>", "eval")), "1")  # noqa: S307
    assert any(event in ("compile", "exec") for event, _ in _audit["events"])
    _audit["events"] = []
    try:
        _parse_audited(lambda name: __import__(name), "ws_no_such_module_for_audit")
    except ImportError:
        pass
    assert [event for event, _ in _audit["events"]] and _audit["events"][0][0] == "import"
