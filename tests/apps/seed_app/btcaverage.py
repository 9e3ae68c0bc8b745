"""The seed's ``trees.btcaverage.RedisConverter``: exchange rates kept in Redis.

``update()`` stands in for the call to BitcoinAverage: it stores fixed rates,
with the pid of the process that stored them, so a test sees which process ran it.
"""
from __future__ import annotations

import json
import os
import time
from decimal import Decimal

import redis

RATES_KEY = "seed_app:btcaverage:rates"
UPDATED_KEY = "seed_app:btcaverage:updated"
RATES = {"EUR": "24012.50", "USD": "26105.75"}


class RedisConverter:
    def __init__(self, redis: redis.Redis):
        self.redis = redis

    def update(self) -> None:
        self.redis.hset(RATES_KEY, mapping=RATES)
        self.redis.set(UPDATED_KEY, json.dumps({"pid": os.getpid(), "at": time.time()}))

    def convert(self, amount: Decimal, currency: str) -> Decimal:
        rate = self.redis.hget(RATES_KEY, currency)
        if rate is None:
            raise LookupError(f"no BTC rate for {currency}: update() has not run")
        return amount * Decimal(rate.decode("ascii"))
