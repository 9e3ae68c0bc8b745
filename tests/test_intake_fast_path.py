"""The intake's cheap path for a plain message (intake.py) still refuses what looks plain but is not.

The checks a well-formed message passes are ordered so that the common case
costs little (bench/intake_cost.py): the ISO 8601 parse only for a message
with a time header, one pass over the string headers, no walk of empty
kwargs, the app's task registry read once. Each shortcut is pinned here by a
message it must not let through.
"""
from __future__ import annotations

import json

import pytest
from kombu.transport import virtual

from tests.conftest import include_in_memory
from websauna_tasks import get_celery
from websauna_tasks.intake import _STRING_HEADERS, body_problem, headers_problem
from websauna_tasks.redis_transport import Message
from websauna_tasks.state import find_state

PLAIN_HEADERS = {"lang": "py", "task": "tests.add", "id": "abc", "shadow": None, "eta": None, "expires": None,
                 "group": None, "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": "abc",
                 "parent_id": None, "argsrepr": "(0,)", "kwargsrepr": "{}", "origin": "gen1@host",
                 "ignore_result": False, "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {}}


def test_the_headers_celery_sends_pass():
    assert headers_problem(PLAIN_HEADERS) is None


@pytest.mark.parametrize("key", _STRING_HEADERS)
@pytest.mark.parametrize("value", [5, 0, False, b"x", ["x"], {"a": 1}, 1.5])
def test_every_string_header_of_another_type_is_named(key, value):
    problem = headers_problem(dict(PLAIN_HEADERS, **{key: value}))
    assert problem == f"the {key} header is a {type(value).__name__}, not a string"


def test_of_two_wrong_string_headers_holding_one_object_the_first_is_named():
    wrong = ["x"]
    assert headers_problem(dict(PLAIN_HEADERS, root_id=None, group=wrong, origin=wrong)) == (
        "the group header is a list, not a string")


@pytest.mark.parametrize("change, words", [
    ({"eta": 0}, "eta header is a int"),  # falsy, yet set: a truthiness shortcut would let it through
    ({"eta": False}, "eta header is a bool"),
    ({"expires": 0}, "expires header is a int"),
    ({"expires": "later"}, "expires header 'later'"),  # with eta None
    ({"eta": "2030-01-01T00:00:00+00:00", "expires": "garbage"}, "expires header 'garbage'"),
])
def test_time_headers_are_parsed_whenever_one_is_set(change, words):
    assert words in headers_problem(dict(PLAIN_HEADERS, **change))


def test_time_headers_that_parse_pass():
    assert headers_problem(dict(PLAIN_HEADERS, eta="2030-01-01T00:00:00+00:00",
                                expires="2030-01-02T00:00:00")) is None


def test_empty_kwargs_pass_and_a_keyword_that_is_not_a_string_is_refused():
    assert body_problem([[1], {}, None], b'[[1], {}, null]') is None
    assert body_problem([[1], {1: 2}, None]) == "a keyword of kwargs is not a string"
    assert body_problem([[1], {"a": 1, 2: 3}, None]) == "a keyword of kwargs is not a string"
    assert body_problem([[1], [], None]) == "kwargs is a list, not a dict"


class Channel:
    """What a kombu Message asks of its channel while it is built."""

    codecs = virtual.Channel.codecs

    def decode_body(self, body, encoding=None):
        return virtual.Channel.decode_body(self, body, encoding)


def message_for(name: str, args: list, kwargs: dict | None = None) -> Message:
    body = json.dumps([args, kwargs or {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    return Message({"body": body, "content-type": "application/json", "content-encoding": "utf-8",
                    "headers": dict(PLAIN_HEADERS, task=name),
                    "properties": {"delivery_tag": "t1", "delivery_info": {"exchange": "", "routing_key": "q"}}},
                   channel=Channel())


def test_a_task_registered_after_the_intake_read_the_registry_is_known_and_checked():
    config = include_in_memory()
    app = get_celery(config.registry)
    intake = find_state(app).intake
    assert intake.problem(message_for("tests.later", [1])) is None  # unknown yet: left to Celery and the grace
    assert intake._tasks is not None  # read once, kept

    @app.task(name="tests.later")
    def later(number):
        return number

    assert intake.problem(message_for("tests.later", [1])) is None
    assert intake.problem(message_for("tests.later", [1, 2]))[0] == "signature_mismatch"
    assert intake.problem(message_for("tests.later", [], {"other": 1}))[0] == "signature_mismatch"
