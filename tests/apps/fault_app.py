"""The Pyramid application of the fault tests (tests/test_fault_*.py), their producers and ws-celery workers."""
from pyramid.config import Configurator


def main(global_config, **settings):
    config = Configurator(settings=settings)
    config.include("pyramid_tm")
    config.include("websauna_tasks")
    config.scan("tests.apps.fault_tasks")
    return config.make_wsgi_app()
