"""The examples of Websauna's task documentation (the seed), as an app of their own.

tests/test_websauna_seed_examples.py runs them in real ws-celery workers. The
modules holding the seed's code keep its bodies as written; only their import
lines differ. What the seed imported from its own application (models, SMS
sending, the BTC converter, the SEO calculation, slackclient) are the small
stand-ins next to them, which record what happened in PostgreSQL or Redis.
"""
from __future__ import annotations

from pyramid.config import Configurator
from pyramid.router import Router


def main(global_config: dict, **settings: str) -> Router:
    config = Configurator(settings=settings)
    config.include("pyramid_tm")
    config.include("websauna_tasks")
    # The seed's Initializer.configure_tasks: self.config.scan("myapp.tasks").
    config.scan("tests.apps.seed_app.tasks")
    config.scan("tests.apps.seed_app.seo")
    config.scan("tests.apps.seed_app.slack")
    config.add_route("review_public", "/review/{delivery_uuid}")
    config.add_route("my_view", "/my-view")
    config.add_route("my_view_then_fail", "/my-view-then-fail")
    config.add_route("asset_seo", "/assets/{asset_id}/seo")
    config.scan("tests.apps.seed_app.views")
    return config.make_wsgi_app()
