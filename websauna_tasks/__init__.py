"""websauna_tasks: Celery tasks for Pyramid that are sent when the transaction commits.

The one entry point is :func:`includeme`::

    config.include("pyramid_tm")
    config.include("websauna_tasks")
    config.scan("myapp.tasks")
"""
from __future__ import annotations

from pyramid.config import Configurator
from pyramid.tweens import INGRESS

from ._version import __version__ as __version__
from .after_response import AFTER_RESPONSE_OVER, run_after_response
from .app import make_celery
from .cancel import cancel, cancel_name
from .claim_check import configure_claim_check, prune_stored_payloads
from .db import configure_dbsession
from .deadletters import (
    configure_deadletter,
    drop_dead_letter,
    list_dead_letters,
    prune_dead_letters,
    requeue_dead_letter,
)
from .defer import DeferNotAllowed, configure_allowed_modules, defer, defer_async, deferrable, run_deferred
from .events import TaskFinished
from .idempotency import configure_idempotency, prune_done
from .intake import configure_intake
from .iteration import defer_iteration_with_finalize, get_deferred_shard_index, iteration_progress, run_shard
from .names import AlreadyEnqueued, connect_run_signals
from .observability.configure import configure_observability
from .outages import configure_outages
from .outbox import configure_outbox
from .payload import PayloadTooLarge, configure_payload_limit
from .progress import TaskProgress, task_progress
from .queues import QueueConfig, UndeclaredQueue, backoff_seconds, configure_queues, get_queues
from .redis_client import get_redis
from .registry import get_celery, set_celery
from .reliability import VisibilityTimeoutExceeded
from .request import TRANSACTION_MANAGER_ALIAS, get_current_request
from .retry import retryable
from .schema_check import configure_schema_check
from .secrets import configure_secrets, get_secrets
from .settings import TaskSettings, configure_settings, get_task_settings
from .state import AppState, attach_state
from .tasks import (
    RetryableTransactionTask,
    ScheduleOnCommitTask,
    TransactionalTask,
    WebsaunaTask,
    task,
)

__all__ = [
    "includeme",
    "get_celery",
    "task",
    "WebsaunaTask",
    "ScheduleOnCommitTask",
    "TransactionalTask",
    "RetryableTransactionTask",
    "retryable",
    "run_after_response",
    "defer_iteration_with_finalize",
    "get_deferred_shard_index",
    "iteration_progress",
    "defer",
    "defer_async",
    "deferrable",
    "DeferNotAllowed",
    "AlreadyEnqueued",
    "get_current_request",
    "UndeclaredQueue",
    "QueueConfig",
    "get_queues",
    "backoff_seconds",
    "prune_done",
    "prune_stored_payloads",
    "VisibilityTimeoutExceeded",
    "PayloadTooLarge",
    "TaskSettings",
    "get_task_settings",
    "list_dead_letters",
    "requeue_dead_letter",
    "drop_dead_letter",
    "prune_dead_letters",
    "get_redis",
    "get_secrets",
    "TaskFinished",
    "cancel",
    "cancel_name",
    "task_progress",
    "TaskProgress",
]


def includeme(config: Configurator) -> None:
    """Build the application's Celery app from its settings.

    - parses ``websauna.celery_config`` (safely, never evaluated) and the
      flat ``celery.*`` keys into one Celery configuration;
    - stores the app on the registry (:func:`get_celery`) and as
      ``request.celery``;
    - sets up ``request.dbsession`` from ``sqlalchemy.*`` settings, joined to
      ``request.tm``;
    - in eager mode, adds a tween that raises a failed eager task's error
      after the commit instead of losing it in the transaction's hook.

    The app is registered immediately (not as a deferred action) so that a
    ``config.scan()`` right after the include can bind tasks to it.
    """
    # Every websauna_tasks.* setting is parsed and checked here, once (settings.py).
    task_settings = configure_settings(config)
    app = make_celery(dict(task_settings.celery_config), name=task_settings.app_name)
    attach_state(app, AppState(registry=config.registry, settings=task_settings))  # one per app (state.py)
    configure_secrets(config.registry, app)  # websauna.secrets_file, read once (secrets.py)
    configure_queues(config.registry, app)
    configure_payload_limit(config.registry, app)  # websauna_tasks.max_payload_bytes (payload.py)
    configure_deadletter(config.registry, app)  # where refused messages are kept (deadletters/)
    configure_intake(config.registry, app)  # worker: every message checked before it runs (intake.py)
    configure_idempotency(config.registry, app)  # workers prune websauna_tasks_done (idempotency.py)
    configure_outages(task_settings, app)  # a run that lost its database is sent again later (outages.py)
    set_celery(config.registry, app)
    config.add_request_method(lambda request: get_celery(request.registry), "celery", reify=True)
    # Websauna's name for request.tm (pyramid_tm has none), on web and task requests.
    config.add_request_method(TRANSACTION_MANAGER_ALIAS, "transaction_manager", property=True)
    configure_dbsession(config)
    configure_claim_check(config.registry, app)  # large arguments stored as rows, a reference sent (claim_check.py)
    config.add_tween("websauna_tasks.after_response.after_response_tween_factory",
                     under=INGRESS, over=AFTER_RESPONSE_OVER)
    root = config.root_package
    configure_allowed_modules(config.registry, root.__name__.partition(".")[0] if root is not None else None)
    run_deferred.bind_to_app(app)
    run_shard.bind_to_app(app)  # sharded iteration's task (websauna_tasks.iteration)
    connect_run_signals()
    configure_outbox(config.registry, app)  # websauna_tasks.outbox = true: messages as rows (outbox/)
    configure_schema_check(config, app)  # create_tables = never: make_wsgi_app() checks the tables (schema_check.py)
    configure_observability(config, app)  # metrics and tracing, when the settings ask (observability/)
    if app.conf.task_always_eager:
        config.add_tween("websauna_tasks.tweens.eager_errors_tween_factory", under=INGRESS)
