"""The Pyramid application of the benchmark: what ``ws-celery bench.ini -- worker`` loads."""
from __future__ import annotations

from pyramid.config import Configurator
from pyramid.router import Router


def main(global_config: dict, **settings: str) -> Router:
    config = Configurator(settings=settings)
    config.include("pyramid_tm")
    config.include("websauna_tasks")
    config.scan("bench.ws_tasks")
    return config.make_wsgi_app()
