"""The seed's examples run as written, with only their import lines changed (issue 16, point 1).

The seed is Websauna's task documentation. Its code lives in tests/apps/seed_app/
(bodies as written; what it imported from its own application are stand-ins there
that record in PostgreSQL or Redis). Each example runs here in a real ws-celery
worker against the machine's PostgreSQL and Redis; the seed's own Slack test runs
as written, in eager mode as Websauna's tests did.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import textwrap
import typing as t
import uuid
from datetime import timedelta
from decimal import Decimal
from unittest import mock

import pytest
import redis
import sqlalchemy
import transaction
import webtest
from pyramid.request import Request
from pyramid.router import Router
from pyramid.scripting import prepare
from sqlalchemy.orm import Session

from tests.apps import seed_app
from tests.apps.seed_app import btcaverage, models, slackclient
from tests.apps.seed_app.seo import _build_seo_data, build_seo_data
from tests.apps.seed_app.slack import send_slack_message
from tests.apps.seed_app.tasks import my_task, send_review_sms_notification, update_btc_rate
from tests.apps.seed_app.utils import slug_to_uuid, uuid_to_slug
from tests.apps.seed_app.views import ViewFailed
from tests.conftest import queued_messages
from tests.test_worker_request import SITE_URL
from websauna_tasks import get_celery
from websauna_tasks.testing import WorkerProcess, wait_for

# The seed reads rows with Query.get(), legacy in SQLAlchemy 2 (it warns) but working: kept as written.
pytestmark = pytest.mark.filterwarnings("ignore:The Query.get:sqlalchemy.exc.LegacyAPIWarning")

#: The seed's ``websauna.celery_config`` (its "Setting schedule" INI block), comments included; the
#: broker line is replaced by this test's Redis, private default queue and result backend.
SEED_CELERY_CONFIG = """\
{
    "broker_url": "redis://localhost:6379/3",
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

SLACK_TOKEN = "xoxb-seed-example-token"
#: The seed's queue for build_seo_data: a fixed name, so cleared before and after each test using it.
DATA_QUEUE = "data"
#: Every bounded wait on a worker's effect.
TIMEOUT = 60.0


def seed_celery_config(redis_url: str, default_queue: str, **extra: str) -> str:
    lines = [f'    "broker_url": {redis_url!r},', f'    "task_default_queue": {default_queue!r},',
             f'    "result_backend": {redis_url!r},', '    "result_expires": 600,']
    lines += [f"    {key!r}: {value}," for key, value in extra.items()]
    config = SEED_CELERY_CONFIG.replace('    "broker_url": "redis://localhost:6379/3",', "\n".join(lines))
    assert config != SEED_CELERY_CONFIG
    return config


def write_secrets(path: pathlib.Path) -> str:
    """The seed's ``secrets.ini`` with its ``[slack]`` token."""
    path.write_text(f"[slack]\ntoken = {SLACK_TOKEN}\n")
    return str(path)


def write_seed_ini(path: pathlib.Path, settings: dict[str, str]) -> str:
    lines = ["[app:main]", "use = call:tests.apps.seed_app:main"]
    for key, value in settings.items():
        # ConfigParser interpolation: percent signs in values must be doubled.
        value = value.replace("%", "%%")
        lines.append(f"{key} = {textwrap.indent(value, '    ').lstrip()}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@contextlib.contextmanager
def bootstrapped_request(router: Router) -> t.Iterator[Request]:
    """Websauna's ``test_request``: a routable request of the app whose ``tm`` is the thread's ``transaction.manager``.

    Websauna's ``make_routable_request`` made it so: code under test that passes ``tm=request.tm``
    joins whatever ``with transaction.manager:`` the test opens.
    """
    registry = router.registry
    request = Request.blank("/", base_url=registry.settings["websauna.site_url"])
    closer = prepare(request=request, registry=registry)["closer"]
    # Before request.dbsession is first used: the session joins the manager it finds then.
    request.tm = transaction.manager
    try:
        yield request
    finally:
        closer()


# -- fixtures -------------------------------------------------------------------------------------------------

@pytest.fixture
def seed_tables(db: sqlalchemy.Engine) -> sqlalchemy.Engine:
    models.Base.metadata.drop_all(db)
    models.Base.metadata.create_all(db)
    return db


@pytest.fixture
def seed_redis(redis_url: str, queue_name: str) -> t.Iterator[redis.Redis]:
    """This machine's Redis, without what a previous run of these examples left in their fixed keys."""
    client = redis.Redis.from_url(redis_url)

    def clear() -> None:
        keys = [btcaverage.RATES_KEY, btcaverage.UPDATED_KEY, slackclient.CALLS_KEY, DATA_QUEUE,
                f"_kombu.binding.{DATA_QUEUE}", f"_kombu.binding_permanent.{DATA_QUEUE}"]
        client.delete(*keys, *client.keys("asset_seo_*"))

    clear()
    yield client
    clear()
    client.close()


@pytest.fixture
def seed_settings(redis_url: str, database_url: str, queue_name: str, seed_tables, seed_redis,
                  tmp_path: pathlib.Path) -> dict[str, str]:
    return {
        "websauna.celery_config": seed_celery_config(redis_url, queue_name),
        "sqlalchemy.url": database_url,
        "sqlalchemy.isolation_level": "SERIALIZABLE",
        "websauna.site_url": SITE_URL,
        "websauna.secrets_file": write_secrets(tmp_path / "secrets.ini"),
        "slack.enabled": "true",
    }


@pytest.fixture
def seed_router(seed_settings: dict[str, str], built_apps: list) -> Router:
    """The sending side: the seed app on this test's PostgreSQL, Redis and queue."""
    router = seed_app.main({}, **seed_settings)
    built_apps.append(router)
    return router


@pytest.fixture
def start_seed_worker(seed_settings, tmp_path, ws_celery_worker_factory,
                      subprocess_env) -> t.Callable[..., WorkerProcess]:
    """``start_seed_worker(*worker_args)``: ``ws-celery seed.ini -- worker -c 1 ...``, ready."""
    ini = write_seed_ini(tmp_path / "seed.ini", seed_settings)

    def start(*args: str) -> WorkerProcess:
        return ws_celery_worker_factory(ini, "worker", "-c", "1", "-l", "info", *args, env=subprocess_env)

    return start


@pytest.fixture
def test_request(built_apps: list, tmp_path: pathlib.Path) -> t.Iterator[Request]:
    """Websauna's ``test_request`` fixture, of the seed app in Celery's eager mode (no broker)."""
    settings = {
        "websauna.celery_config": "{'broker_url': 'memory://', 'task_always_eager': True}",
        "websauna.site_url": SITE_URL,
        "websauna.secrets_file": write_secrets(tmp_path / "secrets.ini"),
    }
    router = seed_app.main({}, **settings)
    built_apps.append(router)
    with bootstrapped_request(router) as request:
        yield request


def add_delivery(db: sqlalchemy.Engine, delivery_id: int = 1) -> models.Delivery:
    with Session(db, expire_on_commit=False) as session, session.begin():
        customer = models.Customer(name="Mikko", phone_number="+358401234567")
        delivery = models.Delivery(id=delivery_id, uuid=uuid.uuid4(), customer=customer)
        session.add(delivery)
    return delivery


def sent_sms(db: sqlalchemy.Engine) -> list[models.SentSMS]:
    with Session(db) as session:
        return list(session.scalars(sqlalchemy.select(models.SentSMS).order_by(models.SentSMS.id)))


def slack_calls(client: redis.Redis) -> list[dict]:
    return [json.loads(raw) for raw in client.lrange(slackclient.CALLS_KEY, 0, -1)]


def log_of(worker: WorkerProcess) -> t.Callable[[], str]:
    return lambda: worker.output()[-4000:]


# -- "Accessing request within tasks": my_task ---------------------------------------------------------------------

@pytest.mark.slow
def test_my_task_reaches_the_run_request_and_its_dbsession_in_the_worker(seed_router, start_seed_worker):
    worker = start_seed_worker()
    result = my_task.apply_async(tm=None)
    # The body has no effect of its own: its run succeeding is the outcome (self.get_request() and
    # request.dbsession raise outside a run or without a transaction).
    assert result.get(timeout=TIMEOUT) is None, log_of(worker)()
    assert result.state == "SUCCESS"


# -- "Delayed tasks": send_review_sms_notification, dispatched from the seed's view -------------------------------

@pytest.mark.slow
def test_review_sms_is_sent_by_the_worker_after_the_view_commits(seed_router, start_seed_worker, seed_tables):
    delivery = add_delivery(seed_tables)
    worker = start_seed_worker()

    response = webtest.TestApp(seed_router).get("/my-view")
    assert response.json is None  # the seed's view returns nothing

    [sms] = wait_for(lambda: sent_sms(seed_tables), timeout=TIMEOUT, describe=log_of(worker))
    review_url = f"{SITE_URL}/review/{uuid_to_slug(delivery.uuid)}"
    assert sms.body == f"Hi Mikko, how did delivery 1 go? Review it at {review_url}"
    assert slug_to_uuid(review_url.rsplit("/", 1)[1]) == delivery.uuid
    assert sms.phone_number == "+358401234567"
    assert sms.task_id, "the SMS was not sent from a task run"
    assert sms.pid not in (os.getpid(), worker.pid), "the SMS was not sent from a worker's pool process"


@pytest.mark.slow
def test_review_sms_is_never_sent_when_the_view_aborts(seed_router, start_seed_worker, seed_tables, seed_redis,
                                                      queue_name):
    add_delivery(seed_tables)
    worker = start_seed_worker()
    testapp = webtest.TestApp(seed_router)

    with pytest.raises(ViewFailed):
        testapp.get("/my-view-then-fail")
    assert seed_redis.llen(queue_name) == 0, "the aborted request's message was published"

    # A committed request after it: one pool process takes the queue in order, so once this SMS is
    # sent, a message the aborted request had published would have been sent before it.
    testapp.get("/my-view")
    wait_for(lambda: sent_sms(seed_tables), timeout=TIMEOUT, describe=log_of(worker))
    assert len(sent_sms(seed_tables)) == 1


def test_the_view_dispatches_only_on_commit_with_request_transaction_manager(seed_router, seed_tables, task_client):
    """The same view without a worker: the message exists after a commit, never after an abort."""
    add_delivery(seed_tables)
    testapp = webtest.TestApp(seed_router)
    with pytest.raises(ViewFailed):
        testapp.get("/my-view-then-fail")
    assert task_client.jobs == {}
    testapp.get("/my-view")
    [job] = task_client.pending_jobs
    assert job.task_name == send_review_sms_notification.name
    assert tuple(job.args) == (1,)


# -- "Scheduled tasks": update_btc_rate and the seed's beat schedule ----------------------------------------------

@pytest.mark.slow
def test_update_btc_rate_stores_rates_through_get_redis_in_the_worker(seed_router, start_seed_worker, seed_redis):
    celery = get_celery(seed_router.registry)
    # The seed's INI block, comments and timedelta included, is the app's schedule.
    assert celery.conf.accept_content == ["json"]
    entry = celery.conf.beat_schedule["update_conversion_rates"]
    assert entry["task"] == "update_conversion_rates" == update_btc_rate.name
    assert entry["schedule"] == timedelta(minutes=30)

    worker = start_seed_worker()
    # As beat sends it: by the name in the schedule.
    result = celery.send_task(entry["task"])
    assert result.get(timeout=TIMEOUT) is None, log_of(worker)()

    updated = json.loads(seed_redis.get(btcaverage.UPDATED_KEY))
    assert updated["pid"] not in (os.getpid(), worker.pid)
    converter = btcaverage.RedisConverter(seed_redis)
    assert converter.convert(Decimal(2), "EUR") == Decimal("48025.00")


# -- "Tasks storing results": build_seo_data on the "data" queue ----------------------------------------------------

def add_assets(db: sqlalchemy.Engine) -> dict[str, int]:
    """Three assets with a website (built) and one without (skipped by the seed's _get_ids)."""
    with Session(db) as session, session.begin():
        assets = [models.Asset(slug=slug, other_data=({"website": f"https://{slug}.example.com"} if site else {}))
                  for slug, site in (("alpha", True), ("beta", True), ("no-site", False), ("gamma", True))]
        session.add_all(assets)
        session.flush()
        return {asset.slug: asset.id for asset in assets}


def seo_runs(db: sqlalchemy.Engine) -> dict[int, int]:
    with db.connect() as conn:
        return dict(conn.execute(sqlalchemy.text("SELECT asset_id, txid FROM seed_seo_runs")).all())


@pytest.mark.slow
def test_build_seo_data_runs_on_the_data_queue_one_transaction_per_asset(seed_router, start_seed_worker, seed_tables,
                                                                         seed_redis, queue_name):
    ids = add_assets(seed_tables)
    assert (build_seo_data.name, build_seo_data.queue) == ("data.build_seo_data", DATA_QUEUE)
    assert (build_seo_data.time_limit, build_seo_data.soft_time_limit) == (60 * 30, 60 * 15)

    result = build_seo_data.apply_async(tm=None)
    # The message, before any worker takes it: on the "data" queue, carrying the seed's limits.
    [message] = queued_messages(seed_redis, DATA_QUEUE)
    assert seed_redis.llen(queue_name) == 0
    assert message["headers"]["task"] == "data.build_seo_data"
    assert message["headers"]["id"] == result.id
    assert message["headers"]["timelimit"] == [60 * 30, 60 * 15]
    assert message["properties"]["delivery_info"]["routing_key"] == DATA_QUEUE

    # A worker of the "data" queue only, as production would run one for it.
    worker = start_seed_worker("-Q", DATA_QUEUE)
    assert result.get(timeout=TIMEOUT) is None, log_of(worker)()

    built = {slug: ids[slug] for slug in ("alpha", "beta", "gamma")}
    runs = seo_runs(seed_tables)
    assert sorted(runs) == sorted(built.values()), "not exactly the assets with a website were built"
    txids = list(runs.values())
    assert len(set(txids)) == len(txids), f"assets shared a transaction: {runs}"
    for slug, asset_id in built.items():
        data = json.loads(seed_redis.get(f"asset_seo_{slug}"))
        assert data["website"] == f"https://{slug}.example.com"
        assert data["txid"] == runs[asset_id], "the Redis result does not come from the committed transaction"
        assert data["routing_key"] == DATA_QUEUE
        assert data["message_timelimit"] == [60 * 30, 60 * 15]
        assert data["task_limits"] == [60 * 30, 60 * 15]
        assert data["pid"] not in (os.getpid(), worker.pid)
    assert seed_redis.get("asset_seo_no-site") is None

    # The seed's front end: fetch_seo_data(request, asset) in a view reads what the worker stored.
    testapp = webtest.TestApp(seed_router)
    assert testapp.get(f"/assets/{ids['beta']}/seo").json == json.loads(seed_redis.get("asset_seo_beta"))
    assert testapp.get(f"/assets/{ids['no-site']}/seo").json is None


# -- "Slack example" ---------------------------------------------------------------------------------------------

# The seed's test, as written. Changed: its import lines (at the top of this module: transaction,
# unittest's mock, send_slack_message) and the patch target, which names the module holding the
# seed's slack.py ("tokenmarket.slack" in the seed).
def test_slack_send_message(test_request):
    """We can send messages to Slack asynchronously."""

    slack_message_queue = []

    def _test_dispatch(request, method, kwargs):
        slack_message_queue.append(dict(method=method, kwargs=kwargs))

    with mock.patch("tests.apps.seed_app.slack.slack_api_call", new=_test_dispatch):
        with transaction.manager:
            # This generates delayed task that is not send until the transaction is committed.
            send_slack_message(test_request, "#test-messages", "Foobar")

    # Celery eats exceptions happening in the tasks,
    # so we need to explicitly tests for positive outcomes of
    # any functions using Celery, regardless if Celery is in eager mode
    # or not
    msg = slack_message_queue.pop()
    assert msg["method"] == "chat.postMessage"
    assert msg["kwargs"]["channel"] == "#test-messages"
    assert msg["kwargs"]["text"] == "Foobar"


@pytest.mark.slow
def test_slack_message_goes_out_from_the_worker_only_when_transaction_manager_commits(
        seed_router, start_seed_worker, seed_redis, queue_name):
    worker = start_seed_worker()
    with bootstrapped_request(seed_router) as request:
        with transaction.manager:
            send_slack_message(request, "#test-messages", "Foobar")
            assert seed_redis.llen(queue_name) == 0, "sent before the commit"
        [call] = wait_for(lambda: slack_calls(seed_redis), timeout=TIMEOUT, describe=log_of(worker))
        # The worker's call: a SlackClient made with the secrets file's token (slack.enabled = true).
        assert call == {"token": SLACK_TOKEN, "method": "chat.postMessage",
                        "kwargs": {"channel": "#test-messages", "text": "Foobar"}, "pid": call["pid"]}
        assert call["pid"] not in (os.getpid(), worker.pid)

        with pytest.raises(ViewFailed):
            with transaction.manager:
                send_slack_message(request, "#test-messages", "aborted")
                raise ViewFailed("the transaction is aborted")
        assert seed_redis.llen(queue_name) == 0, "the aborted transaction's message was published"
        # Committed after the abort: one pool process takes the queue in order (as in the SMS test).
        with transaction.manager:
            send_slack_message(request, "#test-messages", "after the abort")
        wait_for(lambda: len(slack_calls(seed_redis)) == 2, timeout=TIMEOUT, describe=log_of(worker))
        assert [call["kwargs"]["text"] for call in slack_calls(seed_redis)] == ["Foobar", "after the abort"]

        # immediate=True: the blocking call, in this process.
        send_slack_message(request, "#test-messages", "now", immediate=True)
        now = slack_calls(seed_redis)[-1]
        assert (now["kwargs"]["text"], now["token"], now["pid"]) == ("now", SLACK_TOKEN, os.getpid())


def test_build_seo_data_body_runs_from_a_shell_request(seed_router, seed_tables, seed_redis):
    """The seed: ``_build_seo_data`` is apart from the task "so that this function can be called directly
    from ws-shell": there the request's ``tm`` is the thread's ``transaction.manager``."""
    ids = add_assets(seed_tables)
    with bootstrapped_request(seed_router) as request:
        _build_seo_data(request)
    runs = seo_runs(seed_tables)
    assert sorted(runs) == sorted(ids[slug] for slug in ("alpha", "beta", "gamma"))
    assert len(set(runs.values())) == 3, f"assets shared a transaction: {runs}"
    for slug in ("alpha", "beta", "gamma"):
        data = json.loads(seed_redis.get(f"asset_seo_{slug}"))
        assert (data["txid"], data["pid"], data["routing_key"]) == (runs[ids[slug]], os.getpid(), None)
