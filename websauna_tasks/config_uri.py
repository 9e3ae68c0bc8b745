"""Websauna's config URIs, ``ws://conf/production.ini`` and ``ws+file://conf/production.ini``.

Websauna's docs, tests and deployment scripts name the INI file with these
URIs (``ws-celery ws://conf/production.ini -- worker``, ``pserve
ws://conf/production.ini``). Both mean the file at the path after the
scheme, relative to the current directory as a plain path is, so both are
taken wherever a plain INI path is:

- ``pserve``, ``pyramid.paster.get_app()``, ``bootstrap()`` and anything else
  that goes through plaster find :class:`Loader` by the ``ws`` and ``ws+file``
  entry points (pyproject.toml, groups ``plaster.loader_factory`` and
  ``plaster.wsgi_loader_factory``);
- ``ws-celery`` checks the file with :func:`config_file`, then loads the
  application through plaster like ``pserve``.

Reading the file is plaster_pastedeploy's work, unchanged: ``#section``,
``?name=value`` defaults, ``%(here)s``, ``[loggers]`` all mean what they mean
for a plain path. Websauna's own loader also followed ``[includes]`` to
other INI files; this one does not (docs/migrating-from-websauna.md).
"""
from __future__ import annotations

import typing as t

import plaster
import plaster_pastedeploy

#: The URI schemes taken as Websauna's: the file at the path after ``://``. The last two name this
#: package's loader in plaster's ``<distribution>+<scheme>`` form, for when Websauna's own is installed too.
WS_SCHEMES = ("ws", "ws+file", "websauna-tasks+ws", "websauna-tasks+ws+file")


def is_ws_uri(config_uri: str) -> bool:
    """Whether ``config_uri`` is a ``ws://`` or ``ws+file://`` URI (any case, as URI schemes are)."""
    scheme, separator, _rest = config_uri.partition("://")
    return bool(separator) and scheme.lower() in WS_SCHEMES


def config_file(config_uri: str) -> str:
    """The file ``config_uri`` names: its path without ``#section`` (and, for a ws:// URI, the query).

    ``""`` when a ws:// URI names no file at all (``ws://``).
    """
    if is_ws_uri(config_uri):
        return plaster.parse_uri(config_uri).path
    return config_uri.split("#", 1)[0]


class Loader(plaster_pastedeploy.Loader):
    """plaster loader of ``ws://path.ini`` and ``ws+file://path.ini``: plaster_pastedeploy's, given the file.

    The URI is rewritten to the ``file+ini`` URI of the same path, section and
    defaults, so that everything after this point is exactly what a plain path
    gets.
    """

    def __init__(self, uri: t.Any) -> None:
        if not uri.path:
            raise plaster.InvalidURI(str(uri), f'config URI "{uri}" names no INI file: ws://path/to/production.ini')
        super().__init__(plaster.PlasterURL(scheme="file+ini", path=uri.path, options=dict(uri.options),
                                            fragment=uri.fragment))
        self.ws_uri = uri

    def __repr__(self) -> str:
        return f'websauna_tasks.config_uri.Loader(uri="{self.ws_uri}")'
