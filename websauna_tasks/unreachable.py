"""One line for a database or broker that cannot be reached at startup.

Used by ``ws-celery`` and by application factories (the example's ``main``)
that touch the database while they start: a service log should say which
server was tried and what to check, not end in forty lines of SQLAlchemy or
redis-py frames. The password of the URL is never shown.
"""
from __future__ import annotations

import typing as t

from kombu.utils.url import maybe_sanitize_url

#: Where the docs say how to create the database and role, and how to give other addresses.
DOCS = "docs/running.md#production-on-one-machine"


def _reason(exc: BaseException) -> str:
    # SQLAlchemy wraps the driver's error and appends its own background link; the
    # driver's text (psycopg: 'FATAL:  role "example" does not exist') is what helps.
    original = getattr(exc, "orig", None)
    text = str(original if original is not None else exc) or type(exc).__name__
    return " ".join(text.split())


def database_unreachable(url: str | None, exc: BaseException, variable: str = "db_url") -> str:
    """The one line for a database at ``url`` that could not be used: ``exc`` and what to check."""
    where = maybe_sanitize_url(str(url)) if url else "(no sqlalchemy.url)"
    return (f"cannot use the database {where}: {_reason(exc)} -- check that PostgreSQL runs there and that the "
            f"role and the database exist ({DOCS}), or give another URL ({variable}=... on the command line)")


def broker_unreachable(url: str | None, exc: BaseException, variable: str = "broker_url") -> str:
    """The one line for a broker at ``url`` that could not be reached."""
    where = maybe_sanitize_url(str(url)) if url else "(no broker_url)"
    return (f"cannot reach the broker {where}: {_reason(exc)} -- check that Redis runs there ({DOCS}), "
            f"or give another URL ({variable}=... on the command line)")


def is_database_error(exc: BaseException) -> bool:
    """Whether ``exc`` is SQLAlchemy's wrapper of a driver error (cannot connect, no such role...)."""
    from sqlalchemy.exc import DBAPIError

    return isinstance(exc, DBAPIError)


def is_broker_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a connection error of kombu or redis-py."""
    from kombu.exceptions import OperationalError as KombuOperationalError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    kinds: tuple[type[BaseException], ...] = (KombuOperationalError, RedisConnectionError, RedisTimeoutError)
    return isinstance(exc, kinds)


def describe(exc: BaseException, settings: t.Mapping[str, t.Any], broker_url: str | None = None) -> str | None:
    """The one line for ``exc`` if it is a database or broker connection error, else None."""
    if is_database_error(exc):
        return database_unreachable(settings.get("sqlalchemy.url"), exc)
    if is_broker_error(exc):
        return broker_unreachable(broker_url, exc)
    return None
