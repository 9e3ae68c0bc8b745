"""Tasks of tests/test_cancel.py: a run that stops when cancelled."""
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
