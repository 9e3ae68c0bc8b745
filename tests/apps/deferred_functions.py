"""Functions the defer() tests send to workers (tests/test_defer.py).

``os`` is imported on purpose: a forged message naming
``tests.apps.deferred_functions:os.system`` must still be refused.
"""
from __future__ import annotations

import json
import os  # noqa: F401 - see the module docstring

from sqlalchemy import text

from websauna_tasks import get_current_request


def record(value: str, note: str = "") -> str:
    """Write a row through the task request's dbsession; defer's transaction commits it."""
    request = get_current_request()
    report = {"value": value, "note": note, "pid": os.getpid(), "home": request.route_url("home"),
              "tm_explicit": request.tm.explicit}
    request.dbsession.execute(text("INSERT INTO ws_test_effects (task_id, value) VALUES (:id, :value)"),
                              {"id": value, "value": json.dumps(report)})
    return value.upper()


def record_then_fail(value: str) -> None:
    record(value)
    raise ValueError(f"{value}: asked to fail after writing")


class Jobs:
    @staticmethod
    def static_record(value: str) -> str:
        return record(value, note="staticmethod")

    @classmethod
    def class_record(cls, value: str) -> str:
        return record(value, note=f"classmethod of {cls.__name__}")

    def bound_record(self, value: str) -> str:  # pragma: no cover - refused at defer time
        return record(value)
