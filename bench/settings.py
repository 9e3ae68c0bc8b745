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


#: bench/peers.py: the run's private name (Huey's queue, Dramatiq's namespace) and the peers' Redis URLs.
PEER_NAME_ENV = "BENCH_PEER_NAME"
HUEY_URL_ENV = "BENCH_HUEY_URL"
DRAMATIQ_URL_ENV = "BENCH_DRAMATIQ_URL"


def redis_url_with_db(url: str, db: int) -> str:
    """The same Redis server as ``url`` with another database number, so that peers never share a keyspace."""
    base = url.split("?", 1)[0]
    head, _, tail = base.rpartition("/")
    if not tail.isdigit() or head.endswith("/"):  # redis://host:port with no database, or redis://host:port/
        head = base.rstrip("/")
    return f"{head}/{db}"


def own_rss_kib() -> int:
    """This process's resident set size (VmRSS), in KiB; Linux only, as the benchmark is."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")
