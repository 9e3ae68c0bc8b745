"""The Pyramid application of the queue tests (tests/test_queues.py) and their ws-celery workers."""
from pyramid.config import Configurator


def main(global_config, **settings):
    config = Configurator(settings=settings)
    config.include("pyramid_tm")
    config.include("websauna_tasks")
    config.scan("tests.apps.queue_tasks")
    return config.make_wsgi_app()
