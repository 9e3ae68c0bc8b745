"""INI settings -> a plain Celery configuration dict.

``websauna.celery_config`` is written as a Python literal, but it comes from a
file that operators edit, so it is parsed with :mod:`ast` and walked by hand:
nothing in it is ever evaluated. Only literals and three constructors
(``timedelta``, ``crontab``, ``schedule``) are understood; anything else is a
:class:`pyramid.exceptions.ConfigurationError` quoting the offending text.
"""
from __future__ import annotations

import ast
import json
import typing as t
from datetime import timedelta

from celery.schedules import crontab, schedule
from pyramid.exceptions import ConfigurationError

#: The INI key holding the literal dict.
CONFIG_KEY = "websauna.celery_config"
#: Prefix of the flat, typed keys (``celery.broker_url = ...``).
FLAT_PREFIX = "celery."

# Keeps a hostile config from making us build huge values (e.g. "9" * 10**6)
# or recurse until the interpreter gives up.
MAX_CONFIG_CHARS = 256 * 1024
MAX_DEPTH = 40

_CALLABLES: dict[str, t.Callable[..., t.Any]] = {
    "timedelta": timedelta,
    "crontab": crontab,
    "schedule": schedule,
}

_NUMBER_OPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}


class _LiteralReader:
    """Turns an ``ast`` expression made only of allowed nodes into a value."""

    def __init__(self, source: str, setting: str):
        self.source = source
        self.setting = setting

    def refuse(self, node: ast.AST, why: str) -> t.NoReturn:
        text = ast.get_source_segment(self.source, node) or ast.dump(node)
        if len(text) > 200:
            text = text[:200] + "..."
        raise ConfigurationError(f"{self.setting}: {why}: {text!r}")

    def read(self, node: ast.AST, depth: int = 0) -> t.Any:
        if depth > MAX_DEPTH:
            self.refuse(node, "nested too deeply")
        if isinstance(node, ast.Constant):
            if isinstance(node.value, (str, int, float, bool, type(None))):
                return node.value
            self.refuse(node, "unsupported constant")
        if isinstance(node, ast.Dict):
            result = {}
            for key_node, value_node in zip(node.keys, node.values):
                if key_node is None:  # {**other}
                    self.refuse(value_node, "dict unpacking is not allowed")
                key = self.read(key_node, depth + 1)
                if isinstance(key, (dict, list, set)):
                    self.refuse(key_node, "unhashable dict key")
                result[key] = self.read(value_node, depth + 1)
            return result
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            items = []
            for item in node.elts:
                if isinstance(item, ast.Starred):
                    self.refuse(item, "unpacking is not allowed")
                items.append(self.read(item, depth + 1))
            if isinstance(node, ast.List):
                return items
            if isinstance(node, ast.Tuple):
                return tuple(items)
            try:
                return set(items)
            except TypeError:
                self.refuse(node, "unhashable set item")
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            operand = self.read(node.operand, depth + 1)
            if not _is_number(operand):
                self.refuse(node, "sign applied to a non-number")
            return -operand if isinstance(node.op, ast.USub) else operand
        if isinstance(node, ast.BinOp) and type(node.op) in _NUMBER_OPS:
            # Lets people write ``60 * 60`` for an hour; numbers only, and
            # no ``**`` so the size of the result stays bounded.
            left = self.read(node.left, depth + 1)
            right = self.read(node.right, depth + 1)
            if not (_is_number(left) and _is_number(right)):
                self.refuse(node, "arithmetic is only allowed between numbers")
            try:
                return _NUMBER_OPS[type(node.op)](left, right)
            except ZeroDivisionError:
                self.refuse(node, "division by zero")
        if isinstance(node, ast.Call):
            return self.read_call(node, depth)
        if isinstance(node, ast.Name):
            self.refuse(node, "names are not allowed (only literals, timedelta(), crontab(), schedule())")
        if isinstance(node, ast.Attribute):
            self.refuse(node, "attribute access is not allowed")
        self.refuse(node, f"{type(node).__name__} is not allowed")

    def read_call(self, node: ast.Call, depth: int) -> t.Any:
        if not isinstance(node.func, ast.Name) or node.func.id not in _CALLABLES:
            self.refuse(node, "only timedelta(), crontab() and schedule() may be called")
        args = []
        for arg in node.args:
            if isinstance(arg, ast.Starred):
                self.refuse(arg, "unpacking is not allowed")
            args.append(self.read(arg, depth + 1))
        kwargs = {}
        for keyword in node.keywords:
            if keyword.arg is None:
                self.refuse(keyword.value, "keyword unpacking is not allowed")
            kwargs[keyword.arg] = self.read(keyword.value, depth + 1)
        for value in list(args) + list(kwargs.values()):
            if not isinstance(value, (str, int, float, timedelta)) or isinstance(value, bool):
                self.refuse(node, "arguments must be numbers or strings")
        try:
            return _CALLABLES[node.func.id](*args, **kwargs)
        except (TypeError, ValueError, OverflowError) as exc:
            self.refuse(node, f"invalid arguments ({exc})")
        except Exception as exc:  # crontab raises its own ParseException
            self.refuse(node, f"invalid arguments ({exc})")


def _is_number(value: t.Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_literal(source: str, setting: str = CONFIG_KEY) -> t.Any:
    """Parse a Python-literal expression without evaluating it."""
    if not isinstance(source, str):
        raise ConfigurationError(f"{setting}: expected text, got {type(source).__name__}")
    if len(source) > MAX_CONFIG_CHARS:
        raise ConfigurationError(f"{setting}: longer than {MAX_CONFIG_CHARS} characters")
    # INI continuation lines come indented; strip so ast sees one expression.
    text = source.strip()
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise ConfigurationError(f"{setting}: not a Python literal ({exc.msg} at line {exc.lineno}): {text[:200]!r}") from None
    except (ValueError, RecursionError, MemoryError) as exc:
        raise ConfigurationError(f"{setting}: cannot be parsed ({type(exc).__name__}): {text[:200]!r}") from None
    try:
        return _LiteralReader(text, setting).read(tree.body)
    except RecursionError:
        raise ConfigurationError(f"{setting}: nested too deeply: {text[:200]!r}") from None


def parse_celery_config(source: str) -> dict[str, t.Any]:
    """Parse the ``websauna.celery_config`` value; it must be a dict."""
    value = parse_literal(source, CONFIG_KEY)
    if not isinstance(value, dict):
        raise ConfigurationError(f"{CONFIG_KEY}: must be a dict literal, got {type(value).__name__}")
    for key in value:
        if not isinstance(key, str):
            raise ConfigurationError(f"{CONFIG_KEY}: keys must be strings, got {key!r}")
    return value


def coerce_flat_value(name: str, raw: str) -> t.Any:
    """Type a ``celery.<name> = value`` line: int, float, bool, None, JSON, else text.

    INI values are strings; Celery wants numbers for things like
    ``worker_max_tasks_per_child`` (pyramid_celery #103 crashed the pool by
    passing the string).
    """
    text = raw.strip()
    lowered = text.lower()
    if lowered in ("true", "yes", "on"):
        return True
    if lowered in ("false", "no", "off"):
        return False
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text[:1] in "[{\"":
        try:
            return json.loads(text)
        except ValueError as exc:
            raise ConfigurationError(f"{FLAT_PREFIX}{name}: looks like JSON but is not valid ({exc}): {text[:200]!r}") from None
    return text


def celery_config_from_settings(settings: t.Mapping[str, t.Any]) -> dict[str, t.Any]:
    """Merge flat ``celery.*`` keys and the ``websauna.celery_config`` dict.

    The dict wins over a flat key of the same name: it is the documented,
    primary form, and flat keys are meant for per-deployment overrides of
    values that the dict does not set.
    """
    config: dict[str, t.Any] = {}
    for key, value in settings.items():
        if key.startswith(FLAT_PREFIX) and len(key) > len(FLAT_PREFIX):
            name = key[len(FLAT_PREFIX):]
            config[name] = coerce_flat_value(name, value) if isinstance(value, str) else value
    raw = settings.get(CONFIG_KEY)
    if raw is not None and not (isinstance(raw, str) and not raw.strip()):
        parsed = raw if isinstance(raw, dict) else parse_celery_config(raw)
        config.update(parsed)
    return config


def has_celery_settings(settings: t.Mapping[str, t.Any]) -> bool:
    return CONFIG_KEY in settings or any(k.startswith(FLAT_PREFIX) for k in settings)
