"""The example's tasks, found by ``config.scan(".tasks")``."""
from __future__ import annotations

import logging

from websauna_tasks import RetryableTransactionTask, ScheduleOnCommitTask, task

from .models import Heartbeat, Message, utcnow

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
