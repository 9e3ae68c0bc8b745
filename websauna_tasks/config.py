"""INI settings -> a plain Celery configuration dict.

``websauna.celery_config`` is written as a Python literal, but it comes from a
file that operators edit, so it is parsed with :mod:`ast` and walked by hand:
nothing in it is ever evaluated. Only literals and three constructors
(``timedelta``, ``crontab``, ``schedule``) are understood; anything else is a
:class:`pyramid.exceptions.ConfigurationError` quoting the offending text.

Settings may also be given as flat, typed keys, ``celery.<name> = value``
(int, float, bool, None, JSON, else text). When a name is set both ways the
``websauna.celery_config`` dict wins, key by key at the top level (a
``beat_schedule`` in the dict replaces a flat ``celery.beat_schedule`` as a
whole): the dict is the documented, primary form, and flat keys are for
per-deployment values that the dict leaves unset.
"""
from __future__ import annotations

import ast
import json
import math
import re
import typing as t
import warnings
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
# No Celery setting needs more; bounding ints also keeps ``a * b * c...``
# from building numbers that str() (hence logging, ``report``) refuses.
MAX_INT_BITS = 128

_CALLABLES: dict[str, t.Callable[..., t.Any]] = {
    "timedelta": timedelta,
    "crontab": crontab,
    "schedule": schedule,
}

# crontab's own parameter order.
_CRON_FIELDS = ("minute", "hour", "day_of_week", "day_of_month", "month_of_year")

_NUMBER_OPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}


# Words an operator knows, for the error message.
_NODE_NAMES = {
    ast.JoinedStr: "f-strings are",
    ast.NamedExpr: "assignment expressions (:=) are",
    ast.Lambda: "lambdas are",
    ast.ListComp: "comprehensions are",
    ast.SetComp: "comprehensions are",
    ast.DictComp: "comprehensions are",
    ast.GeneratorExp: "generator expressions are",
    ast.Subscript: "subscripts are",
    ast.BinOp: "this operator is",
    ast.UnaryOp: "this operator is",
    ast.BoolOp: "boolean operators are",
    ast.Compare: "comparisons are",
    ast.IfExp: "conditional expressions are",
}


class _LiteralReader:
    """Turns an ``ast`` expression made only of allowed nodes into a value."""

    def __init__(self, source: str, setting: str):
        self.source = source
        self.setting = setting

    def refuse(self, node: ast.AST | None, why: str) -> t.NoReturn:
        # node None: the problem is the whole text (a leaf 40 levels down
        # would not show the reader where to look).
        text = self.source if node is None else ast.get_source_segment(self.source, node) or ast.dump(node)
        if len(text) > 200:
            text = text[:200] + "..."
        raise ConfigurationError(f"{self.setting}: {why}: {text!r}")

    def read(self, node: ast.AST, depth: int = 0) -> t.Any:
        if depth > MAX_DEPTH:
            self.refuse(None, f"nested too deeply (more than {MAX_DEPTH} levels)")
        if isinstance(node, ast.Constant):
            if isinstance(node.value, (str, int, float, bool, type(None))):
                return self.bounded(node, node.value)
            self.refuse(node, "unsupported constant")
        if isinstance(node, ast.Dict):
            result = {}
            for key_node, value_node in zip(node.keys, node.values):
                if key_node is None:  # {**other}
                    self.refuse(value_node, "dict unpacking is not allowed")
                key = self.read(key_node, depth + 1)
                try:
                    hash(key)  # a tuple holding a list is unhashable too
                except TypeError:
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
                return self.bounded(node, _NUMBER_OPS[type(node.op)](left, right))
            except ZeroDivisionError:
                self.refuse(node, "division by zero")
            except OverflowError:  # a big int meeting a float
                self.refuse(node, "number too large")
        if isinstance(node, ast.Call):
            return self.read_call(node, depth)
        if isinstance(node, ast.Name):
            self.refuse(node, "names are not allowed (only literals, timedelta(), crontab(), schedule())")
        if isinstance(node, ast.Attribute):
            self.refuse(node, "attribute access is not allowed")
        kind = _NODE_NAMES.get(type(node), f"{type(node).__name__} expressions are")
        self.refuse(node, f"{kind} not allowed (only literals, timedelta(), crontab(), schedule())")

    def bounded(self, node: ast.AST, value: t.Any) -> t.Any:
        if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS:
            self.refuse(node, "number too large")
        return value

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
        name = node.func.id
        for value in list(args) + list(kwargs.values()):
            if not _ARGUMENT_CHECKS[name](value):
                self.refuse(node, _ARGUMENT_HELP[name])
        # nowfun/app/relative are code-level knobs, not INI material (and
        # crontab(nowfun="x") would only fail when beat first ticks).
        if name == "schedule" and (len(args) + len(kwargs) != 1 or set(kwargs) - {"run_every"}):
            self.refuse(node, "schedule() takes one argument, run_every")
        if name == "crontab" and (len(args) > len(_CRON_FIELDS) or set(kwargs) - set(_CRON_FIELDS)):
            self.refuse(node, f"crontab() takes only {', '.join(_CRON_FIELDS)}")
        try:
            return _CALLABLES[name](*args, **kwargs)
        except Exception as exc:  # TypeError, ValueError, OverflowError, crontab's ParseException
            self.refuse(node, f"invalid arguments ({exc})")


def _is_number(value: t.Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_cronspec(value: t.Any) -> bool:
    # crontab takes "*/5", 7, or a collection of ints such as [0, 30].
    if isinstance(value, (list, tuple, set)):
        return all(isinstance(item, int) and not isinstance(item, bool) for item in value)
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


_ARGUMENT_CHECKS: dict[str, t.Callable[[t.Any], bool]] = {
    "timedelta": _is_number,
    "crontab": _is_cronspec,
    "schedule": lambda value: _is_number(value) or isinstance(value, timedelta),
}
_ARGUMENT_HELP = {
    "timedelta": "timedelta() arguments must be numbers",
    "crontab": "crontab() arguments must be strings, ints or lists of ints",
    "schedule": "schedule() takes a number of seconds or a timedelta()",
}


def parse_literal(source: str, setting: str = CONFIG_KEY) -> t.Any:
    """Parse a Python-literal expression without evaluating it."""
    if not isinstance(source, str):
        raise ConfigurationError(f"{setting}: expected text, got {type(source).__name__}")
    if len(source) > MAX_CONFIG_CHARS:
        raise ConfigurationError(f"{setting}: longer than {MAX_CONFIG_CHARS} characters: {source[:200]!r}...")
    # INI continuation lines come indented; strip so ast sees one expression.
    text = source.strip()
    try:
        with warnings.catch_warnings():
            # e.g. "invalid escape sequence": the literal is data, not code
            # to lint, and a warning would land in every worker's log.
            warnings.simplefilter("ignore")
            tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise ConfigurationError(
            f"{setting}: not a Python literal ({exc.msg} at line {exc.lineno}): {text[:200]!r}"
        ) from None
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
        raise ConfigurationError(
            f"{CONFIG_KEY}: must be a dict literal, got {type(value).__name__}: {source.strip()[:200]!r}"
        )
    for key in value:
        if not isinstance(key, str):
            raise ConfigurationError(f"{CONFIG_KEY}: keys must be strings, got {key!r}")
    return value


_INT_TEXT = re.compile(r"[+-]?[0-9]+", re.ASCII)
_FLOAT_TEXT = re.compile(r"[+-]?([0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)([eE][+-]?[0-9]+)?", re.ASCII)


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
    # Plain ASCII numerals only: float() alone would also turn words such as
    # "inf" or "nan" (a queue name?) into numbers.
    if _INT_TEXT.fullmatch(text):
        try:
            return int(text)
        except ValueError:  # past Python's int/str digit limit
            raise ConfigurationError(f"{FLAT_PREFIX}{name}: number too large: {text[:200]!r}...") from None
    if _FLOAT_TEXT.fullmatch(text):
        return float(text)
    if text and text[0] in "[{\"":
        try:
            return json.loads(text)
        except ValueError as exc:
            raise ConfigurationError(
                f"{FLAT_PREFIX}{name}: looks like JSON but is not valid ({exc}): {text[:200]!r}"
            ) from None
        except RecursionError:
            raise ConfigurationError(f"{FLAT_PREFIX}{name}: JSON nested too deeply: {text[:200]!r}") from None
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


def number_setting(settings: t.Mapping[str, t.Any], key: str, default: float, minimum: float = 0.0,
                   unit: str = "") -> float:
    """A numeric ``websauna_tasks.*`` setting, ``default`` when absent; ConfigurationError naming it otherwise."""
    raw = settings.get(key)
    if raw in (None, ""):
        return default
    unit_text = f" {unit}" if unit else ""
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ConfigurationError(f"{key}: expected a number{unit_text and ' of' + unit_text}, got {raw!r}") from None
    if not math.isfinite(value) or value < minimum:
        raise ConfigurationError(f"{key}: must be {minimum:g} or more{unit_text}, got {raw!r}")
    return value
