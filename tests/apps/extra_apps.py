"""App factories scanning the periodic and async test tasks, so tests.apps.testapp's apps stay without them."""
from pyramid.config import Configurator
from pyramid.response import Response


def _app(settings: dict, module: str):
    config = Configurator(settings=settings)
    config.include("pyramid_tm")
    config.include("websauna_tasks")
    config.scan(module)
    config.add_route("home", "/")
    config.add_view(lambda request: Response("home"), route_name="home")
    return config.make_wsgi_app()


def periodic_main(global_config, **settings):
    return _app(settings, "tests.apps.periodic_tasks")


def async_main(global_config, **settings):
    return _app(settings, "tests.apps.async_tasks")


def write_ini(path, factory: str, settings: dict) -> str:
    """An INI whose [app:main] is ``tests.apps.extra_apps:<factory>`` with ``settings``."""
    lines = ["[app:main]", f"use = call:tests.apps.extra_apps:{factory}"]
    lines += [f"{key} = {value}" for key, value in settings.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)
