"""docs/services.md and the README's brokers table: what they claim is what the code and the tests do.

- Queue limits need a Redis on every broker that is not Redis: the start is
  refused naming ``websauna_tasks.limits_redis_url``, and a Redis named
  there is enough (on RabbitMQ, with a real worker).
- Every "tested in CI" names tests that exist in this repository, and the
  README's table says the same as the docs' one.
"""
from __future__ import annotations

import ast
import pathlib
import re

import pytest
from pyramid.exceptions import ConfigurationError

ROOT = pathlib.Path(__file__).resolve().parent.parent
SERVICES = ROOT / "docs" / "services.md"

OTHER_BROKERS = ["amqp://guest:guest@127.0.0.1:5672//", "sqla+sqlite:///{tmp}/broker.sqlite", "memory://"]


@pytest.mark.parametrize("broker", OTHER_BROKERS, ids=["rabbitmq", "sqlite", "memory"])
def test_limits_without_a_redis_stop_the_start_naming_the_setting(make_app, tmp_path, broker):
    config = {"broker_url": broker.format(tmp=tmp_path)}
    queues = repr([{"name": "emails", "rate_per_second": 5, "max_concurrent": 2}])
    with pytest.raises(ConfigurationError) as caught:
        make_app(**{"websauna.celery_config": repr(config), "websauna_tasks.queues": queues})
    assert "websauna_tasks.limits_redis_url" in str(caught.value) and "'emails'" in str(caught.value)
    # Nothing connects at startup: a Redis named for the limits is all they need.
    make_app(**{"websauna.celery_config": repr(config), "websauna_tasks.queues": queues,
                "websauna_tasks.limits_redis_url": "redis://127.0.0.1:6379/15"})


def functions_of(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name.startswith("test")}


def test_every_test_the_services_page_names_exists():
    text = SERVICES.read_text()
    named = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", text)
    assert len(named) >= 10, named
    for path, function in named:
        assert (ROOT / path).is_file(), f"docs/services.md names {path}, which does not exist"
        if function:
            assert function in functions_of(ROOT / path), f"docs/services.md names {path}::{function}"


def table(text: str, first_header: str) -> dict[str, list[str]]:
    """The markdown table whose header row starts with ``first_header``: feature -> cells of the three brokers."""
    lines = text.splitlines()
    start = next(number for number, line in enumerate(lines) if line.startswith(first_header))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def ci(cells: list[str]) -> list[bool]:
    return [cell.startswith("tested in CI") for cell in cells]


def test_the_readme_and_the_services_page_claim_the_same():
    readme = table((ROOT / "README.md").read_text(), "| | Redis | RabbitMQ |")
    docs = table(SERVICES.read_text(), "| feature | Redis | RabbitMQ |")
    assert list(readme) == ["dispatch", "outbox", "limits (rate, concurrency)", "dead letters",
                            "remote control (`inspect`, `status`)", "results"]
    assert [ci(cells) for cells in readme.values()] == [ci(cells) for cells in docs.values()]


@pytest.mark.slow
def test_limits_hold_on_rabbitmq_with_limits_redis_url(rabbitmq_url, redis_url, database_url, db, queue_name,
                                                       tmp_path, ws_celery_worker_factory, subprocess_env):
    import redis
    from sqlalchemy import text

    from tests.apps import queue_tasks
    from tests.test_queues import make_queue_app, max_overlap, runs, wait_all, write_queue_ini

    with db.begin() as conn:
        conn.execute(text(f"DROP TABLE IF EXISTS {queue_tasks.RUNS_TABLE}"))
        conn.execute(text(queue_tasks.CREATE_RUNS_TABLE))
    queue = f"{queue_name}-limited"
    celery = {"broker_url": rabbitmq_url, "result_backend": "rpc://", "task_default_queue": f"{queue_name}-default"}
    settings = {"websauna.celery_config": repr(celery), "sqlalchemy.url": database_url,
                "websauna_tasks.queues": repr([{"name": queue, "max_concurrent": 1}]),
                "websauna_tasks.limits_redis_url": redis_url, "websauna_tasks.queue_wait_seconds": "0.3"}
    ini = write_queue_ini(tmp_path, settings)
    try:
        ws_celery_worker_factory(ini, "worker", "-l", "info", "-c", "3", "--without-gossip", "--without-mingle",
                                 env=subprocess_env)
        make_queue_app(settings)
        results = [queue_tasks.timed.apply_async((f"r{i}", 0.3), queue=queue, tm=None) for i in range(6)]
        assert sorted(wait_all(results, timeout=60)) == sorted(f"r{i}" for i in range(6))
        rows = [row for row in runs(db) if row["ended"] is not None]
        assert len(rows) == 6
        # Three processes, one slot in Redis: the runs on RabbitMQ never overlap.
        assert max_overlap([(row["started"], row["ended"]) for row in rows]) == 1
        assert max(row["ended"] for row in rows) - min(row["started"] for row in rows) >= 6 * 0.3 - 0.05
    finally:
        client = redis.Redis.from_url(redis_url)
        for key in client.scan_iter(match=f"*{queue_name}*", count=1000):
            client.delete(key)
        client.close()
