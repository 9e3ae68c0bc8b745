"""The operator console through WebTest (docs/console.md): every page and action, refusals, hostile input.

The app is tests/apps/console_app.py: the ``X-Test-User: operator`` header
holds the console's permission, anyone else is refused. The integration
tests run against this machine's Redis (broker, dead letters, name claims,
queue leases, the run log) and PostgreSQL (the outbox).
"""
from __future__ import annotations

import html
import json
import re
import uuid

import kombu
import pytest
from pyramid.config import Configurator
from pyramid.csrf import CookieCSRFStoragePolicy
from pyramid.exceptions import ConfigurationError
from webtest import TestApp

from tests.apps import sample_tasks
from tests.apps.console_app import TestUserPolicy
from tests.apps.console_app import main as console_main
from tests.test_layout import PACKAGE, imports
from websauna_tasks import get_celery
from websauna_tasks.console._common import Clock
from websauna_tasks.console.periodic import in_words
from websauna_tasks.deadletter import dead_letter, get_dead_letters, list_dead_letters

OPERATOR = {"X-Test-User": "operator"}
PAGES = ("/_tasks/", "/_tasks/dead-letters", "/_tasks/outbox", "/_tasks/outbox?show=redelivered", "/_tasks/tasks",
         "/_tasks/tasks/some-task-id", "/_tasks/periodic", "/_tasks/names")
ACTIONS = ("/_tasks/dead-letters/act", "/_tasks/outbox/send", "/_tasks/names/release", "/_tasks/names/cancel",
           "/_tasks/tasks/some-task-id/cancel")


def memory_settings(**extra: str) -> dict[str, str]:
    return {"websauna.celery_config": "{'broker_url': 'memory://', 'task_always_eager': True}", **extra}


def csrf_token(app: TestApp, path: str = "/_tasks/dead-letters") -> str:
    """The token the console's forms carry (CookieCSRFStoragePolicy: also set as a cookie on the TestApp)."""
    page = app.get(path, headers=OPERATOR)
    return re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1) if 'name="csrf_token"' in page.text \
        else app.cookies["csrf_token"]


# -- mounting: the guard --------------------------------------------------------------------------------------

def test_the_console_refuses_to_mount_without_a_security_policy():
    with pytest.raises(ConfigurationError, match="no security policy.*console_insecure"):
        console_main({}, **memory_settings(**{"tests.console_policy": "none"}))


def test_the_development_opt_out_mounts_it_open_with_a_banner_on_every_page():
    app = TestApp(console_main({}, **memory_settings(**{"tests.console_policy": "none",
                                                          "websauna_tasks.console_insecure": "true"})))
    for path in PAGES:
        page = app.get(path)
        assert "Open to anyone." in page.text and "console_insecure" in page.text, path


def test_with_a_policy_the_opt_out_changes_nothing():
    app = TestApp(console_main({}, **memory_settings(**{"websauna_tasks.console_insecure": "true"})))
    assert app.get("/_tasks/", expect_errors=True).status_int == 403
    assert "Open to anyone" not in app.get("/_tasks/", headers=OPERATOR).text


def test_a_csrf_token_with_nowhere_to_live_is_refused_at_startup():
    config = Configurator(settings=memory_settings())
    config.include("pyramid_tm")
    config.set_security_policy(TestUserPolicy())
    config.include("websauna_tasks.console")
    with pytest.raises(ConfigurationError, match="session factory.*CookieCSRFStoragePolicy"):
        config.make_wsgi_app()


def test_prefix_and_permission_are_settings():
    class OnlyReports(TestUserPolicy):
        def permits(self, request, context, permission):
            return permission == "reports.view"

    config = Configurator(settings=memory_settings(**{"websauna_tasks.console_prefix": "/ops/queue/",
                                                      "websauna_tasks.console_permission": "reports.view"}))
    config.set_security_policy(OnlyReports())
    config.set_csrf_storage_policy(CookieCSRFStoragePolicy())
    config.include("websauna_tasks.console")
    app = TestApp(config.make_wsgi_app())
    page = app.get("/ops/queue/periodic")
    assert 'href="/ops/queue/dead-letters"' in page.text and 'href="/ops/queue/static/console.css"' in page.text
    assert "font:" in app.get("/ops/queue/static/console.css").text
    assert app.get("/_tasks/", expect_errors=True).status_int == 404


def test_nothing_in_the_library_imports_the_console():
    importers = {importer for importer, imported, _name in imports(PACKAGE)
                 if imported.startswith("websauna_tasks.console") and not importer.startswith("websauna_tasks.console")}
    assert importers == set()


@pytest.mark.parametrize(("schedule", "words"), [
    (5, "every 5 seconds"), (3600, "every hour"), (90, "every 90 seconds"), ("*/5 * * * *", "every 5 minutes"),
    ("* * * * *", "every minute"), ("30 3 * * *", "daily at 03:30"), ("15 3 * * mon", "every Monday at 03:15"),
    ("7 * * * *", "every hour at minute 7"),
    ("0 9 1 * *", "cron 0 9 1 * * (minute hour day-of-month month day-of-week)"),
])
def test_schedules_in_words(schedule, words):
    from websauna_tasks.schedule import normalize_schedule

    assert in_words(normalize_schedule(schedule)) == words


# -- against Redis and PostgreSQL -----------------------------------------------------------------------------

@pytest.fixture
def console_settings(redis_url, database_url, queue_name, dead_key):
    celery = {"broker_url": redis_url, "task_default_queue": queue_name, "result_backend": redis_url,
              "beat_schedule": {"ini-heartbeat": {"task": "tests.add", "schedule": "*/5 * * * *", "args": (1, 2)}}}
    return {"websauna.celery_config": repr(celery), "sqlalchemy.url": database_url,
            "websauna_tasks.deadletter_queue": dead_key, "websauna_tasks.outbox": "true",
            "websauna_tasks.outbox_publish_on_commit": "false",
            "tests.scan": "tests.apps.sample_tasks tests.apps.periodic_tasks",
            # Name claims and the run log are kept per app name: this test's own.
            "websauna_tasks.app_name": f"console-{queue_name}"}


@pytest.fixture
def console(console_settings, redis_client, queue_name):
    router = console_main({}, **console_settings)
    yield TestApp(router), get_celery(router.registry), router
    celery = get_celery(router.registry)
    redis_client.delete(f"websauna_tasks:console:runs:{celery.main}")
    from websauna_tasks.db import get_engine

    get_engine(router.registry).dispose()


def make_dead_letter(celery, queue_name: str, task_name: str = "tests.no_such_task", args=(1,)) -> str:
    """A message sent, taken off its queue and dead-lettered as a worker without the task does."""
    task_id = celery.send_task(task_name, args=args, queue=queue_name).id
    with celery.connection_for_read() as connection:
        message = kombu.Queue(queue_name)(connection.default_channel).get(no_ack=True)
    assert message.headers["id"] == task_id
    dead_letter(get_dead_letters(celery), message, "unknown_task", KeyError(task_name))
    return task_id


def follow(app: TestApp, page, label: str):
    """The page the link reading ``label`` leads to, as the operator (WebTest's click() sends no headers)."""
    href = re.search(r'<a href="([^"]+)"[^>]*>' + re.escape(label) + "</a>", page.text).group(1)
    return app.get(html.unescape(href), headers=OPERATOR)


def letter_ids(celery) -> list[str]:
    return [entry["id"] for entry in list_dead_letters(celery)]


def test_every_page_and_action_refuses_anyone_without_the_permission(console):
    app, _celery, _router = console
    token = csrf_token(app)
    for path in PAGES + ("/_tasks/static/console.css",):
        assert app.get(path, expect_errors=True).status_int == 403, path
        assert app.get(path, headers={"X-Test-User": "visitor"}, expect_errors=True).status_int == 403, path
    for path in ACTIONS:
        response = app.post(path, {"csrf_token": token, "action": "drop", "id": "x", "name": "n", "task_id": "t"},
                            headers={"X-Test-User": "visitor"}, expect_errors=True)
        assert response.status_int == 403, path


def test_the_health_report_is_mounted_under_the_console_behind_its_permission(console):
    app, _celery, _router = console
    assert app.get("/_tasks/health", expect_errors=True).status_int == 403
    report = app.get("/_tasks/health?probe=liveness", headers=OPERATOR).json
    assert report["healthy"] is True and set(report["checks"]) >= {"broker", "database"}
    assert 'href="/_tasks/health"' in app.get("/_tasks/periodic", headers=OPERATOR).text


def test_every_page_renders_for_the_operator(console, queue_name):
    app, _celery, _router = console
    for path in PAGES:
        page = app.get(path, headers=OPERATOR)
        assert page.status_int == 200 and "<h1>" in page.text, path
    overview = app.get("/_tasks/", headers=OPERATOR).text
    assert f"<code>{queue_name}</code>" in overview and "No dead letters." in overview
    assert "Nothing waits to be sent." in app.get("/_tasks/outbox", headers=OPERATOR).text
    assert "No name is claimed." in app.get("/_tasks/names", headers=OPERATOR).text


def test_every_action_without_the_csrf_token_is_a_400_and_does_nothing(console, queue_name):
    app, celery, _router = console
    task_id = make_dead_letter(celery, queue_name)
    csrf_token(app)
    for path in ACTIONS:
        for form in ({"action": "drop", "id": task_id, "confirmed": "yes"},
                     {"action": "drop", "id": task_id, "confirmed": "yes", "csrf_token": "forged"}):
            response = app.post(path, {**form, "name": "n", "task_id": task_id}, headers=OPERATOR, expect_errors=True)
            assert response.status_int == 400, path
    assert letter_ids(celery) == [task_id]
    # GET is not an action.
    assert app.get("/_tasks/dead-letters/act", headers=OPERATOR, expect_errors=True).status_int == 404


def test_requeue_and_drop_one_at_a_time(console, queue_name, redis_client):
    app, celery, _router = console
    first, second = make_dead_letter(celery, queue_name), make_dead_letter(celery, queue_name)
    page = app.get("/_tasks/dead-letters", headers=OPERATOR)
    # Newest first, with the task, the reason and a requeue button each.
    assert page.text.index(second) < page.text.index(first)
    assert "unknown task &#39;tests.no_such_task&#39;" in page.text
    # WebTest ignores a button's formaction: the row buttons are clicked in a real browser (test_console_browser.py).
    assert f'name="id" value="{first}" class="requeue"' in page.text
    token = csrf_token(app)
    requeued = app.post("/_tasks/dead-letters/act?action=requeue", {"csrf_token": token, "id": first},
                        headers=OPERATOR)
    assert requeued.status_int == 303 and "requeued=1" in requeued.location
    assert "Requeued 1." in requeued.follow(headers=OPERATOR).text
    assert letter_ids(celery) == [second]
    assert [json.loads(raw)["headers"]["id"] for raw in redis_client.lrange(queue_name, 0, -1)] == [first]
    # A drop asks first, showing the letter, and does nothing until confirmed.
    asked = app.post("/_tasks/dead-letters/act?action=drop", {"csrf_token": token, "id": second}, headers=OPERATOR)
    assert asked.status_int == 200 and "Yes, drop" in asked.text and second in asked.text
    assert letter_ids(celery) == [second]
    dropped = asked.forms[0].submit(headers=OPERATOR)
    assert dropped.status_int == 303 and "dropped=1" in dropped.location
    assert letter_ids(celery) == []
    # The same again: it is gone, and the page says so rather than fail.
    again = app.post("/_tasks/dead-letters/act", {"csrf_token": token, "action": "drop", "ids": second,
                                                  "confirmed": "yes"}, headers=OPERATOR)
    assert "missing=1" in again.location
    assert "No dead letters" in app.get("/_tasks/dead-letters", headers=OPERATOR).text


def test_a_letter_requeued_and_dead_lettered_again_shows_first_and_last_seen(console, queue_name, redis_client):
    app, celery, _router = console
    task_id = make_dead_letter(celery, queue_name)
    first = list_dead_letters(celery)[0]
    assert (first["first_seen"], first["times"]) == (first["timestamp"], 1)
    page = app.get("/_tasks/dead-letters", headers=OPERATOR).text
    assert "first seen" in page and "dead-lettered" not in page
    requeued = app.post("/_tasks/dead-letters/act?action=requeue", {"csrf_token": csrf_token(app), "id": task_id},
                        headers=OPERATOR)
    assert "requeued=1" in requeued.location
    # The worker meets the message again and refuses it again, as its intake does: a new entry.
    with celery.connection_for_read() as connection:
        message = kombu.Queue(queue_name)(connection.default_channel).get(no_ack=True)
    assert message.headers["websauna_tasks_dead_lettered"] == {"first": first["timestamp"], "times": 1}
    dead_letter(get_dead_letters(celery), message, "unknown_task", KeyError("tests.no_such_task"))
    again = list_dead_letters(celery)[0]
    assert again["first_seen"] == first["timestamp"] < again["timestamp"] and again["times"] == 2
    row = app.get("/_tasks/dead-letters", headers=OPERATOR).text.split(f'data-id="{task_id}"')[1]
    shown = re.findall(r'<td class="(first|last)-seen"><time datetime="([^"]+)"', row)[:2]
    clock = Clock(celery.timezone)
    assert shown == [("first", clock.when(first["timestamp"])["iso"]), ("last", clock.when(again["timestamp"])["iso"])]
    assert "dead-lettered 2 times" in row


def test_bulk_requeue_and_drop_ask_for_confirmation(console, queue_name, redis_client):
    app, celery, _router = console
    ids = [make_dead_letter(celery, queue_name) for _ in range(4)]
    page = app.get("/_tasks/dead-letters", headers=OPERATOR)
    form = page.forms[0]
    for checkbox in form.fields["ids"]:
        if checkbox._value in ids[:2]:
            checkbox.checked = True
    asked = form.submit("action", value="requeue", headers=OPERATOR)
    assert "Requeue 2 dead letter(s)?" in asked.text
    assert letter_ids(celery) == ids
    done = asked.forms[0].submit(headers=OPERATOR)
    assert "requeued=2" in done.location
    assert letter_ids(celery) == ids[2:]
    assert redis_client.llen(queue_name) == 2
    asked = app.post("/_tasks/dead-letters/act", [("csrf_token", csrf_token(app)), ("action", "drop"),
                                                  ("ids", ids[2]), ("ids", ids[3])], headers=OPERATOR)
    assert "Drop 2 dead letter(s)?" in asked.text and "gone for good" in asked.text
    assert "dropped=2" in asked.forms[0].submit(headers=OPERATOR).location
    assert letter_ids(celery) == []


def test_forged_page_numbers_ids_and_actions(console, queue_name, dead_key, redis_client):
    app, celery, _router = console
    for _ in range(3):
        make_dead_letter(celery, queue_name)
    entry = redis_client.lindex(dead_key, 0)
    redis_client.rpush(dead_key, *([entry] * 120))  # 123 entries: three pages of 50
    for raw, shown in (("-5", 1), ("0", 1), ("2", 2), ("99999999999999999999", 3), ("3", 3)):
        page = app.get(f"/_tasks/dead-letters?page={raw}", headers=OPERATOR)
        assert f"page {shown} of 3" in page.text, raw
    # Keyset cursors belong to the table: on the Redis list they give the newest page.
    for query in ("before=5", "after=0"):
        assert "page 1 of 3" in app.get(f"/_tasks/dead-letters?{query}", headers=OPERATOR).text, query
    for raw in ("abc", "1e3", "１", "1.5", "9" * 5000, "%00"):
        assert app.get("/_tasks/dead-letters", {"page": raw}, headers=OPERATOR, expect_errors=True).status_int == 400
    token = csrf_token(app)
    for forged in ("<script>", "../../etc", "", "x" * 500, "a b"):
        response = app.post("/_tasks/dead-letters/act", {"csrf_token": token, "action": "drop", "ids": forged,
                                                         "confirmed": "yes"}, headers=OPERATOR, expect_errors=True)
        assert response.status_int == 400, forged
    for form in ({"action": "explode", "ids": "x"}, {"action": "drop"}):
        assert app.post("/_tasks/dead-letters/act", {"csrf_token": token, **form}, headers=OPERATOR,
                        expect_errors=True).status_int == 400
    too_many = [("csrf_token", token), ("action", "drop")] + [("ids", f"id-{n}") for n in range(201)]
    assert app.post("/_tasks/dead-letters/act", too_many, headers=OPERATOR, expect_errors=True).status_int == 400
    assert redis_client.llen(dead_key) == 123
    # A forged count in the redirect's query shows as a number or not at all.
    page = app.get("/_tasks/dead-letters?requeued=<b>x</b>&dropped=12", headers=OPERATOR)
    assert "Dropped 12." in page.text and "<b>x</b>" not in page.text
    assert app.get("/_tasks/tasks/<script>", headers=OPERATOR, expect_errors=True).status_int == 400
    assert app.get("/_tasks/tasks", {"id": "a\nb"}, headers=OPERATOR, expect_errors=True).status_int == 400
    assert app.get("/_tasks/outbox?show=all", headers=OPERATOR, expect_errors=True).status_int == 400


HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def test_markup_in_task_names_args_and_reasons_is_escaped(console, queue_name):
    app, celery, _router = console
    make_dead_letter(celery, queue_name, task_name=HOSTILE, args=(HOSTILE,))
    for path in ("/_tasks/dead-letters", "/_tasks/"):
        page = app.get(path, headers=OPERATOR).text
        assert "<script>" not in page and "<img" not in page, path
    page = app.get("/_tasks/dead-letters", headers=OPERATOR).text
    assert html.escape(HOSTILE)[:30] in page or "&lt;script&gt;" in page
    task_id = list_dead_letters(celery)[0]["id"]
    asked = app.post("/_tasks/dead-letters/act", {"csrf_token": csrf_token(app), "action": "drop", "ids": task_id},
                     headers=OPERATOR)
    assert "<script>" not in asked.text and "&lt;script&gt;" in asked.text


def test_outbox_rows_and_send_now(console, queue_name, redis_client):
    app, celery, router = console
    from websauna_tasks.request import task_request

    with task_request(router.registry) as request:
        with request.tm:
            first = sample_tasks.add.apply_async(args=(HOSTILE, 2), tm=request.tm)
            second = sample_tasks.add.apply_async(args=(3, 4), tm=request.tm)
    page = app.get("/_tasks/outbox", headers=OPERATOR)
    assert first.id in page.text and second.id in page.text and "<script>" not in page.text
    assert redis_client.llen(queue_name) == 0
    sent = page.forms[0].submit("id", index=[b._value for b in page.forms[0].fields["id"]].index(first.id),
                                headers=OPERATOR)
    assert sent.status_int == 303 and "sent=1" in sent.location
    assert [json.loads(raw)["headers"]["id"] for raw in redis_client.lrange(queue_name, 0, -1)] == [first.id]
    assert "Sent 1 row(s)" in sent.follow(headers=OPERATOR).text
    asked = app.post("/_tasks/outbox/send", {"csrf_token": csrf_token(app), "all": "yes"}, headers=OPERATOR)
    assert "Send all 1 unsent row(s) now?" in asked.text and redis_client.llen(queue_name) == 1
    assert "sent=1" in asked.forms[0].submit(headers=OPERATOR).location
    assert redis_client.llen(queue_name) == 2
    assert "Nothing waits to be sent." in app.get("/_tasks/outbox", headers=OPERATOR).text
    # A row already sent is not sent twice.
    again = app.post("/_tasks/outbox/send", {"csrf_token": csrf_token(app), "id": first.id}, headers=OPERATOR)
    assert "sent=0" in again.location and redis_client.llen(queue_name) == 2


def test_name_claims_are_listed_and_released_after_confirmation(console):
    app, celery, _router = console
    from websauna_tasks.names import claim_name

    name = f"report-{uuid.uuid4().hex[:8]}<b>"
    assert claim_name(celery, name, "task-1") is None
    page = app.get("/_tasks/names", headers=OPERATOR)
    assert html.escape(name) in page.text and "task-1" in page.text and "<b>" not in page.text
    asked = page.forms[0].submit(headers=OPERATOR)
    assert "Release this name?" in asked.text and claim_name(celery, name, "task-2") == "task-1"
    done = asked.forms[0].submit(headers=OPERATOR)
    assert "released=1" in done.location
    assert claim_name(celery, name, "task-3") is None
    # A release by a stale holder frees nothing.
    app.post("/_tasks/names/release", {"csrf_token": csrf_token(app), "name": name, "task_id": "task-1",
                                       "confirmed": "yes"}, headers=OPERATOR)
    assert claim_name(celery, name, "task-4") == "task-3"


def test_a_task_is_cancelled_from_its_page_after_confirmation(console):
    app, celery, router = console
    from websauna_tasks.cancel import is_cancelled

    task_id = f"console-{uuid.uuid4().hex}"
    page = app.get(f"/_tasks/tasks/{task_id}", headers=OPERATOR)
    assert "Cancel this task" in page.text and not is_cancelled(task_id, router.registry)
    form = next(form for form in page.forms.values() if form.action.endswith("/cancel"))
    asked = form.submit(headers=OPERATOR)
    assert "Cancel this task?" in asked.text and task_id in asked.text
    assert not is_cancelled(task_id, router.registry)  # asked, not done
    done = asked.forms[0].submit(headers=OPERATOR)
    assert done.status_int == 303 and "cancelled=1" in done.location and is_cancelled(task_id, router.registry)
    shown = done.follow(headers=OPERATOR).text
    assert "Cancelled: no worker will run it." in shown and "This task is cancelled" in shown
    assert "Cancel this task</button>" not in shown


def test_a_named_task_is_cancelled_from_the_names_page(console):
    app, celery, router = console
    from websauna_tasks.cancel import is_cancelled
    from websauna_tasks.names import claim_name

    name = f"cancel-me-{uuid.uuid4().hex[:8]}"
    holder = f"holder-{uuid.uuid4().hex}"
    assert claim_name(celery, name, holder) is None
    page = app.get("/_tasks/names", headers=OPERATOR)
    form = next(form for form in page.forms.values() if form.action.endswith("/names/cancel"))
    asked = form.submit(headers=OPERATOR)
    assert "Cancel this task?" in asked.text and not is_cancelled(holder, router.registry)
    done = asked.forms[0].submit(headers=OPERATOR)
    assert "cancelled=1" in done.location and is_cancelled(holder, router.registry)
    assert claim_name(celery, name, "next") is None  # the name was freed


def test_runs_are_recorded_and_a_task_has_its_page(console):
    app, celery, _router = console
    ok = sample_tasks.add.apply(args=(2, 3))
    failed = celery.tasks["tests.boom"].apply()
    page = app.get("/_tasks/tasks", headers=OPERATOR).text
    assert ok.id in page and failed.id in page and "state-success" in page and "state-failure" in page
    one = app.get(f"/_tasks/tasks/{failed.id}", headers=OPERATOR).text
    # From the run log (and the result backend): the exception and its traceback.
    assert "RuntimeError: boom from an eager task" in one and "Traceback (most recent call last)" in one
    assert "state-failure" in one
    found = app.get("/_tasks/tasks", {"id": ok.id}, headers=OPERATOR)
    assert found.status_int == 303 and found.location.endswith(f"/_tasks/tasks/{ok.id}")


def test_periodic_entries_from_the_ini_and_from_code(console):
    app, _celery, _router = console
    page = app.get("/_tasks/periodic", headers=OPERATOR).text
    assert "ini-heartbeat" in page and "every 5 minutes" in page
    assert "tests.periodic.weekly_report" in page and "every Monday at 03:15" in page
    assert "every second" in page and "every 90 seconds" in page
    assert page.count(">code<") >= 3 and ">INI<" in page


def test_the_overview_counts_dead_letters_by_kind_and_leases(console_settings, queue_name, redis_client):
    settings = dict(console_settings, **{"websauna_tasks.queues": repr([{"name": queue_name, "max_concurrent": 3,
                                                                         "rate_per_second": 2}])})
    router = console_main({}, **settings)
    app, celery = TestApp(router), get_celery(router.registry)
    make_dead_letter(celery, queue_name)
    from websauna_tasks.queues import get_queues

    limits = get_queues(router.registry).limits
    lease = limits.take_slot(queue_name, 3)
    try:
        page = app.get("/_tasks/", headers=OPERATOR).text
    finally:
        limits.release(lease)
    assert "1 of 3" in page and "unknown_task" in page and ">declared<" in page
    celery.send_task("tests.add", args=(1, 1), queue=queue_name)
    page = app.get("/_tasks/", headers=OPERATOR).text
    row = page[page.index(f"<code>{queue_name}</code>"):]
    assert re.search(r'<td class="num"><span class="">1</span></td>', row)


def test_the_overview_on_rabbitmq_shows_depth_and_says_unacked_is_not_reported(rabbitmq_url, database_url,
                                                                              redis_url, queue_name):
    """On RabbitMQ: depth from a passive queue.declare, a notice for unacked, the letters in the table."""
    celery_config = {"broker_url": rabbitmq_url, "task_default_queue": queue_name}
    router = console_main({}, **{"websauna.celery_config": repr(celery_config), "sqlalchemy.url": database_url,
                                 "websauna_tasks.deadletter_queue": f"{queue_name}.dead",
                                 "websauna_tasks.limits_redis_url": redis_url,
                                 "websauna_tasks.queues": repr([{"name": queue_name, "rate_per_second": 5,
                                                                 "max_concurrent": 2}])})
    app, celery = TestApp(router), get_celery(router.registry)
    try:
        page = app.get("/_tasks/", headers=OPERATOR).text
        # Not declared on the broker yet: passive, so looking does not create it.
        row = page[page.index(f"<code>{queue_name}</code>"):]
        assert 'title="not on the broker yet"' in row.split("</tr>")[0]
        make_dead_letter(celery, queue_name)  # sent, taken off the queue again and kept in the table
        for number in range(3):
            celery.send_task("tests.add", args=(number, 1), queue=queue_name)
        page = app.get("/_tasks/", headers=OPERATOR).text
        row = page[page.index(f"<code>{queue_name}</code>"):].split("</tr>")[0]
        assert re.search(r'<td class="num"><span class="">3</span></td>', row), row
        assert "Unacked: not reported by this transport: RabbitMQ gives only the ready messages" in page
        assert "0 of 2" in row  # leases, from the limits' Redis
        # Remote control works on AMQP: asked, nobody answered (no worker runs here).
        assert "no worker answered within" in page
        assert '<dt>in all</dt><dd class="bad">1</dd>' in page and "unknown_task" in page
        assert app.get("/_tasks/dead-letters", headers=OPERATOR).text.count("data-id=") == 1
    finally:
        from websauna_tasks.db import get_engine

        engine = get_engine(router.registry)
        with engine.begin() as conn:
            from sqlalchemy import text

            conn.execute(text("DELETE FROM websauna_tasks_dead_letters WHERE list_name = :name"),
                         {"name": f"{queue_name}.dead"})
        engine.dispose()


def test_an_unreadable_entry_is_listed_refused_for_requeue_and_dropped(console, dead_key, redis_client):
    app, celery, _router = console
    redis_client.rpush(dead_key, b'{"not": "a dead letter" <script>')
    entry = list_dead_letters(celery)[0]
    assert entry["kind"] == "unreadable_entry"
    page = app.get("/_tasks/dead-letters", headers=OPERATOR).text
    assert "state-unreadable-entry" in page and "&lt;script&gt;" in page and "<script>" not in page
    assert f'value="{entry["id"]}" class="requeue"' not in page
    token = csrf_token(app)
    refused = app.post("/_tasks/dead-letters/act?action=requeue", {"csrf_token": token, "id": entry["id"]},
                       headers=OPERATOR)
    assert "refused=1" in refused.location and "drop it instead" in refused.follow(headers=OPERATOR).text
    dropped = app.post("/_tasks/dead-letters/act?action=drop", {"csrf_token": token, "id": entry["id"],
                                                                 "confirmed": "yes"}, headers=OPERATOR)
    assert "dropped=1" in dropped.location and redis_client.llen(dead_key) == 0


def test_dead_letters_kept_in_the_database_page_and_act_the_same(database_url, queue_name):
    """A broker that is not Redis keeps dead letters in websauna_tasks_dead_letters: same pages, same actions."""
    celery_config = {"broker_url": "memory://", "task_default_queue": queue_name}
    router = console_main({}, **{"websauna.celery_config": repr(celery_config), "sqlalchemy.url": database_url,
                                 "websauna_tasks.deadletter_queue": f"{queue_name}.dead"})
    app, celery = TestApp(router), get_celery(router.registry)
    try:
        ids = [make_dead_letter(celery, queue_name) for _ in range(55)]
        first = app.get("/_tasks/dead-letters", headers=OPERATOR)
        assert "websauna_tasks_dead_letters" in first.text and "55 in all" in first.text
        # Keyset pages: no page numbers, an "older" link naming the last row shown.
        assert "page 1 of" not in first.text and "‹ newer" not in first.text
        assert ids[-1] in first.text and ids[5] in first.text and ids[4] not in first.text
        second = follow(app, first, "older ›")
        assert [task_id for task_id in ids if task_id in second.text] == ids[:5]
        assert "older ›" not in second.text
        assert follow(app, second, "‹ newer").text.count("data-id=") == 50
        oldest = follow(app, first, "oldest »")
        assert [task_id for task_id in ids if task_id in oldest.text] == ids[:50]
        # Forged cursors: text, out of range or both at once are a 400; one past every row is the newest page.
        for query in ("before=abc", "before=-1", f"after={2 ** 63}", "before=1&after=1", "after=1.5"):
            response = app.get(f"/_tasks/dead-letters?{query}", headers=OPERATOR, expect_errors=True)
            assert response.status_int == 400, query
        for query in ("before=0", f"after={2 ** 63 - 1}", "page=7", "page=-3"):
            shown = app.get(f"/_tasks/dead-letters?{query}", headers=OPERATOR).text
            assert ids[-1] in shown and ids[4] not in shown, query
        token = csrf_token(app)
        done = app.post("/_tasks/dead-letters/act?action=requeue", {"csrf_token": token, "id": ids[0]},
                        headers=OPERATOR)
        assert "requeued=1" in done.location
        with celery.connection_for_read() as connection:
            message = kombu.Queue(queue_name)(connection.default_channel).get(no_ack=True)
        assert message.headers["id"] == ids[0]
        asked = app.post("/_tasks/dead-letters/act", [("csrf_token", token), ("action", "drop")]
                         + [("ids", task_id) for task_id in ids[1:4]], headers=OPERATOR)
        assert "dropped=3" in asked.forms[0].submit(headers=OPERATOR).location
        assert len(list_dead_letters(celery)) == 51
        assert '<dt>in all</dt><dd class="bad">51</dd>' in app.get("/_tasks/", headers=OPERATOR).text
    finally:
        from websauna_tasks.db import get_engine

        engine = get_engine(router.registry)
        with engine.begin() as conn:
            from sqlalchemy import text

            conn.execute(text("DELETE FROM websauna_tasks_dead_letters WHERE list_name = :name"),
                         {"name": f"{queue_name}.dead"})
        engine.dispose()
