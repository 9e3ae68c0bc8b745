"""The test application with the operator console, guarded by a security policy the tests control.

Who asks is the ``X-Test-User`` header or, for a browser, the ``test_user``
cookie; only ``operator`` holds the console's permission. The setting
``tests.console_policy = none`` builds the app without any policy (the
console must then refuse to mount unless websauna_tasks.console_insecure).
"""
from __future__ import annotations

import typing as t

from pyramid.config import Configurator
from pyramid.csrf import CookieCSRFStoragePolicy
from pyramid.security import Allowed, Denied


class TestUserPolicy:
    def identity(self, request: t.Any) -> str | None:
        return request.headers.get("X-Test-User") or request.cookies.get("test_user")

    def authenticated_userid(self, request: t.Any) -> str | None:
        return self.identity(request)

    def permits(self, request: t.Any, context: t.Any, permission: str) -> t.Any:
        if self.identity(request) == "operator":
            return Allowed("the operator may do anything")
        return Denied(f"{self.identity(request)!r} lacks {permission}")

    def remember(self, request: t.Any, userid: str, **kw: t.Any) -> list:
        return []

    def forget(self, request: t.Any, **kw: t.Any) -> list:
        return []


def main(global_config: t.Any, **settings: t.Any) -> t.Any:
    config = Configurator(settings=settings)
    config.include("pyramid_tm")
    config.include("websauna_tasks")
    for module in (settings.get("tests.scan") or "tests.apps.sample_tasks").split():
        config.scan(module)
    if settings.get("tests.console_policy", "header") != "none":
        config.set_security_policy(TestUserPolicy())
    config.set_csrf_storage_policy(CookieCSRFStoragePolicy())
    config.include("websauna_tasks.console")
    return config.make_wsgi_app()
