"""Tasks of tests/test_claim_check.py: each run records what arguments it got (size and hash, not the bytes)."""
from __future__ import annotations

import hashlib
import json

from sqlalchemy import text

from websauna_tasks import ScheduleOnCommitTask, TransactionalTask, task


def describe(blob: str) -> str:
    """What a run records of its payload: its length and hash."""
    return f"{len(blob)}:{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def _record(task_self, blob: str, tag: str) -> None:
    request = task_self.request
    value = json.dumps({"tag": tag, "payload": describe(blob), "eta": request.eta, "retries": request.retries,
                        "queue": (request.delivery_info or {}).get("routing_key")})
    engine_request = task_self.get_request()
    with engine_request.tm:
        engine_request.dbsession.execute(text("INSERT INTO ws_test_effects (task_id, value) VALUES (:id, :value)"),
                                         {"id": request.id, "value": value})


@task(name="tests.claim.digest", base=ScheduleOnCommitTask, bind=True)
def digest(self, blob, *, tag=""):
    """Record the payload it was given."""
    _record(self, blob, tag)
    return len(blob)


@task(name="tests.claim.flaky", base=ScheduleOnCommitTask, bind=True, max_retries=5)
def flaky(self, blob, *, tag="", failures=2):
    """Fail ``failures`` times (each a Celery retry), then record the payload: every attempt must have it."""
    _record(self, blob, f"{tag}:attempt{self.request.retries}")
    if self.request.retries < failures:
        raise self.retry(countdown=0.2)
    return len(blob)


@task(name="tests.claim.idempotent", base=TransactionalTask, bind=True, idempotent=True)
def idempotent(self, blob, *, tag=""):
    """An idempotent run records its payload in its own transaction."""
    request = self.get_request()
    request.dbsession.execute(text("INSERT INTO ws_test_effects (task_id, value) VALUES (:id, :value)"),
                              {"id": self.request.id, "value": json.dumps({"tag": tag, "payload": describe(blob)})})
