"""Tasks of tests/test_cancel.py and tests/test_progress.py: a run that stops when cancelled, one that reports."""
from __future__ import annotations

import time

from websauna_tasks import WebsaunaTask, get_redis, task


@task(name="tests.cancel.until_cancelled", base=WebsaunaTask, bind=True)
def until_cancelled(self, started_key: str, limit: float = 60.0) -> str:
    """Say it started, then poll ``is_cancelled`` (bounded) and stop cooperatively."""
    get_redis(self.get_request()).set(started_key, "1", ex=300)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if self.is_cancelled():
            return "stopped"
        time.sleep(0.05)
    return "never cancelled"


@task(name="tests.progress.count", base=WebsaunaTask, bind=True)
def count(self, items: int, gate_key: str = "", limit: float = 60.0) -> int:
    """Report every item, then hold the last figures until ``gate_key`` is set; the number of writes."""
    written = 0
    for done in range(items + 1):
        written += bool(self.set_progress(done, items, note=f"item {done}"))
    if gate_key:
        client = get_redis(self.get_request())
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and not client.exists(gate_key):
            time.sleep(0.02)
    return written


@task(name="tests.progress.stall", base=WebsaunaTask, bind=True)
def stall(self, gate_key: str = "", limit: float = 60.0) -> str:
    """Write one figure, report a second within the throttle's interval, then stall until ``gate_key`` is set."""
    assert self.set_progress(0, 10, note="written")
    assert not self.set_progress(1, 10, note="held")
    if gate_key:
        client = get_redis(self.get_request())
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and not client.exists(gate_key):
            time.sleep(0.02)
    return "done"
