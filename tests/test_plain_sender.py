"""The fast path's own rendering of Celery's argsrepr/kwargsrepr headers (websauna_tasks/broker.py ``_repr``).

No service needed: every value is compared with what Celery's saferepr writes,
at Celery's limits and at small ones that truncate.
"""
from __future__ import annotations

import collections
import decimal
import random
import string

import pytest
from celery.utils.saferepr import saferepr

from websauna_tasks.broker import _repr

Pair = collections.namedtuple("Pair", "left right")

EDGES = [
    (), (1,), (1, 2), [1, "a"], ("it's",), ('a"b',), ("a\nb",), ("\t",), ("\x00",), ("\x7f",), ("\\",),
    ("é", "\u2028", "\u00a0", "😀"), (True, None, 1.5, -0.0, 10 ** 30, 1e16, 1e-7), (float("nan"), float("inf")),
    ({},), ([],), ((1,),), (b"x",), (decimal.Decimal("1.10"),), (Pair(1, 2),), Pair(1, 2), ("x" * 2000,),
    tuple(range(300)), {}, {"a": 1, "b": "x"}, {"a": [1]}, {"it's": 1}, collections.OrderedDict(a=1),
    collections.OrderedDict(), ("a" * 1020,), ("a" * 1019,), tuple("a" * 40),
]


def generated(count: int, seed: int = 14) -> list:
    rng = random.Random(seed)
    alphabet = string.printable + "é\u00a0\u2028😀\x7f\x00"

    def scalar():
        return rng.choice([
            rng.randint(-10 ** 20, 10 ** 20), rng.random() * 10 ** rng.randint(-10, 30), True, False, None,
            "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))])

    values: list = []
    for _ in range(count):
        items = [scalar() for _ in range(rng.randint(0, 8))]
        values += [tuple(items), list(items), {f"k{index}{rng.choice(['', 'é', chr(39)])}": item
                                               for index, item in enumerate(items)}]
    return values


@pytest.mark.parametrize("maxlevels", [3, 1, 0])
@pytest.mark.parametrize("maxsize", [1024, 40, 8])
def test_repr_is_what_saferepr_writes(maxsize, maxlevels):
    for value in EDGES + generated(1500):
        assert _repr(value, maxsize, maxlevels) == saferepr(value, maxsize, maxlevels=maxlevels), value
