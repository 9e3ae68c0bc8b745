"""The seed's ``sms`` module: a stand-in for Twilio that records each message as a row.

The row is written with ``request.dbsession``, so it exists only if the sending
task's transaction commits: the test sees a sent SMS exactly when the run succeeded.
"""
from __future__ import annotations

import os
import typing as t

from celery import current_task
from pyramid.request import Request

from tests.apps.seed_app.models import Customer, SentSMS

TEMPLATES = {
    "drive/sms/review.txt": "Hi {customer.name}, how did delivery {delivery.id} go? Review it at {review_url}",
}


def send_templated_sms_to_user(request: Request, user: Customer, template: str, context: dict[str, t.Any]) -> str:
    body = TEMPLATES[template].format(**context)
    task_id = current_task.request.id if current_task else ""
    request.dbsession.add(SentSMS(phone_number=user.phone_number, body=body, task_id=task_id or "", pid=os.getpid()))
    return body
