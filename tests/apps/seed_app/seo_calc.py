"""The seed's ``calc_asset_seo``: the "very long running function", here quick and observant.

It notes the PostgreSQL transaction it runs in (a ``SeoRun`` row, committed only
with that transaction) and what Celery told the run (queue, time limits), and
returns them as the data the seed stores in Redis.
"""
from __future__ import annotations

import os
import typing as t

from celery import current_task
from pyramid.request import Request
from sqlalchemy import text

from tests.apps.seed_app.models import Asset, SeoRun


def calc_asset_seo(request: Request, asset: Asset) -> dict[str, t.Any]:
    txid = request.dbsession.execute(text("SELECT txid_current()")).scalar_one()
    request.dbsession.add(SeoRun(asset_id=asset.id, txid=txid))
    context = current_task.request if current_task else None
    delivery_info = (getattr(context, "delivery_info", None) or {}) if context else {}
    return {
        "slug": asset.slug,
        "website": asset.other_data["website"],
        "txid": txid,
        "pid": os.getpid(),
        "routing_key": delivery_info.get("routing_key"),
        # Per-message limits as the worker received them, and the task's own.
        "message_timelimit": list(getattr(context, "timelimit", None) or ()),
        "task_limits": [current_task.time_limit, current_task.soft_time_limit] if current_task else None,
    }
