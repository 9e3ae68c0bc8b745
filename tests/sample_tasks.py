"""Tasks used by the tests (scanned by tests/appfactory.py)."""
from sqlalchemy import text

from websauna_tasks import RetryableTransactionTask, ScheduleOnCommitTask, TransactionalTask, WebsaunaTask, task


@task(name="tests.record", base=ScheduleOnCommitTask, bind=True)
def record(self, value, table="ws_test_effects"):
    """Write one row in its own transaction: the visible effect of a run."""
    request = self.get_request()
    with request.tm:
        request.dbsession.execute(
            text(f"INSERT INTO {table} (task_id, value) VALUES (:id, :value)"),
            {"id": self.request.id, "value": str(value)},
        )
    return value


@task(name="tests.add")
def add(a, b):
    return a + b


@task(name="tests.transactional_insert", base=TransactionalTask, bind=True)
def transactional_insert(self, value, fail=False):
    request = self.get_request()
    request.dbsession.execute(text("INSERT INTO ws_test_effects (task_id, value) VALUES (:id, :value)"),
                              {"id": self.request.id, "value": str(value)})
    if fail:
        raise ValueError("asked to fail")
    return value


@task(name="tests.increment", base=RetryableTransactionTask, bind=True, retry_attempts=50)
def increment(self, counter_id):
    request = self.get_request()
    row = request.dbsession.execute(text("SELECT value FROM ws_test_counter WHERE id = :id"), {"id": counter_id}).one()
    request.dbsession.execute(text("UPDATE ws_test_counter SET value = :v WHERE id = :id"),
                              {"v": row.value + 1, "id": counter_id})
    return row.value + 1


@task(name="tests.route_url", base=WebsaunaTask, bind=True)
def route_url(self):
    return self.get_request().route_url("home")


@task(name="tests.boom", base=ScheduleOnCommitTask)
def boom():
    raise RuntimeError("boom from an eager task")
