"""Release 2 of deploy_v1.py's tasks: ``tests.deploy.a`` gains ``y`` with a default, ``tests.deploy.b`` is new."""
from sqlalchemy import text

from websauna_tasks import task


def record(task_self, value: str) -> None:
    """As deploy_v1.record: a module of its own, so that scanning it finds only release 2's tasks."""
    request = task_self.get_request()
    with request.tm:
        request.dbsession.execute(text("INSERT INTO ws_test_effects (task_id, value) VALUES (:id, :value)"),
                                  {"id": task_self.request.id, "value": value})


@task(name="tests.deploy.a", bind=True)
def a(self, x, y="default"):
    record(self, f"v2:a:{x}:{y}")


@task(name="tests.deploy.b", bind=True)
def b(self, x):
    record(self, f"v2:b:{x}")
