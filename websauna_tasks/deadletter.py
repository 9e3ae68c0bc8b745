"""The old name of :mod:`websauna_tasks.deadletters`, which has the docs: every name here is re-exported from it."""
from .deadletters import (
    DEADLETTER_QUEUE_KEY,
    DEFAULT_DEADLETTER_QUEUE,
    UNREADABLE_ENTRY,
    DeadLetters,
    NoDeadLetterStore,
    configure_deadletter,
    dead_letter,
    drop_dead_letter,
    get_dead_letters,
    list_dead_letters,
    prune_dead_letters,
    raw_message,
    requeue_dead_letter,
)

__all__ = [
    "DEADLETTER_QUEUE_KEY", "DEFAULT_DEADLETTER_QUEUE", "UNREADABLE_ENTRY", "DeadLetters", "NoDeadLetterStore",
    "configure_deadletter", "dead_letter", "drop_dead_letter", "get_dead_letters", "list_dead_letters",
    "prune_dead_letters", "raw_message", "requeue_dead_letter",
]
