"""Where the benchmark finds its services, and the names private to one run.

Both apps (``bench.raw_app`` and ``bench.ws_app``) and their worker
subprocesses read the same environment, set by ``bench/run.py``, so the two
sides always talk to the same Redis with the same serializer.
"""
from __future__ import annotations

import os

#: Redis used as the broker by both sides (a private queue name per run).
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")
#: A PostgreSQL database in which the run creates (and drops) its own database.
DATABASE_URL = os.environ.get("BENCH_DATABASE_URL", "postgresql+psycopg://root@127.0.0.1:5432/test")

# Set by run.py for the apps it starts; the defaults only matter when an
# app module is imported by hand.
QUEUE_ENV = "BENCH_QUEUE"
BROKER_ENV = "BENCH_BROKER_URL"
#: The private database of the run, for the raw worker's SQL task.
DATABASE_ENV = "BENCH_RUN_DATABASE_URL"


def broker_url() -> str:
    return os.environ.get(BROKER_ENV, REDIS_URL)


def queue_name() -> str:
    return os.environ.get(QUEUE_ENV, "bench-unset")


def celery_config(queue: str | None = None) -> dict:
    """Celery settings shared by both sides: only what must be equal for a fair comparison."""
    return {
        "broker_url": broker_url(),
        "task_default_queue": queue or queue_name(),
        "task_serializer": "json",
        "accept_content": ["json"],
        # No pidbox bindings left behind in a shared Redis; no effect on throughput.
        "worker_enable_remote_control": False,
        "broker_connection_retry_on_startup": True,
    }
