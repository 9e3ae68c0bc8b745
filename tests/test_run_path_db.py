"""The database side of a task run (issue 14, row (c)): what was made cheaper still behaves the same.

- ``request.dbsession`` has no ``do_orm_execute`` listener (SQLAlchemy then
  skips building an ORMExecuteState on every ``execute()``), and its writes,
  ORM statements included, still commit with ``request.tm``, to which the
  session is still joined; used outside a transaction it is still refused.
- The task request's template is reused without looking the registry's
  utilities up again while nothing was registered, and is still rebuilt when
  a request factory, root factory, request method or ``websauna.site_url``
  changes after the first run.
- A task request still aborts a transaction left open at its end.

SQLite in a temporary file: no service, unit tier.
"""
from __future__ import annotations

import pytest
import sqlalchemy as sa
import transaction
import zope.sqlalchemy
from pyramid.config import Configurator
from pyramid.interfaces import IRootFactory
from pyramid.registry import Registry
from pyramid.request import Request
from sqlalchemy import text
from sqlalchemy.orm import registry as mapper_registry

from websauna_tasks.db import MissingTransaction, get_engine
from websauna_tasks.request import task_request, transaction_in_progress

pytestmark = pytest.mark.unit

SITE_URL = "https://tasks.example.com"


class Row:
    pass


_rows = sa.Table("rows", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                 sa.Column("value", sa.Integer, nullable=False))
mapper_registry().map_imperatively(Row, _rows)


@pytest.fixture
def make_config(tmp_path):
    engines = []

    def make(**extra: str) -> Configurator:
        settings = {"websauna.celery_config": "{'broker_url': 'memory://'}", "websauna.site_url": SITE_URL,
                    "sqlalchemy.url": f"sqlite:///{tmp_path / 'run_path.sqlite'}", **extra}
        config = Configurator(settings=settings)
        config.include("websauna_tasks")
        config.commit()
        engine = get_engine(config.registry)
        if engine is not None:
            engines.append(engine)
            _rows.create(engine, checkfirst=True)
            with engine.begin() as conn:
                conn.execute(_rows.delete())
                conn.execute(_rows.insert(), [{"id": 1, "value": 0}])
        return config

    yield make
    for engine in engines:
        engine.dispose()


def values(registry) -> list[int]:
    with get_engine(registry).connect() as conn:
        return list(conn.execute(sa.select(_rows.c.value).order_by(_rows.c.id)).scalars())


def test_orm_and_raw_writes_commit_with_request_tm_without_an_orm_execute_listener(make_config):
    registry = make_config().registry
    with task_request(registry) as request:
        session = request.dbsession
        assert not session.dispatch.do_orm_execute, "a do_orm_execute listener is back on request.dbsession"
        with request.tm:
            session.execute(sa.update(Row).where(Row.id == 1).values(value=Row.value + 1))
            session.execute(text("UPDATE rows SET value = value + 10 WHERE id = 1"))
            session.add(Row(id=2, value=5))
            joined = [resource.session for resource in request.tm.get()._resources
                      if isinstance(resource, zope.sqlalchemy.datamanager.SessionDataManager)]
            assert joined == [session], "request.dbsession is not joined to request.tm"
    assert values(registry) == [11, 5]


def test_an_aborted_transaction_leaves_no_orm_write_behind(make_config):
    registry = make_config().registry
    with task_request(registry) as request:
        with pytest.raises(RuntimeError), request.tm:
            request.dbsession.execute(sa.update(Row).where(Row.id == 1).values(value=7))
            raise RuntimeError("abort")
    assert values(registry) == [0]


def test_an_orm_statement_outside_a_transaction_is_still_refused(make_config):
    registry = make_config().registry
    with task_request(registry) as request:
        with pytest.raises(MissingTransaction):
            request.dbsession.execute(sa.update(Row).where(Row.id == 1).values(value=7))
        with pytest.raises(MissingTransaction):
            request.dbsession.execute(sa.select(Row))
    assert values(registry) == [0]


def test_the_request_template_is_reused_without_registry_lookups_while_nothing_changes(make_config,
                                                                                         monkeypatch):
    registry = make_config().registry
    with task_request(registry) as first:
        pass
    lookups = []
    real = Registry.queryUtility
    monkeypatch.setattr(registry, "queryUtility",
                        lambda *args, **kwargs: (lookups.append(args[0]), real(registry, *args, **kwargs))[1])
    with task_request(registry) as second:
        pass
    assert lookups == [], "the registry's utilities were looked up on a run although none changed"
    assert type(second) is type(first) and second is not first


class OwnRequest(Request):
    flavour = "own"


class OwnRoot:
    def __init__(self, request):
        self.request = request


def test_the_request_template_follows_factories_methods_and_site_url_set_after_the_first_run(make_config):
    config = make_config()
    registry = config.registry
    config.add_route("home", "/")
    config.commit()
    with task_request(registry) as request:
        assert request.route_url("home") == SITE_URL + "/"
        assert not isinstance(request.context, OwnRoot)

    config.set_root_factory(OwnRoot)
    config.commit()
    with task_request(registry) as request:
        assert isinstance(request.context, OwnRoot) and request.context.request is request

    config.set_request_factory(OwnRequest)
    config.commit()
    with task_request(registry) as request:
        assert isinstance(request, OwnRequest)

    config.add_request_method(lambda request: "late", "late", reify=True)
    config.commit()
    with task_request(registry) as request:
        assert request.late == "late"

    registry.settings["websauna.site_url"] = "https://elsewhere.example.com"
    with task_request(registry) as request:
        assert request.route_url("home") == "https://elsewhere.example.com/"
        assert isinstance(request, OwnRequest) and isinstance(request.context, OwnRoot)


def test_a_registry_with_bases_sees_a_utility_registered_in_a_base_after_the_first_run():
    base = Registry("base")
    config = Configurator(registry=Registry("child", bases=(base,)))
    config.setup_registry(settings={"websauna.celery_config": "{'broker_url': 'memory://'}"})
    config.include("websauna_tasks")
    config.commit()
    registry = config.registry
    with task_request(registry) as request:
        assert not isinstance(request.context, OwnRoot)
    base.registerUtility(OwnRoot, IRootFactory)
    with task_request(registry) as request:
        assert isinstance(request.context, OwnRoot)


def test_a_transaction_left_open_is_aborted_at_the_end_of_the_task_request(make_config):
    registry = make_config().registry
    with task_request(registry) as request:
        request.tm.begin()
        request.dbsession.execute(text("UPDATE rows SET value = 3 WHERE id = 1"))
        assert transaction_in_progress(request.tm)
    assert not transaction_in_progress(request.tm)
    assert values(registry) == [0]


@pytest.mark.parametrize("make_tm, expected", [
    (lambda: transaction.TransactionManager(explicit=True), False),
    (lambda: transaction.ThreadTransactionManager(), False),
])
def test_transaction_in_progress_begins_nothing(make_tm, expected):
    tm = make_tm()
    assert transaction_in_progress(tm) is expected
    assert transaction_in_progress(tm) is expected, "asking began a transaction"
    tm.begin()
    assert transaction_in_progress(tm) is True
    tm.abort()
    assert transaction_in_progress(tm) is False
