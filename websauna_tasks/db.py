"""``request.dbsession``: a SQLAlchemy session joined to ``request.tm``.

zope.sqlalchemy's ``register(session, transaction_manager=tm)`` adds seven
event listeners to each session it is given, which costs more than the rest
of making the session. The listeners are registered here once, on our
sessionmaker, and find the transaction manager of each session in
``session.info``: every session still gets zope.sqlalchemy's own
``ZopeTransactionEvents`` with its own manager, and a session made from the
sessionmaker without one is left alone, as before.

Six of the seven: ``do_orm_execute`` is left out (see ``_LISTENERS``).
"""
from __future__ import annotations

import typing as t

import sqlalchemy.orm.session
import transaction
import zope.sqlalchemy
from pyramid.config import Configurator
from pyramid.exceptions import ConfigurationError
from pyramid.request import Request
from sqlalchemy import engine_from_config, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker
from transaction.interfaces import NoTransaction

from .request import get_current_request

#: Setting: a sessionmaker or ``dotted.name:callable(request) -> Session`` replacing ours (settings.py).
from .settings import DBSESSION_FACTORY_KEY as DBSESSION_FACTORY_KEY
from .settings import get_task_settings

_ENGINE_KEY = "websauna_tasks.engine"
_SESSIONMAKER_KEY = "websauna_tasks.sessionmaker"
#: ``session.info`` key of the session's ``zope.sqlalchemy.datamanager.ZopeTransactionEvents``.
TRANSACTION_EVENTS_KEY = "websauna_tasks.transaction_events"
# initial_state "changed": zope.sqlalchemy otherwise rolls back a
# transaction whose only writes were raw SQL (session.execute(text(...)))
# unless the caller remembers mark_changed(); a silent lost write is worse
# than a COMMIT on a read-only transaction.
_INITIAL_STATE = zope.sqlalchemy.datamanager.STATUS_CHANGED


def configure_dbsession(config: Configurator) -> None:
    settings = config.get_settings()
    # Resolved and checked by the settings layer: a sessionmaker or a function(request).
    factory = get_task_settings(config.registry).dbsession_factory
    if isinstance(factory, sessionmaker):
        # Its sessions are joined to request.tm exactly as ours are; its engine serves
        # what needs one outside a request (outbox relay, pruning, the SQL name store).
        bind = factory.kw.get("bind")
        if isinstance(bind, Engine):
            config.registry[_ENGINE_KEY] = bind
        register_transaction_events(factory)
        config.registry[_SESSIONMAKER_KEY] = factory
        config.add_request_method(make_dbsession, "dbsession", reify=True)
        return
    if factory is not None:
        config.registry[_SESSIONMAKER_KEY] = None
        config.add_request_method(factory, "dbsession", reify=True)
        return
    if settings.get("sqlalchemy.url"):
        engine = engine_from_config(settings, "sqlalchemy.")
        config.registry[_ENGINE_KEY] = engine
        maker = sessionmaker(bind=engine)
        register_transaction_events(maker)
        config.registry[_SESSIONMAKER_KEY] = maker
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
    session.info[TRANSACTION_EVENTS_KEY] = zope.sqlalchemy.datamanager.ZopeTransactionEvents(
        initial_state=_INITIAL_STATE, transaction_manager=tm)
    request.add_finished_callback(lambda _request: close_unless_closed(session))
    return session


# A session that closes for good (close_resets_only=False) is ACTIVE until its first close.
_ACTIVE_CLOSE_STATE = getattr(getattr(sqlalchemy.orm.session, "_SessionCloseState", None), "ACTIVE", None)


def close_unless_closed(session: Session) -> None:
    """``session.close()``, unless it would find nothing to do.

    zope.sqlalchemy closes a session at the end of each transaction it joined; the request's end then
    closed it a second time (two closes a run of a task that used the database). A session with no
    transaction, no object and no first close still to record is left as it is: a close would only
    have replaced its empty maps. SQLAlchemy internals read here; if they are not there, it is closed.
    """
    try:
        idle = (session._transaction is None and not session._new and not session._deleted
                and not session.identity_map and _ACTIVE_CLOSE_STATE is not None
                and session._close_state is not _ACTIVE_CLOSE_STATE)
    except AttributeError:
        idle = False
    if not idle:
        session.close()


def register_transaction_events(maker: sessionmaker) -> None:
    """Listen, once, to the sessionmaker's session events for zope.sqlalchemy.

    Each event is handed to the ``ZopeTransactionEvents`` in the session's
    ``info`` (see :func:`make_dbsession`), which is what
    ``zope.sqlalchemy.register`` would have attached to that session alone.
    The listeners apply to sessions of this sessionmaker only.
    """
    for name, listener in (*_LISTENERS.items(), ("after_transaction_create", _require_transaction)):
        # A sessionmaker named by websauna_tasks.dbsession_factory may serve several apps:
        # a second listener would hand each event to the transaction twice.
        if not event.contains(maker, name, listener):
            event.listen(maker, name, listener)


def _events_of(session: Session) -> zope.sqlalchemy.datamanager.ZopeTransactionEvents | None:
    return session.info.get(TRANSACTION_EVENTS_KEY)


MISSING_TRANSACTION_MESSAGE = (
    "request.dbsession was used outside a transaction: its transaction manager (request.tm) is explicit "
    "and has no transaction in progress. Do the database work inside `with request.tm:`, or in a function "
    "decorated with @websauna_tasks.retryable(tm=request.tm); in a task, base=TransactionalTask (or "
    "RetryableTransactionTask) runs the whole body in a transaction"
)


class MissingTransaction(NoTransaction):
    """``request.dbsession`` was used while its explicit ``request.tm`` had no transaction.

    A subclass of ``transaction.interfaces.NoTransaction`` (what the manager
    itself raises, with no message), so code catching that still does.
    """

    def __init__(self, message: str = MISSING_TRANSACTION_MESSAGE) -> None:
        super().__init__(message)


def _require_transaction(session: Session, session_transaction: t.Any) -> None:
    """Refuse to start the session's work when its explicit manager has no transaction.

    Checked when the session's own transaction is created, before it takes a
    connection: refused in zope.sqlalchemy's ``after_begin`` instead, the
    session would keep a begun database transaction that a later
    ``with request.tm:`` never joins, and writes made there would be lost.
    """
    if session_transaction.parent is not None:
        return  # a nested or sub-transaction: its root was checked
    events = _events_of(session)
    if events is None:
        return
    tm = events.transaction_manager
    if getattr(tm, "explicit", False):
        try:
            tm.get()
        except NoTransaction:
            raise MissingTransaction() from None


def _forward(name: str, session_of: t.Callable[[t.Any], Session]) -> t.Callable[..., None]:
    """A listener handing event ``name`` to the ZopeTransactionEvents of the session it concerns."""
    def listener(*args: t.Any) -> None:
        events = _events_of(session_of(args[0]))
        if events is not None:
            try:
                getattr(events, name)(*args)
            except NoTransaction as exc:
                # session.add() outside a transaction: zope.sqlalchemy joins on attach.
                if isinstance(exc, MissingTransaction):
                    raise
                raise MissingTransaction() from None

    listener.__name__ = f"_forward_{name}"
    return listener


def _the_session(session: Session) -> Session:
    return session


def _session_of_context(context: t.Any) -> Session:
    # Bulk update/delete contexts carry their session.
    return context.session


# The events of zope.sqlalchemy.register(), in its order, but for do_orm_execute. Its listener only
# marks the session changed on an ORM insert/update/delete, and every session of ours joins its
# transaction already changed (_INITIAL_STATE), so it had nothing to do; yet any do_orm_execute
# listener makes SQLAlchemy build an ORMExecuteState, and prepare an ORM statement twice, on every
# session.execute(). What is lost: zope.sqlalchemy's assertion on an ORM insert/update/delete in a
# session its user joined by hand as STATUS_READONLY (legacy Query.update()/delete() still get it).
_LISTENERS: dict[str, t.Callable[..., None]] = {
    name: _forward(name, session_of) for name, session_of in (
        ("after_begin", _the_session),
        ("after_attach", _the_session),
        ("after_flush", _the_session),
        ("after_bulk_update", _session_of_context),
        ("after_bulk_delete", _session_of_context),
        ("before_commit", _the_session),
    )
}


def transaction_sessions(tm: transaction.TransactionManager) -> list[Session]:
    """The sessions whose writes commit with ``tm``: the current request's ``dbsession`` when ``tm`` is its own.

    Else (a script's ``with tm:``) the sessions zope.sqlalchemy has joined to
    its transaction. ConfigurationError when the request cannot make its
    ``dbsession``. The outbox and stored payloads (claim_check.py) write there.
    """
    request = get_current_request()
    if request is not None and getattr(request, "tm", None) is tm:
        return [request.dbsession]
    return _joined_sessions(tm)


def _joined_sessions(tm: transaction.TransactionManager) -> list[Session]:
    try:
        txn = tm.get()
    except transaction.interfaces.NoTransaction:
        return []
    sessions = []
    for resource in getattr(txn, "_resources", ()):
        session = getattr(resource, "session", None)
        if isinstance(resource, zope.sqlalchemy.datamanager.SessionDataManager) and session is not None:
            sessions.append(session)
    return sessions
