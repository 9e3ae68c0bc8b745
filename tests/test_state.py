"""One state object per Celery app, built by includeme (websauna_tasks/state.py)."""
from __future__ import annotations

import gc
import weakref

import pytest
from celery import Celery
from pyramid.config import Configurator
from pyramid.exceptions import ConfigurationError

from tests.conftest import include_in_memory
from websauna_tasks import get_celery
from websauna_tasks.deadletter import get_dead_letters
from websauna_tasks.outages import outage_policy
from websauna_tasks.payload import DEFAULT_MAX_PAYLOAD_BYTES, payload_limit
from websauna_tasks.state import AppState, app_state, find_state, registry_of


def build(**settings: str) -> Configurator:
    return include_in_memory(**{"sqlalchemy.url": "sqlite://", **settings})


def test_includeme_gives_the_app_one_state_with_every_part_filled_in():
    config = build(**{"websauna_tasks.max_payload_bytes": "777", "websauna_tasks.db_outage_retries": "3",
                      "websauna_tasks.deadletter_queue": "graves"})
    app = get_celery(config.registry)
    state = app_state(app)
    assert isinstance(state, AppState)
    assert state.registry is config.registry and registry_of(app) is config.registry
    assert state.settings.max_payload_bytes == 777 and payload_limit(app) == 777
    assert state.dead_letters is get_dead_letters(app) and state.dead_letters.key == "graves"
    assert state.intake is not None and state.intake.app is app
    assert state.outage_policy is outage_policy(app) and state.outage_policy.retries == 3


def test_two_apps_keep_their_own_state():
    first = get_celery(build(**{"websauna_tasks.max_payload_bytes": "10"}).registry)
    second = get_celery(build(**{"websauna_tasks.max_payload_bytes": "20"}).registry)
    assert app_state(first) is not app_state(second)
    assert (payload_limit(first), payload_limit(second)) == (10, 20)


@pytest.mark.parametrize("outbox", ["false", "true"])
def test_the_celery_app_carries_no_attribute_of_ours(outbox):
    app = get_celery(build(**{"websauna_tasks.outbox": outbox}).registry)
    assert (app_state(app).outbox is not None) is (outbox == "true")
    ours = [name for name in vars(app) if "websauna" in name or "pyramid" in name]
    assert ours == []


def test_a_plain_celery_app_has_no_state():
    app = Celery(set_as_current=False)
    assert find_state(app) is None and registry_of(app) is None and outage_policy(app) is None
    assert payload_limit(app) == DEFAULT_MAX_PAYLOAD_BYTES
    with pytest.raises(ConfigurationError, match=r"was not built by config.include\('websauna_tasks'\)"):
        app_state(app)
    with pytest.raises(ConfigurationError, match="dead letters need config.include"):
        get_dead_letters(app)
    assert find_state(object()) is None and find_state(42) is None


def test_a_dropped_app_takes_its_state_with_it():
    app = Celery(set_as_current=False)
    from websauna_tasks.state import attach_state

    state = attach_state(app, AppState(registry=None, settings=None))  # type: ignore[arg-type]
    watch = weakref.ref(state)
    del app, state
    gc.collect()
    assert watch() is None
