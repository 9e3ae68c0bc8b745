"""Celery loader: the worker side of the Pyramid bootstrap.

``ws-celery`` loads the Pyramid application from the INI in the main worker
process (so the consumer knows every scanned task). Prefork children inherit
that memory, including the SQLAlchemy pool; a connection shared across fork
corrupts both sides, so each child drops the inherited pool after fork and
opens its own connections on first use.
"""
from __future__ import annotations

from celery.loaders.app import AppLoader

from .db import get_engine
from .state import registry_of


class WebsaunaLoader(AppLoader):
    def on_worker_process_init(self) -> None:
        registry = registry_of(self.app)
        engine = get_engine(registry) if registry is not None else None
        if engine is not None:
            # close=False: the parent still owns those sockets.
            engine.dispose(close=False)
