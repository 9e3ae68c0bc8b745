"""Tween that re-raises eager task failures after pyramid_tm has committed.

In eager mode the task runs in the after-commit hook, where ``transaction``
logs and swallows exceptions. The hook records the failure in a context
variable this tween provides, and the tween raises it, so a developer sees
the error page instead of a silent success.
"""
from __future__ import annotations

import typing as t

from pyramid.registry import Registry
from pyramid.request import Request
from pyramid.response import Response

from .dispatch import eager_errors

Handler = t.Callable[[Request], Response]


def eager_errors_tween_factory(handler: Handler, registry: Registry) -> Handler:
    def eager_errors_tween(request: Request) -> Response:
        errors: list[BaseException] = []
        token = eager_errors.set(errors)
        try:
            response = handler(request)
        finally:
            eager_errors.reset(token)
        if errors:
            raise errors[0]
        return response

    return eager_errors_tween
