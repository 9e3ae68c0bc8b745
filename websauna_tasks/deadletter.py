"""The dead letters' name before they became a package: ``websauna_tasks.deadletters`` (docs/bad_input.md).

Everything this module offered is still importable from here; new code
imports ``websauna_tasks.deadletters``.
"""
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
