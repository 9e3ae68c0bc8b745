"""Flower runs against the application's INI (``ws-celery INI -- flower``) and shows a real worker's tasks.

docs/running.md#flower says what to start and how; these tests start exactly
that: a worker with ``-E`` and Flower with basic auth, both from one INI,
and read a finished task back from Flower's HTTP API.

The worker, Flower and the sending app talk over event and control
exchanges named for this test alone: Flower broadcasts ``enable_events``
and ``inspect`` requests, which on the shared Redis database would
otherwise reach every other test run's workers.
"""
from __future__ import annotations

import base64
import json
import socket
import urllib.error
import urllib.request

import pytest

from tests.apps import sample_tasks
from tests.test_worker_request import worker_settings
from websauna_tasks.testing import wait_for

USER, PASSWORD = "u", "p"


@pytest.fixture
def settings(redis_url, database_url, queue_name, redis_client):
    # No result backend: what Flower shows comes from the worker's events alone.
    settings = worker_settings(redis_url, database_url, queue_name, results=False)
    celery = {
        "broker_url": redis_url,
        "task_default_queue": queue_name,
        "event_exchange": f"{queue_name}.ev",
        "control_exchange": f"{queue_name}.control",
        # The sender's own event: Flower then knows the task before a worker takes it.
        "task_send_sent_event": True,
    }
    settings["websauna.celery_config"] = repr(celery)
    yield settings
    for key in redis_client.scan_iter(match=f"*{queue_name}*"):
        redis_client.delete(key)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str, auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
    """Status and body of a GET; an HTTP error status is an answer too, not an exception."""
    request = urllib.request.Request(url)
    if auth is not None:
        token = base64.b64encode(":".join(auth).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        # Not listening yet (or any more).
        return 0, b""


def start_flower(ws_celery_worker_factory, ini: str):
    port = free_port()
    flower = ws_celery_worker_factory(ini, "flower", f"--port={port}", "--address=127.0.0.1",
                                      f"--basic-auth={USER}:{PASSWORD}", ready=None)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if flower.process.poll() is not None:
            raise AssertionError(f"flower exited with {flower.process.returncode}:\n{flower.output()[-4000:]}")
        return get(f"{base}/healthcheck", (USER, PASSWORD))[0] == 200

    wait_for(up, timeout=60, describe=lambda: flower.output()[-4000:])
    return flower, base


def test_flower_shows_a_finished_task_of_a_real_worker(settings, ini, make_app, ws_celery_worker_factory):
    worker = ws_celery_worker_factory(ini, "worker", "-E", "-P", "solo")
    flower, base = start_flower(ws_celery_worker_factory, ini)

    make_app(**settings)
    describe = lambda: f"flower:\n{flower.output()[-3000:]}\nworker:\n{worker.output()[-3000:]}"  # noqa: E731

    def finished(task_id: str) -> dict | None:
        status, body = get(f"{base}/api/task/info/{task_id}", (USER, PASSWORD))
        if status != 200:
            return None
        info = json.loads(body)
        return info if info.get("state") == "SUCCESS" else None

    # Flower answers HTTP before its event receiver has subscribed, and events sent before that are
    # gone (Redis pub/sub): probe until Flower has seen one task, then measure with a fresh one.
    for attempt in range(12):
        probe = sample_tasks.add.apply_async(args=("probe-", str(attempt)), tm=None)
        try:
            wait_for(lambda: finished(probe.id), timeout=5)
            break
        except AssertionError:
            continue
    result = sample_tasks.add.apply_async(args=("flower-", "seen"), tm=None)
    info = wait_for(lambda: finished(result.id), timeout=60, describe=describe)
    assert info["name"] == "tests.add"
    # Flower keeps the repr the worker's task-succeeded event carried.
    assert info["result"] == repr("flower-seen")
    assert info["worker"].startswith("celery@")
    # task_send_sent_event: the sender's event reached Flower as well as the worker's.
    assert info["sent"] is not None and info["received"] is not None and info["succeeded"] is not None

    status, body = get(f"{base}/api/tasks", (USER, PASSWORD))
    assert status == 200 and result.id in json.loads(body)


def test_flower_api_refuses_requests_without_the_credentials(settings, ini, ws_celery_worker_factory):
    flower, base = start_flower(ws_celery_worker_factory, ini)
    for auth in (None, (USER, "wrong")):
        for path in ("/api/tasks", "/api/workers", "/"):
            status, _ = get(base + path, auth)
            assert status == 401, (path, auth, status)


def test_flower_help_through_ws_celery(write_ini, run_cli):
    # Unit tier: an in-memory broker, so only the hand-over to Flower's click command is checked.
    ini = write_ini({"websauna.celery_config": repr({"broker_url": "memory://"})})
    done = run_cli(ini, "flower", "--help")
    # Without Flower installed Celery answers "No such command 'flower'", status 2.
    assert done.returncode == 0, done.stderr
    assert "Web based tool for monitoring" in done.stdout, done.stdout
