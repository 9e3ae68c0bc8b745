"""The peers of bench/peers.py: a Huey app and a Dramatiq broker, each on its own Redis database.

``huey_consumer bench.peer_apps.huey`` loads this module, so everything it
needs comes from the environment that peers.py sets: the run's private name
(Huey's queue name, Dramatiq's key namespace) and the Redis URLs. Huey and
Dramatiq are the ``bench`` extra (``pip install -e ".[bench]"``); nothing in
websauna_tasks imports them.
"""
from __future__ import annotations

import os
import time

import redis

from bench import settings


def peer_name() -> str:
    return os.environ.get(settings.PEER_NAME_ENV, "wsbench-unset")


def _mark_time(key: str) -> None:
    # The timing marks land in the Celery run's database, where peers.py polls for them.
    client = redis.Redis.from_url(settings.broker_url())
    client.set(key, repr(time.time()), ex=3600)
    client.close()


def _make_huey():
    from huey import RedisHuey

    # results=False: neither Celery side has a result backend either.
    return RedisHuey(peer_name(), results=False,
                     url=os.environ.get(settings.HUEY_URL_ENV, settings.redis_url_with_db(settings.REDIS_URL, 14)))


huey = _make_huey()


@huey.task(name="bench.huey.noop")
def huey_noop(index: int) -> None:
    """Nothing, as bench.raw.noop."""


@huey.task(name="bench.huey.mark")
def huey_mark(key: str) -> None:
    _mark_time(key)


def make_dramatiq_actor():
    """A RedisBroker under the run's namespace and a no-op actor on it (enqueue only: no Dramatiq worker)."""
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(url=os.environ.get(settings.DRAMATIQ_URL_ENV,
                                        settings.redis_url_with_db(settings.REDIS_URL, 13)),
                         namespace=peer_name())
    dramatiq.set_broker(broker)

    def dramatiq_noop(index: int) -> None:
        """Nothing."""

    actor = dramatiq.actor(dramatiq_noop, actor_name="bench_dramatiq_noop", queue_name="bench",
                           broker=broker)
    return broker, actor
