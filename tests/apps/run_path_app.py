"""Tasks for tests/test_run_path.py: what a run sees of its Celery context and its events."""
from __future__ import annotations

from celery import current_task
from pyramid.config import Configurator

from websauna_tasks import ScheduleOnCommitTask, task


def main(global_config: dict, **settings: str):
    config = Configurator(settings=settings)
    config.include("websauna_tasks")
    config.scan("tests.apps.run_path_app")
    return config.make_wsgi_app()


@task(base=ScheduleOnCommitTask, bind=True)
def nested(self, depth: int) -> dict:
    """Calls itself directly once: each level reports its own context and request, the outer one after the inner."""
    before = self.request.request
    inner = nested(depth - 1) if depth else None
    return {
        "depth": depth,
        "args": list(self.request.args),
        "id": self.request.id,
        "own_request": self.request.request is self.get_request(),
        "kept_request": self.request.request is before,
        "current": current_task._get_current_object() is self,
        "inner": inner,
    }


@task(base=ScheduleOnCommitTask, bind=True)
def sets_context(self) -> str:
    """Writes on its context, as a body may; the value is read back after the run (self.request is the run's)."""
    self.request.note = "set by the body"
    return self.request.id
