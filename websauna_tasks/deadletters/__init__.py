"""Dead letters: messages a worker will not run, kept with a reason so that an operator can act (docs/bad_input.md).

The worker's intake (intake.py) decides what cannot run: what Celery itself
refuses (``unknown_task``, ``unknown_message``, ``invalid_task`` such as
pickle, ``undecodable``) and what its own gate refuses (``malformed``,
``too_large``, ``refused_deferred``, ``unreadable``, ``intake_error``).
:func:`dead_letter` keeps the copy: the raw message, as kombu stored it,
with the kind, a reason and the time, logged at ERROR with its id and task
name.

Its modules: ``_entries`` an entry, written by a worker and read back
whatever was stored; ``_redis`` the Redis list (the broker is Redis);
``_sql`` the table ``websauna_tasks_dead_letters`` (any other broker, in
the application's database); ``_letters`` which one an app uses, and the
operator functions over either: :func:`list_dead_letters`,
:func:`requeue_dead_letter`, :func:`drop_dead_letter`,
:func:`prune_dead_letters` (also ``ws-celery INI -- dead-letters``).
``_summary`` the count and the kinds, for the console's overview;
``_pages`` a page of them, newest first, by page number on the list and
by keyset on the table (:func:`page_dead_letters`).
``websauna_tasks.deadletter``, this package's name before, still exports
the same names.
"""
from ..settings import DEADLETTER_QUEUE_KEY as DEADLETTER_QUEUE_KEY
from ..settings import DEFAULT_DEADLETTER_QUEUE as DEFAULT_DEADLETTER_QUEUE
from ._entries import HISTORY_HEADER, UNREADABLE_ENTRY, raw_message, read_entry, seen
from ._letters import (
    DeadLetters,
    NoDeadLetterStore,
    configure_deadletter,
    dead_letter,
    drop_dead_letter,
    get_dead_letters,
    list_dead_letters,
    prune_dead_letters,
    redis_broker_url,
    requeue_dead_letter,
)
from ._pages import BadCursor, LetterPage, page_dead_letters
from ._redis import RedisStore
from ._sql import SQLStore
from ._summary import DeadLetterSummary, count_dead_letters, summarize_dead_letters

__all__ = [
    "DeadLetters", "NoDeadLetterStore", "RedisStore", "SQLStore", "UNREADABLE_ENTRY", "configure_deadletter",
    "dead_letter", "drop_dead_letter", "get_dead_letters", "list_dead_letters", "prune_dead_letters",
    "raw_message", "read_entry", "seen", "HISTORY_HEADER",
    "DeadLetterSummary", "count_dead_letters", "summarize_dead_letters", "LetterPage", "page_dead_letters",
    "BadCursor",
    "redis_broker_url", "requeue_dead_letter",
    "DEADLETTER_QUEUE_KEY", "DEFAULT_DEADLETTER_QUEUE",
]
