"""Helpers of tests/test_outbox.py: outbox rows (the private servers are in tests/servers.py)."""
from __future__ import annotations

import sqlalchemy as sa


def outbox_rows(engine: sa.Engine, app_name: str | None = None) -> list:
    """(id, task_name, sent_at) of every outbox row (of ``app_name``), oldest first."""
    with engine.connect() as conn:
        if not sa.inspect(conn).has_table("websauna_tasks_outbox"):
            return []
        query = "SELECT id, task_name, sent_at FROM websauna_tasks_outbox"
        params = {}
        if app_name is not None:
            query += " WHERE app = :app"
            params["app"] = app_name
        return [tuple(row) for row in conn.execute(sa.text(query + " ORDER BY created_at"), params)]
