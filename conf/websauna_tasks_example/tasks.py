"""The example's tasks, found by ``config.scan(".tasks")``."""
from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import func, select

from websauna_tasks import RetryableTransactionTask, ScheduleOnCommitTask, task

from .models import Heartbeat, Message, MessageStats, utcnow

logger = logging.getLogger(__name__)


@task(name="example.process_message", base=RetryableTransactionTask, bind=True)
def process_message(self: RetryableTransactionTask, message_id: int) -> str:
    """Mark a posted message processed, in the task's own transaction.

    It runs after the web request committed, so the row is always there.
    """
    request = self.get_request()
    message = request.dbsession.get(Message, message_id)
    if message is None:
        # Cannot happen when scheduled with tm=request.tm; say so if it does.
        raise LookupError(f"message {message_id} does not exist")
    message.shouted = message.text.upper()
    message.link = request.route_url("message", id=message_id)
    message.processed_by_task_id = self.request.id
    message.processed_at = utcnow()
    logger.info("processed message %d in task %s", message_id, self.request.id)
    return message.shouted


@task(name="example.heartbeat", base=RetryableTransactionTask, bind=True)
def heartbeat(self: RetryableTransactionTask) -> int:
    """The periodic task of the INI's ``beat_schedule``: count one beat."""
    dbsession = self.get_request().dbsession
    row = dbsession.get(Heartbeat, 1)
    if row is None:
        row = Heartbeat(id=1, beats=0)
        dbsession.add(row)
    row.beats += 1
    row.last_at = utcnow()
    row.last_task_id = self.request.id
    return row.beats


@task(name="example.fail_on_purpose", base=ScheduleOnCommitTask)
def fail_on_purpose() -> None:
    """Shows where a failing task's error goes: the error page in eager mode, the worker log otherwise."""
    raise RuntimeError("example.fail_on_purpose failed on purpose")


@task(name="example.count_messages", base=RetryableTransactionTask, bind=True,
      # Declared here, not in the INI: config.scan() adds it to beat_schedule. The expiry keeps
      # ticks from piling up in the queue while no worker runs.
      periodic=timedelta(seconds=10), periodic_options={"expires": 10})
async def count_messages(self: RetryableTransactionTask) -> dict[str, int]:
    """Count the messages every 10 seconds and store the figures.

    An ``async def`` body: it runs to its end on an event loop of its own, inside the task's
    transaction, and its return value (not a coroutine) is the task's result. A real one would
    ``await`` something here (an HTTP client); ``request.dbsession`` stays the usual synchronous session.
    """
    dbsession = self.get_request().dbsession
    messages = dbsession.scalar(select(func.count()).select_from(Message))
    processed = dbsession.scalar(
        select(func.count()).select_from(Message).where(Message.processed_at.is_not(None)))
    row = dbsession.get(MessageStats, 1)
    if row is None:
        row = MessageStats(id=1, runs=0)
        dbsession.add(row)
    row.runs += 1
    row.messages = messages
    row.processed = processed
    row.last_at = utcnow()
    row.last_task_id = self.request.id
    return {"messages": messages, "processed": processed}
