"""The operator console: ``config.include("websauna_tasks.console")`` (docs/console.md).

Pages under ``websauna_tasks.console_prefix`` (default ``/_tasks``): the
overview, dead letters, the outbox, task runs, the periodic schedule and
task-name claims. Every page and action needs
``websauna_tasks.console_permission`` (default ``websauna_tasks.console``),
checked by the application's own security policy; without a policy the
console refuses to mount, unless ``websauna_tasks.console_insecure = true``
(development only), and then every page says that it is open to anyone.
Every action is a POST with Pyramid's CSRF check; destructive and bulk ones
ask for confirmation first.

The console reads what the app's state holds and calls the public
functions the ``ws-celery`` operator commands call: nothing of the library
imports it.
"""
from __future__ import annotations

import typing as t

from pyramid.csrf import LegacySessionCSRFStoragePolicy
from pyramid.exceptions import ConfigurationError
from pyramid.interfaces import ICSRFStoragePolicy, ISecurityPolicy, ISessionFactory

from ..health import add_health_views
from ..settings import CONSOLE_INSECURE_KEY, CONSOLE_PERMISSION_KEY, get_task_settings
from . import dead_letters, names, outbox, overview, periodic, runs, tasks
from ._common import REGISTRY_KEY, RENDERER, STATIC_DIR, ConsoleConfig, route

if t.TYPE_CHECKING:
    from pyramid.config import Configurator

__all__ = ["includeme", "ConsoleConfig"]

# After the application's own configuration (PHASE2 sets the security policy), whatever the order of includes.
_CHECK_ORDER = 10


def includeme(config: Configurator) -> None:
    """Mount the console; ConfigurationError at commit when it would be open without having been asked to."""
    config.include("websauna_tasks")
    config.include("pyramid_jinja2")
    settings = get_task_settings(config.registry)
    prefix = "/" + settings.console_prefix.strip("/")
    console = ConsoleConfig(prefix=prefix.rstrip("/") or "", permission=settings.console_permission,
                            insecure=False, recent_runs=settings.console_recent_runs)
    config.registry[REGISTRY_KEY] = console
    # Our own renderer name and settings prefix: the app's jinja2.* settings stay the app's.
    config.add_jinja2_renderer(RENDERER, settings_prefix="websauna_tasks_console.jinja2.")
    config.add_jinja2_search_path("websauna_tasks.console:templates", name=RENDERER)
    # An absolute path, not an asset spec: pkg_resources cannot read a package that pytest's
    # assertion rewriting loaded (this package is a pytest plugin's).
    config.add_static_view(f"{console.prefix}/static", str(STATIC_DIR),
                           permission=console.permission)
    for module in (overview, dead_letters, outbox, tasks, periodic, names):
        module.add_views(config, console)
    runs.record_runs(config, console)
    # The health report as JSON at <prefix>/health, behind the console's permission like every page
    # (a probe without credentials uses `ws-celery INI -- healthcheck`, docs/running.md#health-checks).
    add_health_views(config, console.prefix, permission=console.permission, route_name=route("health"))
    config.action(None, lambda: _check_guard(config.registry, console), order=_CHECK_ORDER)


def _check_guard(registry: t.Any, console: ConsoleConfig) -> None:
    settings = get_task_settings(registry)
    if registry.queryUtility(ISecurityPolicy) is None:
        if not settings.console_insecure:
            raise ConfigurationError(
                f"websauna_tasks.console: the application has no security policy, so the console's permission "
                f"({CONSOLE_PERMISSION_KEY} = {console.permission}) would let anyone in: set one with "
                f"config.set_security_policy(), or, on a development machine only, {CONSOLE_INSECURE_KEY} = true")
        registry[REGISTRY_KEY] = ConsoleConfig(console.prefix, console.permission, True, console.recent_runs)
    policy = registry.queryUtility(ICSRFStoragePolicy)
    if isinstance(policy, LegacySessionCSRFStoragePolicy) and registry.queryUtility(ISessionFactory) is None:
        raise ConfigurationError(
            "websauna_tasks.console: its actions are POSTs with Pyramid's CSRF check, whose token lives in the "
            "session by default, and the application has no session factory: set one (config.set_session_factory) "
            "or keep the token in a cookie: config.set_csrf_storage_policy(pyramid.csrf.CookieCSRFStoragePolicy())")
