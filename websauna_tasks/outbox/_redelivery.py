"""Outbox rows of idempotent tasks that were sent but never finished are sent again.

Publishing a row is not the end of its journey. kombu's Redis transport
takes a message off the queue and records it as unacknowledged in a second
round trip: a Redis stop between the two loses it, although the broker had
accepted it and its row is marked sent (seen in tests/test_fault_redis_outage.py,
about one message in three outages). No publish-side care fixes that; only
the end result tells. For an idempotent task the end result is in the
database: its ``websauna_tasks_done`` row commits with its writes.

So the relay looks, every so often, for rows of idempotent tasks sent more
than ``websauna_tasks.outbox_redeliver_after_seconds`` ago (default 300) that
have no done-row, and publishes them again under the same task id: a copy
whose original did run finds the done-row and does nothing. Each row is
sent again at most ``websauna_tasks.outbox_redeliver_max`` times (default 3).

- Only idempotent tasks: for any other task a missing done-row says nothing,
  and a copy could repeat its writes.
- A run that fails for good (raises after its retries) has no done-row
  either; :meth:`Redeliverer.note_failed_run` marks its row so it is not
  sent again.
- Rows due later (countdown, ETA) are left alone until due plus the delay.
- Done-rows are pruned after their own retention: a row sent before that
  is never looked at, whatever the settings.
"""
from __future__ import annotations

import logging
import time
import typing as t

import sqlalchemy as sa

from ..idempotency import done_table
from ..idempotency import ensure_table as ensure_done_table
from ..reliability import read_eta
from ._table import load_column, outbox_table

if t.TYPE_CHECKING:
    from celery import Celery, Task

    from ..settings import TaskSettings

# The outbox's one logger, whichever of its modules speaks.
logger = logging.getLogger(__package__)


class RowPublisher(t.Protocol):
    """What redelivery needs of an app's outbox: its rows, and a way to publish them."""

    app: Celery
    batch_size: int

    @property
    def app_name(self) -> str: ...

    def relay_engine(self) -> sa.Engine: ...

    def publish_rows(self, rows: t.Sequence[t.Any]) -> None: ...


class Redeliverer:
    """Finds and re-sends an app's unfinished rows; one call of :meth:`run` is one round."""

    def __init__(self, outbox: RowPublisher, settings: TaskSettings):
        self.outbox = outbox
        self.after_seconds = settings.outbox_redeliver_after_seconds
        self.max_redeliveries = settings.outbox_redeliver_max
        self.done_retention = settings.idempotency_retention_seconds
        # The done-table is the idempotency module's: created as claim_run would create it.
        self.create_done_table = settings.create_tables == "auto" and settings.idempotency_create_table
        #: Rows sent again so far by this process.
        self.redelivered = 0

    @property
    def enabled(self) -> bool:
        return self.after_seconds > 0 and self.max_redeliveries > 0

    @property
    def interval(self) -> float:
        """How often a relay runs a round: often enough to act soon after a row becomes due."""
        return max(0.5, min(60.0, self.after_seconds / 4))

    def idempotent_task_names(self) -> list[str]:
        return sorted(name for name, task in self.outbox.app.tasks.items() if getattr(task, "idempotent", False))

    def run(self, now: float | None = None) -> int:
        """Send again the due unfinished rows (a batch at most); how many were sent."""
        names = self.idempotent_task_names()
        if not self.enabled or not names:
            return 0
        outbox = self.outbox
        engine = outbox.relay_engine()
        ensure_done_table(engine, self.create_done_table)
        now = time.time() if now is None else now
        table = outbox_table
        unfinished = ~sa.exists().where(done_table.c.task_id == table.c.id)
        query = (sa.select(table.c.id, table.c.task_name, table.c.args, table.c.kwargs, table.c.options,
                           table.c.sent_at)
                 .where(table.c.app == outbox.app_name, table.c.task_name.in_(names),
                        table.c.sent_at.is_not(None), table.c.sent_at < now - self.after_seconds,
                        # A done-row is younger than its row's publication; older ones may
                        # have been pruned, and their absence would mean nothing.
                        table.c.sent_at > now - self.done_retention,
                        table.c.redeliveries < self.max_redeliveries, unfinished)
                 .order_by(table.c.sent_at).limit(outbox.batch_size))
        if engine.dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True, of=table)
        with engine.connect() as conn, conn.begin():
            rows = [row for row in conn.execute(query).all()
                    if due_at(row, outbox.app) < now - self.after_seconds]
            if not rows:
                return 0
            outbox.publish_rows(rows)
            conn.execute(sa.update(table).where(table.c.id.in_([row.id for row in rows]))
                         .values(sent_at=now, redeliveries=table.c.redeliveries + 1))
        self.redelivered += len(rows)
        logger.warning("websauna_tasks outbox: sent %d message(s) again that were published over %gs ago and never "
                       "finished (no done-row), e.g. %s[%s]", len(rows), self.after_seconds, rows[0].task_name,
                       rows[0].id)
        return len(rows)

    def note_failed_run(self, task: Task, task_id: str) -> None:
        """A run of an idempotent task failed for good: its row (if any) is not to be sent again."""
        if not self.enabled or not getattr(task, "idempotent", False):
            return
        table = outbox_table
        try:
            with self.outbox.relay_engine().begin() as conn:
                conn.execute(sa.update(table).where(table.c.id == task_id)
                             .values(redeliveries=self.max_redeliveries))
        except Exception as exc:  # the failure itself is what matters; this only saves later copies
            logger.warning("%s[%s]: could not mark its outbox row as finished (%s: %s); it may be sent again",
                           task.name, task_id, type(exc).__name__, exc)


def due_at(row: t.Any, app: Celery | None = None) -> float:
    """When the row's message may first run: its publication, or later with a countdown (which counts from
    the publication) or an ETA (read as ``app``'s worker reads it)."""
    try:
        options = load_column(row.options)
    except ValueError:
        return row.sent_at
    countdown = options.get("countdown")
    if isinstance(countdown, (int, float)):
        return row.sent_at + countdown
    parsed = read_eta(app, options.get("eta"))
    if parsed is None:
        return row.sent_at
    return max(row.sent_at, parsed.timestamp())
