"""One page of dead letters, newest first, at the same cost on the first page and the two-thousandth.

Each store pages the way its structure makes cheap:

- the Redis list by page number counted from its newest end: LRANGE with
  negative indexes walks the list's nodes (a hundred entries or so each)
  from the nearer end, not its entries, so page 1,000 of 100,000 letters
  costs about what page 1 does;
- the table by keyset over ``seq``: a page holds the rows just older
  (``before``) or just newer (``after``) than the row a link names, one
  walk of the (list_name, seq) index from there. An offset would walk every
  row before the page: 0.4 s for a middle page of 100,000 on PostgreSQL.

A cursor is a row's seq, so letters appended or dropped meanwhile never
shift a page. A cursor the store cannot use (a page number on the table, a
seq on the Redis list, one past every row) gives the newest page; one that
cannot be a seq at all is a :class:`BadCursor` (a ValueError).
"""
from __future__ import annotations

import dataclasses
import math
import typing as t

from ._letters import get_dead_letters
from ._redis import RedisStore

if t.TYPE_CHECKING:
    from celery import Celery

#: Letters on one page.
PAGE_SIZE = 50
#: Rows the table's count stops at: past it a page says "more than", at the cost of this many index entries.
COUNT_LIMIT = 10_000
#: The largest seq a cursor may name: the column is a signed 64-bit integer.
MAX_CURSOR = 2 ** 63 - 1

Query = t.Optional[t.Dict[str, int]]


class BadCursor(ValueError):
    """A ``page``, ``before`` or ``after`` that cannot be one: the caller's mistake, not the store's."""


@dataclasses.dataclass(frozen=True)
class LetterPage:
    """Letters newest first, and the query values of the pages around them (None: there is none that way)."""

    entries: list[dict[str, t.Any]]
    #: Letters in all; on the table counted up to :data:`COUNT_LIMIT` only, ``exact`` False past it.
    total: int
    newest: Query
    newer: Query
    older: Query
    oldest: Query
    #: Page ``number`` of ``pages`` on the Redis list; None on the table, whose pages have no number.
    number: int | None = None
    pages: int | None = None
    exact: bool = True


def cursor(value: t.Any, name: str) -> int | None:
    """``before``/``after`` as a seq; :class:`BadCursor` for anything that cannot be one."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadCursor(f"{name} must be a whole number, got {type(value).__name__}")
    if not 0 <= value <= MAX_CURSOR:
        raise BadCursor(f"{name} must be between 0 and {MAX_CURSOR}")
    return value


def page_dead_letters(app: Celery, *, page: int = 1, before: int | None = None, after: int | None = None,
                      size: int = PAGE_SIZE) -> LetterPage:
    """A page of ``app``'s dead letters, newest first: ``page`` on the Redis list, ``before``/``after`` on the table.

    :class:`NoDeadLetterStore` when the app has nowhere to keep them.
    """
    before, after = cursor(before, "before"), cursor(after, "after")
    if before is not None and after is not None:
        raise BadCursor("a page is either before a letter or after one, not both")
    if isinstance(page, bool) or not isinstance(page, int):
        raise BadCursor(f"page must be a whole number, got {type(page).__name__}")
    store = get_dead_letters(app).backend
    if isinstance(store, RedisStore):
        total = int(store.count())  # LLEN: kept by Redis, exact at no cost
        pages = max(1, math.ceil(total / size))
        number = min(max(page, 1), pages)
        stop = -1 - (number - 1) * size
        entries = store.read(stop - size + 1, stop, None)[::-1] if total else []
        return LetterPage(entries, total, newest={"page": 1} if number > 1 else None,
                          newer={"page": number - 1} if number > 1 else None,
                          older={"page": number + 1} if number < pages else None,
                          oldest={"page": pages} if number < pages else None, number=number, pages=pages)
    total = store.count(limit=COUNT_LIMIT)
    rows, newer, older = store.newest_first(before, after, size)
    if not rows and (before is not None or after is not None):
        # Past every row, or every row beyond the cursor dropped since: the newest page rather than an empty one.
        rows, newer, older = store.newest_first(None, None, size)
    return LetterPage([entry for _seq, entry in rows], min(total, COUNT_LIMIT), exact=total <= COUNT_LIMIT,
                      newest={} if newer else None,
                      newer={"after": rows[0][0]} if newer else None,
                      older={"before": rows[-1][0]} if older else None,
                      oldest={"after": 0} if older else None)
