"""``request.dbsession``: a SQLAlchemy session joined to ``request.tm``."""
from __future__ import annotations

import typing as t

import transaction
import zope.sqlalchemy
from pyramid.config import Configurator
from pyramid.exceptions import ConfigurationError
from pyramid.request import Request
from sqlalchemy import engine_from_config
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

#: Setting: ``dotted.name:callable(request) -> Session`` replacing ours.
DBSESSION_FACTORY_KEY = "websauna_tasks.dbsession_factory"
_ENGINE_KEY = "websauna_tasks.engine"
_SESSIONMAKER_KEY = "websauna_tasks.sessionmaker"


def configure_dbsession(config: Configurator) -> None:
    settings = config.get_settings()
    factory_name = settings.get(DBSESSION_FACTORY_KEY)
    if factory_name:
        factory = config.maybe_dotted(factory_name)
        if not callable(factory):
            raise ConfigurationError(f"{DBSESSION_FACTORY_KEY}: {factory_name!r} is not callable")
        config.registry[_SESSIONMAKER_KEY] = None
        config.add_request_method(factory, "dbsession", reify=True)
        return
    if settings.get("sqlalchemy.url"):
        engine = engine_from_config(settings, "sqlalchemy.")
        config.registry[_ENGINE_KEY] = engine
        config.registry[_SESSIONMAKER_KEY] = sessionmaker(bind=engine)
    config.add_request_method(make_dbsession, "dbsession", reify=True)


def get_engine(registry: t.Mapping[str, t.Any]) -> Engine | None:
    """The engine built from ``sqlalchemy.*`` settings, if any."""
    return registry.get(_ENGINE_KEY)


def make_dbsession(request: Request) -> Session:
    maker = request.registry.get(_SESSIONMAKER_KEY)
    if maker is None:
        raise ConfigurationError(
            "request.dbsession needs sqlalchemy.url in the settings "
            f"(or {DBSESSION_FACTORY_KEY} = package.module:factory)"
        )
    session = maker()
    # Without pyramid_tm there is no request.tm: use the thread-local manager.
    tm = getattr(request, "tm", None) or transaction.manager
    # initial_state "changed": zope.sqlalchemy otherwise rolls back a
    # transaction whose only writes were raw SQL (session.execute(text(...)))
    # unless the caller remembers mark_changed(); a silent lost write is worse
    # than a COMMIT on a read-only transaction.
    zope.sqlalchemy.register(session, transaction_manager=tm, initial_state=zope.sqlalchemy.datamanager.STATUS_CHANGED)
    request.add_finished_callback(lambda _request: session.close())
    return session
