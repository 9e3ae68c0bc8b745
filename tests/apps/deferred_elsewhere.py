"""Outside the allow-list of the defer tests: reachable only through @deferrable."""
from __future__ import annotations

from tests.apps.deferred_functions import record
from websauna_tasks import deferrable


@deferrable
def marked(value: str) -> str:
    return record(value, note="marked")


def unmarked(value: str) -> str:  # pragma: no cover - refused
    return record(value, note="unmarked")
