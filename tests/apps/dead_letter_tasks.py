"""A task "deployed" later: a worker without this include refuses its messages as unknown.

Scanned when the test app's settings say ``tests.scan = tests.apps.dead_letter_tasks``,
so that the same INI with and without it is a worker before and after a deploy.
"""
from sqlalchemy import text

from websauna_tasks import task


@task(name="tests.revived", bind=True)
def revived(self, value):
    """Write one row (``ws_test_effects``) in its own transaction: the visible effect of a run."""
    request = self.get_request()
    with request.tm:
        request.dbsession.execute(text("INSERT INTO ws_test_effects (task_id, value) VALUES (:id, :value)"),
                                  {"id": self.request.id, "value": str(value)})
    return value

