"""The differences docs/migrating-from-websauna.md lists (issue 16, point 8), each with its one-line change.

Points 2 to 7 have their own files (test_websauna_compat.py, test_websauna_uris_and_redis.py,
test_task_finished_and_secrets.py, test_websauna_seed_examples.py); these are the rest: ``tm=None``,
``TypeError``, the safe parser, ``includeme``, ``bootstrap`` and INI includes.
"""
from __future__ import annotations

import datetime as dt
import pathlib
import re
import textwrap

import pytest
import transaction
from pyramid.exceptions import ConfigurationError
from pyramid.paster import bootstrap, get_appsettings
from sqlalchemy import text

import websauna_tasks
from tests.apps import sample_tasks
from tests.conftest import include_in_memory
from websauna_tasks import get_celery
from websauna_tasks.cli import load_celery

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "migrating-from-websauna.md"

#: The seed's INI block (seed 002, "Setting schedule"), as written there, Python comments included.
SEED_CELERY_CONFIG = """\
    {
        "broker_url": "memory://",
        "accept_content": ['json'],
        "beat_schedule": {
            # config.scan() scans a Python module
            # and picks up a celery task named test_task
            "update_conversion_rates": {
                "task": "update_conversion_rates",
                # Run every 30 minutes
                "schedule": timedelta(minutes=30)
            }
        }
    }"""


def write_ini(path: pathlib.Path, body: str) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(body))
    return path


def test_the_page_has_a_section_for_every_difference_the_issue_lists():
    headings = re.findall(r"^## (.+)$", DOC.read_text(), re.MULTILINE)
    wanted = ["self.request.request", "request.transaction_manager", "request.dbsession", "retryable(tm=...)",
              "ws://", "get_redis(request)", "TaskFinished", "Secrets", "INI includes", "tm=None",
              "never evaluated", "Initializer", "init_websauna", "seed's examples"]
    missing = [word for word in wanted if not any(word in heading for heading in headings)]
    assert not missing, f"docs/migrating-from-websauna.md has no section for {missing}"


# -- tm=None sends now; a missing tm is a TypeError ---------------------------------------------------------------

def test_missing_tm_is_a_type_error_not_a_runtime_error(built_apps, task_client):
    config = include_in_memory()
    config.scan("tests.apps.sample_tasks")
    built_apps.append(config.make_wsgi_app())
    with pytest.raises(TypeError, match=r"pass tm=request.tm") as caught:
        sample_tasks.record.apply_async(args=("x",))
    assert not isinstance(caught.value, RuntimeError)


def test_tm_none_sends_now_even_inside_a_transaction(built_apps, task_client):
    config = include_in_memory()
    config.scan("tests.apps.sample_tasks")
    built_apps.append(config.make_wsgi_app())
    manager = transaction.TransactionManager(explicit=True)
    with manager:
        sample_tasks.record.apply_async(args=("now",), tm=None)
        # Sent before the commit: it is in the client while the transaction is still open.
        assert [list(job.args) for job in task_client.jobs.values()] == [["now"]]


# -- the safe parser replaces eval ------------------------------------------------------------------------------------

def test_the_seeds_celery_config_block_reads_unchanged(built_apps):
    config = include_in_memory(**{"websauna.celery_config": SEED_CELERY_CONFIG})
    built_apps.append(config.make_wsgi_app())
    app = get_celery(config.registry)
    assert app.conf.accept_content == ["json"]
    entry = app.conf.beat_schedule["update_conversion_rates"]
    assert entry["task"] == "update_conversion_rates"
    assert entry["schedule"] == dt.timedelta(minutes=30)


@pytest.mark.parametrize(("expression", "node"), [
    ("datetime.timedelta(minutes=30)", "timedelta"),
    ("__import__('os').system('true')", "call"),
    ("[x for x in range(3)]", "not allowed"),
    ("open('/etc/passwd').read()", "call"),
])
def test_what_eval_took_and_the_parser_refuses_stops_startup(expression, node):
    source = "{'broker_url': 'memory://', 'beat_schedule': {'e': {'task': 't', 'schedule': %s}}}" % expression
    with pytest.raises(ConfigurationError, match=node):
        include_in_memory(**{"websauna.celery_config": source})


# -- Initializer -> includeme; init_websauna -> bootstrap ---------------------------------------------------------

def test_includeme_then_scan_is_the_initializers_configure_tasks(built_apps):
    config = include_in_memory()
    config.scan("tests.apps.sample_tasks")
    built_apps.append(config.make_wsgi_app())
    assert sample_tasks.record.name in get_celery(config.registry).tasks
    assert websauna_tasks.includeme.__doc__


@pytest.mark.parametrize("prefix", ["", "ws://"])
def test_bootstrap_replaces_init_websauna(tmp_path, prefix):
    database = tmp_path / "app.sqlite"
    ini = write_ini(tmp_path / "conf" / "production.ini", f"""\
        [app:main]
        use = call:tests.apps.testapp:main
        sqlalchemy.url = sqlite:///{database}
        websauna.celery_config = {{"broker_url": "memory://"}}
        """)
    env = bootstrap(f"{prefix}{ini}")
    try:
        request = env["request"]
        assert request.celery is get_celery(request.registry)
        assert request.transaction_manager is request.tm
        with request.tm:
            assert request.dbsession.execute(text("SELECT 1 + 1")).scalar() == 2
    finally:
        env["closer"]()


# -- INI includes: PasteDeploy's use = config: ---------------------------------------------------------------------

@pytest.fixture
def included_ini(tmp_path) -> pathlib.Path:
    write_ini(tmp_path / "conf" / "base.ini", """\
        [app:main]
        use = call:tests.apps.testapp:main
        websauna.site_url = https://base.example.com
        websauna_tasks.retry_attempts = 7
        websauna.celery_config = {"broker_url": "memory://", "task_default_queue": "from-base"}
        """)
    return write_ini(tmp_path / "conf" / "production.ini", """\
        [app:main]
        use = config:base.ini#main
        websauna.site_url = https://production.example.com
        """)


def test_use_config_inherits_the_base_files_settings_and_overrides_them(included_ini):
    settings = get_appsettings(str(included_ini))
    assert settings["websauna.site_url"] == "https://production.example.com"
    assert settings["websauna_tasks.retry_attempts"] == "7"


@pytest.mark.parametrize("prefix", ["", "ws://"])
def test_ws_celery_and_bootstrap_load_an_including_file(included_ini, prefix):
    app = load_celery(f"{prefix}{included_ini}")
    assert app.conf.task_default_queue == "from-base"
    env = bootstrap(f"{prefix}{included_ini}")
    try:
        registry = env["registry"]
        assert websauna_tasks.get_task_settings(registry).retry_attempts == 7
        assert websauna_tasks.get_task_settings(registry).site_url == "https://production.example.com"
    finally:
        env["closer"]()


# -- Websauna's test_request fixture, as the page writes it -----------------------------------------------------

@pytest.fixture
def test_request(tmp_path):
    from tests.apps import events_app

    events_app.RECORDED.clear()
    ini = write_ini(tmp_path / "test.ini", """\
        [app:main]
        use = call:tests.apps.events_app:main
        websauna.celery_config = {"broker_url": "memory://", "task_always_eager": True}
        """)
    # The recipe of docs/migrating-from-websauna.md ("Websauna's test fixtures"):
    env = bootstrap(str(ini))
    env["request"].tm = transaction.manager
    yield env["request"]
    env["closer"]()
    events_app.RECORDED.clear()


def test_a_websauna_style_test_commits_with_the_thread_manager(test_request):
    from tests.apps import events_app

    with transaction.manager:
        events_app.succeeds.apply_async(args=(3,), tm=test_request.tm)
        assert events_app.RECORDED == []  # not before the commit
    assert [(event["state"], event["result"]) for event in events_app.RECORDED] == [("SUCCESS", 6)]
