"""Websauna's ``ws://`` config URIs (config_uri.py, cli.py) and ``get_redis(request)`` (redis_client.py)."""
from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap
import threading
import urllib.request

import plaster
import pytest
import redis
from pyramid.config import Configurator
from pyramid.exceptions import ConfigurationError
from pyramid.paster import get_app, get_appsettings
from pyramid.registry import Registry
from pyramid.request import Request

from tests.conftest import include_in_memory
from websauna_tasks import get_celery, get_redis
from websauna_tasks.config_uri import Loader, config_file, is_ws_uri
from websauna_tasks.request import task_request
from websauna_tasks.state import app_state
from websauna_tasks.testing import wait_for

ROOT = pathlib.Path(__file__).resolve().parent.parent
BIN = pathlib.Path(sys.executable).parent


def write_app_ini(path: pathlib.Path, *, marker: str = "plain", broker: str = "memory://",
                  app: str = "tests.apps.testapp", extra: str = "") -> pathlib.Path:
    """An INI of ``app`` with ``websauna.site_url`` carrying ``marker``, so a test sees which file was read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(f"""\
        [app:main]
        use = call:{app}:main
        websauna.site_url = https://{marker}.example.com
        websauna.celery_config = {{"broker_url": "{broker}"}}
        """) + textwrap.dedent(extra))
    return path


def site_url(router) -> str:
    return router.registry.settings["websauna.site_url"]


# -- the URI and the file it names ---------------------------------------------------------------------------

@pytest.mark.parametrize(("uri", "expected"), [
    ("ws://conf/production.ini", "conf/production.ini"),
    ("ws://conf/production.ini#myapp", "conf/production.ini"),
    ("ws://conf/production.ini?http_port=8080", "conf/production.ini"),
    ("ws+file://conf/production.ini", "conf/production.ini"),
    ("ws:///srv/app/production.ini", "/srv/app/production.ini"),
    ("WS://conf/production.ini", "conf/production.ini"),
    ("conf/production.ini#myapp", "conf/production.ini"),
    ("/srv/app/production.ini", "/srv/app/production.ini"),
    ("ws://", ""),
])
def test_config_file_is_the_path_a_uri_names(uri, expected):
    assert config_file(uri) == expected


@pytest.mark.parametrize(("uri", "expected"), [
    ("ws://a.ini", True), ("ws+file://a.ini", True), ("Ws+File://a.ini", True), ("websauna-tasks+ws://a.ini", True),
    ("a.ini", False), ("/ws://a.ini", False), ("wss://a.ini", False), ("file+ini://a.ini", False),
    ("egg:myapp", False),
])
def test_which_uris_are_websaunas(uri, expected):
    assert is_ws_uri(uri) is expected


# -- plaster, as pserve and pyramid.paster use it ----------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["ws", "ws+file", "websauna-tasks+ws", "websauna-tasks+ws+file"])
def test_plaster_finds_our_loader_for_the_schemes(scheme):
    # Found through the installed entry points: fails if pyproject.toml does not register them.
    for protocols in (None, ["wsgi"]):
        loader = plaster.get_loader(f"{scheme}://conf/production.ini", protocols=protocols)
        assert isinstance(loader, Loader)


def test_get_app_from_a_relative_ws_uri(tmp_path, monkeypatch):
    write_app_ini(tmp_path / "conf" / "production.ini", marker="relative")
    write_app_ini(tmp_path / "production.ini", marker="wrong-file")  # what ws:// must not mean
    monkeypatch.chdir(tmp_path)
    assert site_url(get_app("ws://conf/production.ini")) == "https://relative.example.com"
    assert get_appsettings("ws://conf/production.ini")["websauna.site_url"] == "https://relative.example.com"


def test_get_app_from_an_absolute_ws_file_uri(tmp_path):
    ini = write_app_ini(tmp_path / "conf" / "production.ini", marker="absolute")
    assert site_url(get_app(f"ws+file://{ini}")) == "https://absolute.example.com"
    assert site_url(get_app(f"ws://{ini}")) == "https://absolute.example.com"


def test_section_defaults_and_here_mean_what_they_mean_for_a_plain_path(tmp_path):
    ini = write_app_ini(tmp_path / "production.ini", marker="main", extra="""\
        [app:other]
        use = call:tests.apps.testapp:main
        websauna.site_url = https://%(tenant)s.example.com
        websauna.celery_config = {"broker_url": "memory://"}
        where = %(here)s
        """)
    for uri in (f"ws://{ini}?tenant=acme#other", f"{ini}?tenant=acme#other"):
        router = get_app(uri)
        assert site_url(router) == "https://acme.example.com", uri
        assert router.registry.settings["where"] == str(tmp_path), uri


def test_a_missing_file_fails_as_it_does_for_a_plain_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    errors = []
    for uri in ("conf/missing.ini", "ws://conf/missing.ini"):
        with pytest.raises(Exception) as caught:
            get_app(uri)
        errors.append(caught.value)
    plain, ws = errors
    assert type(ws) is type(plain)
    assert str(ws) == str(plain) and "missing.ini" in str(ws)


def test_a_ws_uri_without_a_path_is_refused():
    with pytest.raises(plaster.InvalidURI, match="names no INI file"):
        plaster.get_loader("ws://", protocols=["wsgi"])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_pserve_serves_the_app_of_a_ws_uri(tmp_path, subprocess_env):
    port = free_port()
    write_app_ini(tmp_path / "conf" / "app.ini", marker="served", extra=f"""\
        [server:main]
        use = egg:waitress#main
        listen = 127.0.0.1:{port}
        """)
    log = open(tmp_path / "pserve.log", "wb")
    process = subprocess.Popen([str(BIN / "pserve"), "ws://conf/app.ini"], cwd=tmp_path, stdout=log,
                               stderr=subprocess.STDOUT, env={**os.environ, **subprocess_env})

    def home() -> str | None:
        assert process.poll() is None, (tmp_path / "pserve.log").read_text()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
                return response.read().decode()
        except OSError:
            return None

    try:
        assert wait_for(home, timeout=30) == "home"
    finally:
        process.terminate()
        process.wait(30)
        log.close()


# -- ws-celery -------------------------------------------------------------------------------------------------

def ws_celery(*args: str, cwd: pathlib.Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    script = BIN / "ws-celery"
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "websauna_tasks.cli"]
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=60, cwd=cwd,
                          env={**os.environ, **env})


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stdout == "" and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_ws_celery_reads_the_ini_of_a_ws_file_uri(tmp_path, subprocess_env):
    ini = tmp_path / "conf" / "app.ini"
    ini.parent.mkdir()
    ini.write_text(textwrap.dedent("""\
        [app:main]
        use = call:tests.apps.testapp:main
        websauna.celery_config = {"broker_url": "memory://", "task_default_queue": "read-from-the-ws-uri"}
        """))
    for uri in (f"ws+file://{ini}", "ws://conf/app.ini", "websauna-tasks+ws://conf/app.ini"):
        result = ws_celery(uri, "--", "report", cwd=tmp_path, env=subprocess_env)
        assert result.returncode == 0, result.stderr
        assert "read-from-the-ws-uri" in result.stdout, uri


def test_ws_celery_with_a_missing_ws_file_names_the_path(tmp_path, subprocess_env):
    for uri in ("ws://conf/missing.ini", "ws+file://conf/missing.ini#main"):
        line = one_line_error(ws_celery(uri, "--", "worker", cwd=tmp_path, env=subprocess_env))
        assert line == "ws-celery: INI file not found: conf/missing.ini", uri


def test_ws_celery_with_a_ws_uri_without_a_path(tmp_path, subprocess_env):
    line = one_line_error(ws_celery("ws://", "--", "worker", cwd=tmp_path, env=subprocess_env))
    assert line.startswith("ws-celery: ws:// names no INI file")


@pytest.mark.slow
def test_a_worker_started_from_a_relative_ws_uri_runs_tasks_each_child_with_its_own_redis(
        tmp_path, monkeypatch, redis_url, redis_client, queue_name, ws_celery_worker_factory, subprocess_env):
    config = {"broker_url": redis_url, "task_default_queue": queue_name, "control_exchange": f"{queue_name}-ctl"}
    ini = tmp_path / "conf" / "worker.ini"
    ini.parent.mkdir()
    ini.write_text(f"[app:main]\nuse = call:tests.apps.redis_app:main\nwebsauna.celery_config = {config!r}\n")
    monkeypatch.chdir(tmp_path)  # the worker inherits it: ws://conf/... is relative to it
    worker = ws_celery_worker_factory("ws://conf/worker.ini", "worker", "-c", "2", env=subprocess_env)

    key = f"{queue_name}.whose-redis"
    try:
        app = get_celery(get_app("ws://conf/worker.ini").registry)
        for _ in range(6):
            app.send_task("tests.redis_app.whose_redis", args=[key])
        reports = wait_for(lambda: redis_client.llen(key) == 6 and redis_client.lrange(key, 0, -1),
                           describe=worker.output)
    finally:
        redis_client.delete(key)
    runs = [json.loads(report) for report in reports]
    assert {run["parent_pid"] for run in runs} == {worker.pid}  # the main process made one before forking
    assert all(run["pid"] != worker.pid for run in runs)
    assert not any(run["parents_client"] for run in runs), runs
    assert all(run["same_twice"] for run in runs), runs


# -- get_redis -------------------------------------------------------------------------------------------------

def connection(client: redis.Redis) -> dict:
    return client.connection_pool.connection_kwargs


def with_broker(broker_url) -> Configurator:
    config = Configurator(settings={"websauna.celery_config": repr({"broker_url": broker_url})})
    config.include("pyramid_tm")
    config.include("websauna_tasks")
    return config


def test_the_setting_names_the_redis():
    config = include_in_memory(**{"websauna_tasks.redis_url": "redis://cache.invalid:6380/4"})
    kwargs = connection(get_redis(config.registry))
    assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("cache.invalid", 6380, 4)


@pytest.mark.parametrize("broker", ["redis://broker.invalid:6390/3",
                                    "redis://broker.invalid:6390/3;redis://other.invalid:6391/5",
                                    ["redis://broker.invalid:6390/3", "redis://other.invalid:6391/5"]])
def test_the_default_is_the_brokers_redis(broker):
    kwargs = connection(get_redis(with_broker(broker).registry))
    assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("broker.invalid", 6390, 3)


def test_the_setting_wins_over_the_broker():
    config = Configurator(settings={"websauna.celery_config": repr({"broker_url": "redis://broker.invalid:6390/3"}),
                                    "websauna_tasks.redis_url": "redis://cache.invalid:6380/4"})
    config.include("pyramid_tm")
    config.include("websauna_tasks")
    assert connection(get_redis(config.registry))["host"] == "cache.invalid"


@pytest.mark.parametrize("broker", ["memory://", "amqp://guest@rabbit.invalid//"])
def test_no_redis_to_connect_to_is_a_configuration_error_naming_the_setting(broker):
    config = with_broker(broker)  # building the app is fine: only the call needs Redis
    with pytest.raises(ConfigurationError) as caught:
        get_redis(config.registry)
    message = str(caught.value)
    assert "websauna_tasks.redis_url" in message and broker.partition("://")[0] + "://" in message


def test_without_websauna_tasks_included():
    with pytest.raises(ConfigurationError, match=r"config.include\('websauna_tasks'\)"):
        get_redis(Registry("bare"))


def test_neither_a_request_nor_a_registry():
    with pytest.raises(TypeError, match="request or a registry"):
        get_redis(None)


def test_one_client_per_process_whatever_it_is_given():
    config = include_in_memory(**{"websauna_tasks.redis_url": "redis://cache.invalid:6380/4"})
    registry = config.registry
    client = get_redis(registry)
    web_request = Request.blank("/")
    web_request.registry = registry
    assert get_redis(web_request) is client
    assert get_redis(registry) is client
    with task_request(registry) as request:
        assert get_redis(request) is client
    assert app_state(get_celery(registry)).redis.client is client


def test_two_apps_have_their_own_clients():
    first = include_in_memory(**{"websauna_tasks.redis_url": "redis://one.invalid:6380/1"}).registry
    second = include_in_memory(**{"websauna_tasks.redis_url": "redis://two.invalid:6380/2"}).registry
    assert connection(get_redis(first))["host"] == "one.invalid"
    assert connection(get_redis(second))["host"] == "two.invalid"


def test_threads_racing_for_the_first_client_get_one():
    registry = include_in_memory(**{"websauna_tasks.redis_url": "redis://cache.invalid:6380/4"}).registry
    barrier = threading.Barrier(8)
    clients = []

    def first_call() -> None:
        barrier.wait()
        clients.append(get_redis(registry))

    threads = [threading.Thread(target=first_call) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(clients) == 8 and len({id(client) for client in clients}) == 1


def in_a_forked_child(body) -> str:
    """Run ``body()`` in a child made with os.fork(); what it returned (a str), or its error."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.close(read_end)
            answer = body()
        except BaseException as exc:  # reported to the parent, which fails the test
            answer, code = f"child raised {exc!r}", 1
        try:
            os.write(write_end, answer.encode())
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, answer
    return answer


def test_a_forked_child_gets_its_own_client_and_keeps_it():
    registry = include_in_memory(**{"websauna_tasks.redis_url": "redis://cache.invalid:6380/4"}).registry
    parents = get_redis(registry)

    def child() -> str:
        first = get_redis(registry)
        return json.dumps({"parents": first is parents, "same_twice": get_redis(registry) is first,
                           "host": connection(first)["host"]})

    assert json.loads(in_a_forked_child(child)) == {"parents": False, "same_twice": True, "host": "cache.invalid"}
    assert get_redis(registry) is parents  # the parent's own is untouched by the child's


def test_a_child_forked_while_another_thread_makes_the_client_is_not_stuck():
    # The parent's lock may be held at the moment of the fork; the child must not wait on it forever.
    import websauna_tasks.redis_client as redis_client_module

    registry = include_in_memory(**{"websauna_tasks.redis_url": "redis://cache.invalid:6380/4"}).registry

    def child() -> str:
        made = []
        # In a thread, so that a lock still held is a "stuck" answer rather than a test that hangs.
        thread = threading.Thread(target=lambda: made.append(get_redis(registry)), daemon=True)
        thread.start()
        thread.join(10)
        return "stuck" if thread.is_alive() else str(connection(made[0])["port"])

    with redis_client_module._lock:  # held by the test, as a thread busy making a client would hold it
        answer = in_a_forked_child(child)
    assert answer == "6380"


def test_the_brokers_redis_really_is_used(redis_url, redis_client, queue_name):
    registry = with_broker(redis_url).registry
    key = f"{queue_name}.get-redis"
    try:
        get_redis(registry).set(key, b"written through get_redis")
        assert redis_client.get(key) == b"written through get_redis"
    finally:
        redis_client.delete(key)


def test_a_forked_child_writes_through_its_own_connection(redis_url, redis_client, queue_name):
    registry = include_in_memory(**{"websauna_tasks.redis_url": redis_url}).registry
    parents = get_redis(registry)
    parents.ping()  # the parent holds an open connection when it forks
    key = f"{queue_name}.get-redis-child"

    def child() -> str:
        client = get_redis(registry)
        client.rpush(key, os.getpid())
        return "parents" if client is parents else "own"

    try:
        assert in_a_forked_child(child) == "own"
        assert len(redis_client.lrange(key, 0, -1)) == 1
        assert parents.ping()  # the child left the parent's connection usable
    finally:
        redis_client.delete(key)


# -- the setting's values ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "fragment"), [
    ("http://cache:6379/0", "expected a redis:// URL"),
    ("cache:6379", "expected a redis:// URL"),
    ("redis://cache:99999/0", "Port"),
    ("redis://cache:port/0", "Port"),
    ("redis://cache:6379/cache", "database number"),
    ("redis://cache:6379/0?db=x", "db"),
    ("redis://cache:6379/0?socket_timeout=soon", "socket_timeout"),
    ("redis://ca che:6379/0", "whitespace or control"),
    ("redis://cache:6379/0\x00", "whitespace or control"),
    ("redis://cache\n:6379/0", "whitespace or control"),
])
@pytest.mark.parametrize("key", ["websauna_tasks.redis_url", "websauna_tasks.limits_redis_url"])
def test_hostile_redis_urls_stop_the_application(key, raw, fragment):
    with pytest.raises(ConfigurationError) as caught:
        include_in_memory(**{key: raw})
    message = str(caught.value)
    assert message.startswith(f"{key}: ") and fragment in message, message


def test_a_password_in_a_refused_url_is_not_shown():
    with pytest.raises(ConfigurationError) as caught:
        include_in_memory(**{"websauna_tasks.redis_url": "redis://user:s3cret-pw@cache:99999/0"})
    assert "s3cret-pw" not in str(caught.value) and "user:**@cache" in str(caught.value)


@pytest.mark.parametrize("raw", [" redis://cache:6379/2 ", "rediss://cache:6380/0", "redis://:pw@cache",
                                 "unix:///run/redis.sock?db=3", "redis://cache/", "redis://cache:6379/0?socket_timeout=5"])
def test_ordinary_redis_urls_are_taken(raw):
    registry = include_in_memory(**{"websauna_tasks.redis_url": raw}).registry
    assert isinstance(get_redis(registry), redis.Redis)
