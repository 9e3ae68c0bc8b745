"""How many dead letters there are, and of which kinds: figures for the console's overview and pager.

Built over the stores' common interface (``count``) and
:func:`list_dead_letters`, so that the stores stay the only code that knows
how letters are kept. A count is one cheap call on either store (Redis LLEN, an indexed SQL
count); the kinds are counted over the newest entries only, since a Redis
list has no index by kind and reading 100,000 entries would make every
overview slow.
"""
from __future__ import annotations

import collections
import dataclasses
import typing as t

from ._letters import get_dead_letters, list_dead_letters

if t.TYPE_CHECKING:
    from celery import Celery

#: Entries read to count the kinds.
DEFAULT_SAMPLE = 500


@dataclasses.dataclass(frozen=True)
class DeadLetterSummary:
    total: int
    #: kind -> entries of that kind among the newest ``sampled``, most frequent first.
    kinds: tuple[tuple[str, int], ...]
    #: Entries the kinds were counted over: all of them when it equals ``total``.
    sampled: int

    @property
    def exact(self) -> bool:
        return self.sampled >= self.total


def count_dead_letters(app: Celery) -> int:
    """The number of dead letters ``app`` keeps (NoDeadLetterStore when it has nowhere to keep them)."""
    return int(get_dead_letters(app).backend.count())


def summarize_dead_letters(app: Celery, sample: int = DEFAULT_SAMPLE) -> DeadLetterSummary:
    """The count, and the kinds among the newest ``sample`` entries."""
    total = count_dead_letters(app)
    newest = list_dead_letters(app, -sample, -1) if total and sample > 0 else []
    kinds = collections.Counter(str(entry.get("kind")) for entry in newest)
    return DeadLetterSummary(total, tuple(kinds.most_common()), len(newest))
