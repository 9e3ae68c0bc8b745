"""Plain functions run later with ``websauna_tasks.defer()``: no ``@task``, no Celery app in sight.

``defer(count_words, message_id, ...)`` in ``views.py`` sends the function's path
(``websauna_tasks_example.deferred:count_words``) and its arguments as JSON. A worker runs it only
because this module is in the application's own package, the default of
``websauna_tasks.defer_allowed_modules``. It runs inside a transaction of its own that commits when it
returns, with a request of its own: ``websauna_tasks.get_current_request()``.
"""
from __future__ import annotations

import logging

from celery import current_task

import websauna_tasks

from .models import Message, WordCount, utcnow

logger = logging.getLogger(__name__)


def count_words(message_id: int) -> int:
    """Count the words of a message and store the count; the return value goes to the result backend."""
    request = websauna_tasks.get_current_request()
    dbsession = request.dbsession
    message = dbsession.get(Message, message_id)
    if message is None:
        raise LookupError(f"message {message_id} does not exist")
    row = dbsession.get(WordCount, message_id)
    if row is None:
        row = WordCount(message_id=message_id, runs=0)
        dbsession.add(row)
    row.words = len(message.text.split())
    row.runs += 1
    # The deferred call is one Celery task (websauna_tasks.deferred); this is its id.
    row.task_id = current_task.request.id
    row.counted_at = utcnow()
    logger.info("counted %d words in message %d in task %s", row.words, message_id, row.task_id)
    return row.words
