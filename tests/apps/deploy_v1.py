"""Release 1 of an app's tasks, for tests/test_rolling_deploys.py: ``tests.deploy.a(x)``, no ``tests.deploy.b``.

Scanned when the test app's settings say ``tests.scan = tests.apps.deploy_v1``;
deploy_v2.py is the next release of the same task names.
"""
from sqlalchemy import text

from websauna_tasks import task


def record(task_self, value: str) -> None:
    """One row of ``ws_test_effects`` per run, committed with the run: what a test counts."""
    request = task_self.get_request()
    with request.tm:
        request.dbsession.execute(text("INSERT INTO ws_test_effects (task_id, value) VALUES (:id, :value)"),
                                  {"id": task_self.request.id, "value": value})


@task(name="tests.deploy.a", bind=True)
def a(self, x):
    record(self, f"v1:a:{x}")
