"""An app whose process makes and uses its get_redis() client at startup, before a worker forks.

tests/test_websauna_uris_and_redis.py runs it in a prefork worker: each
task run reports whether the client it got is the one its parent made.
"""
import json
import os

from pyramid.config import Configurator
from pyramid.events import ApplicationCreated

from websauna_tasks import WebsaunaTask, get_redis, task

#: The client the building process made (and used) at startup, and that process's pid.
PRE_FORK: dict = {}


def main(global_config, **settings):
    config = Configurator(settings=settings)
    config.include("pyramid_tm")
    config.include("websauna_tasks")
    config.scan("tests.apps.redis_app")
    config.add_subscriber(_connect_before_fork, ApplicationCreated)
    return config.make_wsgi_app()


def _connect_before_fork(event):
    client = get_redis(event.app.registry)
    client.ping()  # a real connection in the pool, inherited by every child
    PRE_FORK.update(pid=os.getpid(), client=client)


@task(name="tests.redis_app.whose_redis", base=WebsaunaTask, bind=True)
def whose_redis(self, key):
    request = self.get_request()
    client = get_redis(request)
    client.rpush(key, json.dumps({
        "pid": os.getpid(),
        "parent_pid": PRE_FORK.get("pid"),
        "parents_client": client is PRE_FORK.get("client"),
        "same_twice": get_redis(request) is client,
    }))
