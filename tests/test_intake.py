"""The worker's intake, piece by piece, without a broker (intake.py, redis_transport.py).

The same checks meet real workers and real Redis in tests/test_intake_battery.py.
"""
from __future__ import annotations

import base64
import bz2
import json
import lzma
import zlib

import kombu.compression
import pytest
from kombu.transport import virtual

from tests.apps import deferred_functions, sample_tasks
from websauna_tasks import intake
from websauna_tasks.defer import DeferNotAllowed, resolve_deferred, target_problem
from websauna_tasks.intake import MAX_BODY_DEPTH, MessageTooLarge, body_problem, headers_problem
from websauna_tasks.payload import MAX_NESTING_DEPTH, check_payload, nesting_exceeds
from websauna_tasks.redis_transport import QUARANTINE_HEADER, Message, quarantine


def nested(depth: int, leaf: object = 1) -> object:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


class NoLimitApp:
    """check_payload reads only the payload limit off the app."""


# -- nesting -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [0, 1, 5, MAX_NESTING_DEPTH])
def test_nesting_within_the_bound_is_accepted(depth):
    assert nesting_exceeds(nested(depth), MAX_NESTING_DEPTH) is False
    check_payload(NoLimitApp(), "t", (nested(depth),), {})


@pytest.mark.parametrize("depth", [MAX_NESTING_DEPTH + 1, 300, 5000, 200_000])
def test_deeper_arguments_are_a_type_error_naming_them(depth):
    assert nesting_exceeds(nested(depth), MAX_NESTING_DEPTH) is True
    with pytest.raises(TypeError, match=r"t: argument 2 \(list\) is nested more than 64 levels deep"):
        check_payload(NoLimitApp(), "t", ("fine", nested(depth)), {})
    with pytest.raises(TypeError, match=r"keyword argument 'deep' \(dict\) is nested more than 64"):
        check_payload(NoLimitApp(), "t", (), {"deep": {"a": nested(depth)}})


def test_nesting_counts_dicts_and_lists_alike():
    value: object = 1
    for index in range(MAX_NESTING_DEPTH + 1):
        value = {"k": value} if index % 2 else [value]
    assert nesting_exceeds(value, MAX_NESTING_DEPTH)
    assert not nesting_exceeds(value, MAX_NESTING_DEPTH + 1)


def test_wide_payloads_with_many_brackets_are_not_deep():
    wide = [[index] for index in range(1000)]
    check_payload(NoLimitApp(), "t", (wide,), {})


# -- body and headers ------------------------------------------------------------------------------------------------

GOOD_HEADERS = {"id": "abc", "task": "tests.add", "eta": None, "expires": None, "retries": 0,
                "timelimit": [None, None], "root_id": "abc", "parent_id": None, "group": None}


def test_a_celery_body_and_headers_pass():
    assert body_problem([[1, 2], {"a": 1}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]) is None
    assert body_problem([[], {}, None]) is None
    assert headers_problem(dict(GOOD_HEADERS, eta="2030-01-01T00:00:00+00:00", timelimit=[10, 5.5])) is None


@pytest.mark.parametrize("body, words", [
    ([1], "not the [args, kwargs, embed] triple of the task protocol (a list of 1)"),
    ({"args": []}, "(a dict)"),
    ("text", "(a str)"),
    ([[], {}, {}, 4], "(a list of 4)"),
    ([1, {}, {}], "args is a int"),
    ([[], [], {}], "kwargs is a list"),
    ([[], {}, 5], "embed is a int"),
    ([nested(MAX_BODY_DEPTH), {}, {}], f"nests more than {MAX_BODY_DEPTH} levels"),
    ([[], {"k": nested(MAX_BODY_DEPTH)}, {}], f"nests more than {MAX_BODY_DEPTH} levels"),
])
def test_bodies_that_are_not_a_task_call_are_named(body, words):
    assert words in body_problem(body)
    # With the text it came as: the bracket count only spares the walk of shallow bodies.
    assert words in body_problem(body, json.dumps(body).encode())


def test_a_shallow_body_with_brackets_in_its_strings_is_still_accepted():
    body = [["[" * 500, "{" * 500], {}, None]
    assert body_problem(body, json.dumps(body).encode()) is None


@pytest.mark.parametrize("change, words", [
    ({"id": None}, "id header"),
    ({"id": 5}, "id header"),
    ({"eta": "garbage"}, "eta header 'garbage' is not an ISO 8601 time"),
    ({"eta": 12}, "eta header is a int"),
    ({"expires": "2024-13-01T00:00:00"}, "expires header"),
    ({"retries": "1"}, "retries header"),
    ({"retries": -1}, "retries header"),
    ({"timelimit": [1]}, "timelimit header"),
    ({"timelimit": [float("nan"), None]}, "timelimit header"),
    ({"timelimit": "60"}, "timelimit header"),
    ({"root_id": ["x"]}, "root_id header is a list"),
])
def test_headers_celery_would_fail_on_are_named(change, words):
    assert words in headers_problem(dict(GOOD_HEADERS, **change))


# -- bounded inflation -------------------------------------------------------------------------------------------

@pytest.fixture
def bounded_decoders():
    saved = {content_type: kombu.compression.get_decoder(content_type) for content_type in kombu.compression.encoders()}
    intake.install_bounded_decoders(1024 * 1024)
    yield
    for content_type, decoder in saved.items():
        encoder, _ = kombu.compression.get_encoder(content_type)
        kombu.compression.register(encoder, decoder, content_type)
    intake._inflate_limit = 0


def bomb(compress_object, size: int) -> bytes:
    chunk = b"\0" * (1024 * 1024)
    parts = [compress_object.compress(chunk) for _ in range(size // len(chunk))]
    return b"".join(parts) + compress_object.flush()


@pytest.mark.parametrize("name, make", [
    ("zlib", zlib.compressobj), ("bzip2", bz2.BZ2Compressor), ("lzma", lzma.LZMACompressor)])
def test_a_compression_bomb_stops_at_the_limit(bounded_decoders, name, make):
    body = bomb(make(), 64 * 1024 * 1024)
    assert len(body) < 1024 * 1024
    with pytest.raises(MessageTooLarge, match="inflates to more than websauna_tasks.max_message_bytes = 1048576"):
        kombu.compression.decompress(body, name)


@pytest.mark.parametrize("name", ["zlib", "bzip2", "lzma"])
def test_bodies_within_the_limit_inflate_as_before(bounded_decoders, name):
    body = json.dumps([[1, "x" * 1000], {}, {}]).encode()
    compressed, content_type = kombu.compression.compress(body, name)
    assert kombu.compression.decompress(compressed, content_type) == body


def test_a_truncated_stream_is_refused(bounded_decoders):
    compressed = zlib.compress(b"abc" * 1000)
    with pytest.raises(MessageTooLarge, match="truncated"):
        kombu.compression.decompress(compressed[:-8], "zlib")


def test_compressions_without_a_bounded_decoder_are_refused(bounded_decoders):
    kombu.compression.register(zlib.compress, zlib.decompress, "application/x-websauna-test")
    try:
        intake.install_bounded_decoders(1024)
        with pytest.raises(MessageTooLarge, match="application/x-websauna-test bodies cannot be inflated"):
            kombu.compression.decompress(zlib.compress(b"x"), "application/x-websauna-test")
    finally:
        kombu.compression._encoders.pop("application/x-websauna-test", None)
        kombu.compression._decoders.pop("application/x-websauna-test", None)


# -- the Redis transport's quarantine -----------------------------------------------------------------------------

class Base64Channel:
    """What a kombu Message asks of its channel while it is built."""

    codecs = virtual.Channel.codecs

    def decode_body(self, body, encoding=None):
        return virtual.Channel.decode_body(self, body, encoding)


def test_a_kombu_envelope_is_built_as_usual():
    raw = quarantine(b"payload", "q", "why")
    raw["headers"] = {"task": "tests.add", "id": "1"}
    message = Message(raw, channel=Base64Channel())
    assert message.body == b"payload" and message.headers == {"task": "tests.add", "id": "1"}
    assert message._raw is raw


@pytest.mark.parametrize("entry", [
    [1], {"body": "x"}, {"properties": []}, {"properties": {"delivery_tag": "t", "body_encoding": "base64"},
                                             "body": "not base64!"},
    {"properties": {"delivery_tag": "t"}, "headers": ["a"]}, "text", 7, None,
])
def test_an_entry_that_is_not_an_envelope_becomes_a_quarantine_message(entry):
    message = Message(entry, channel=Base64Channel())
    assert QUARANTINE_HEADER in message.headers
    assert "not a kombu envelope" in message.headers[QUARANTINE_HEADER]
    assert json.loads(message.body) == entry  # the original entry's bytes, unchanged
    assert message._raw["properties"]["delivery_tag"]  # held unacked like any message


def test_quarantine_keeps_bytes_that_are_not_text():
    raw = quarantine(b"\xff\xfe not utf-8", "work", "not JSON")
    assert base64.b64decode(raw["body"]) == b"\xff\xfe not utf-8"
    assert raw["properties"]["delivery_info"]["routing_key"] == "work"


# -- deferred calls: one rule at the call and in the worker ------------------------------------------------------

PREFIXES = ("tests",)


@pytest.mark.parametrize("path", ["tests.apps.deferred_functions:record",
                                  "tests.apps.deferred_functions:Jobs.static_record",
                                  "tests.apps.deferred_functions:Jobs.class_record"])
def test_functions_static_and_class_methods_resolve(path):
    assert callable(resolve_deferred(path, ["x"], {}, PREFIXES))


@pytest.mark.parametrize("path, words", [
    ("tests.apps.sample_tasks:record", "is a @task"),
    ("tests.apps.deferred_functions:Jobs", "is a class"),
    ("tests.apps.deferred_functions:Jobs.bound_record", "needs an instance"),
    ("os:system", "is not allowed"),
    ("tests.apps.deferred_functions:json.dumps", "defined elsewhere"),
    ("tests.apps.deferred_functions:__builtins__", "not a plain qualified name"),
    ("tests.apps.deferred_functions:missing", "cannot be found"),
    ("tests.no_such_module:f", "cannot be found"),
    ("tests.apps.deferred_functions", "malformed function path"),
    (["tests.apps.deferred_functions:record"], "malformed function path"),
])
def test_a_forged_deferred_call_is_refused_with_a_reason(path, words):
    with pytest.raises(DeferNotAllowed, match=words.replace("@", "@")):
        resolve_deferred(path, [], {}, PREFIXES)


def test_the_call_refuses_what_the_worker_refuses():
    assert "is a @task" in target_problem("tests.apps.sample_tasks", "record", sample_tasks.record)
    assert target_problem("tests.apps.deferred_functions", "Jobs",
                          deferred_functions.Jobs) == "is a class, not a function"
    assert "needs an instance" in target_problem("tests.apps.deferred_functions", "Jobs.bound_record",
                                                 deferred_functions.Jobs.bound_record)
    assert target_problem("tests.apps.deferred_functions", "record", deferred_functions.record) is None
