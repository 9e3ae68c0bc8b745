"""What websauna_tasks keeps for one Celery app: one object, built by ``includeme``.

Each feature used to hang its own attribute on the Celery app (the registry,
the payload limit, the dead letters, the outage policy ...), so nothing said
what an app carries, and a forgotten ``config.include`` showed up as a
``getattr`` default somewhere deep. Here the app maps to one
:class:`AppState`, and each ``configure_*`` fills in its part of it.

The map holds apps weakly: an app that is dropped (tests build hundreds)
takes its state with it, and the Celery app object itself carries nothing
of ours.
"""
from __future__ import annotations

import typing as t
import weakref
from dataclasses import dataclass, field

from pyramid.exceptions import ConfigurationError

if t.TYPE_CHECKING:
    from celery import Celery
    from pyramid.registry import Registry

    from .settings import TaskSettings


@dataclass(eq=False)
class AppState:
    """One Celery app's share of websauna_tasks, filled in by the ``configure_*`` steps of ``includeme``."""

    #: The Pyramid registry the app was built from: settings, engine, sessionmaker.
    registry: Registry
    #: Every ``websauna_tasks.*`` setting, parsed once (settings.py).
    settings: TaskSettings
    # The parts below are typed loosely on purpose: the modules that make them
    # look their part up here, so importing their classes would tie this
    # bottom layer to the ones above it. Each module's accessor is typed.
    #: Where refused messages are kept: a ``deadletters.DeadLetters`` (``get_dead_letters``).
    dead_letters: t.Any = None
    #: The worker's gate: an ``intake.Intake``.
    intake: t.Any = None
    #: How a run that lost its database is sent again: an ``outages.OutagePolicy`` (``outage_policy``).
    outage_policy: t.Any = None
    #: The declared queues when they are enforced: a ``queues.QueuesConfig`` (``enforced_queues``); else None.
    queues: t.Any = None
    #: The transactional outbox when ``websauna_tasks.outbox`` is on: an ``outbox.Outbox`` (``find_outbox``).
    outbox: t.Any = None
    #: Stored payloads (large arguments) when the app has a database: a ``claim_check.ClaimCheck`` (``claim_check_of``).
    claim_check: t.Any = None
    #: ``get_redis``'s client and the process that made it: a ``redis_client.ProcessClient``, made on first use.
    redis: t.Any = None
    #: ``websauna.secrets_file`` as read at startup: a ``secrets.Secrets`` (``get_secrets``).
    secrets: t.Any = None
    #: Who watches the app (metrics, tracing): an ``observability.hooks.Observer``, None when nobody does.
    observer: t.Any = None
    #: beat_schedule entry name -> the ``@task`` that put it there (tasks.py): clashes are refused.
    periodic_owners: dict[str, str] = field(default_factory=dict)


_states: weakref.WeakKeyDictionary[Celery, AppState] = weakref.WeakKeyDictionary()


def attach_state(app: Celery, state: AppState) -> AppState:
    """Make ``state`` the one ``app`` carries (``includeme`` calls this before any ``configure_*``)."""
    _states[app] = state
    return state


def find_state(app: t.Any) -> AppState | None:
    """``app``'s state, or None for a Celery app that ``includeme`` did not build."""
    try:
        return _states.get(app)
    except TypeError:  # not weak-referenceable: certainly not one of ours
        return None


def app_state(app: t.Any) -> AppState:
    """``app``'s state; :class:`ConfigurationError` for an app that ``includeme`` did not build."""
    state = find_state(app)
    if state is None:
        raise ConfigurationError(f"{app!r} was not built by config.include('websauna_tasks')")
    return state


def registry_of(app: t.Any) -> Registry | None:
    """The Pyramid registry ``app`` was built from, or None for a plain Celery app."""
    state = find_state(app)
    return state.registry if state is not None else None
