"""A stand-in for ``slackclient.SlackClient`` that records each API call in Redis instead of calling Slack.

The seed's slack.py makes one with the token from the secrets file; the call
is recorded with that token and the pid of the process that made it.
"""
from __future__ import annotations

import json
import os
import typing as t

from websauna_tasks import get_current_request, get_redis

CALLS_KEY = "seed_app:slack:calls"


class SlackClient:
    def __init__(self, token: str):
        self.token = token

    def api_call(self, method: str, **kwargs: t.Any) -> dict[str, t.Any]:
        call = {"token": self.token, "method": method, "kwargs": kwargs, "pid": os.getpid()}
        get_redis(get_current_request()).rpush(CALLS_KEY, json.dumps(call))
        return {"ok": True}
