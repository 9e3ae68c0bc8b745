"""Tasks declared periodic in code, scanned only by tests.apps.extra_apps.periodic_main (and tests/test_periodic.py)."""
from datetime import timedelta

from sqlalchemy import text

from websauna_tasks import TransactionalTask, task


@task(name="tests.periodic.tick", base=TransactionalTask, bind=True, periodic=timedelta(seconds=1),
      periodic_args=("tick",), periodic_options={"expires": 5})
def tick(self, value):
    """Every second under a real beat: one committed row per run."""
    self.get_request().dbsession.execute(
        text("INSERT INTO ws_test_effects (task_id, value) VALUES (:id, :value)"),
        {"id": self.request.id, "value": value},
    )
    return value


@task(name="tests.periodic.weekly_report", periodic="15 3 * * mon", periodic_kwargs={"kind": "weekly"},
      periodic_options={"expires": 3600, "priority": 3})
def weekly_report(kind="daily"):
    """A cron string; harmless if beat happens to fire it during a test (Monday 03:15)."""
    return kind


@task(periodic=90)
def every_ninety_seconds():
    """A number of seconds, and the name Celery derives from the module."""
    return "ninety"
