"""``get_secrets(registry)``: Websauna's secrets INI, read once at startup.

Websauna kept API keys and passwords out of the application INI, in a
secrets INI named by ``websauna.secrets_file`` and read with
``get_secrets(registry)``; the seed's Slack example does so. The same
setting and call work here, so that code moves over with its import changed:

.. code-block:: ini

    # production-secrets.ini
    [slack]
    token = $SLACK_TOKEN        ; a whole value $NAME or ${NAME} comes from the environment

``get_secrets(registry)["slack.token"]``: keys are ``section.key`` (keys in
lower case, as configparser reads them). The file is read by ``includeme``:
a missing or malformed file, or a ``$NAME`` that is not in the environment,
stops the application at startup with a :class:`ConfigurationError`,
instead of failing the first task that needs the value.
"""
from __future__ import annotations

import configparser
import os
import re
import types
import typing as t

from pyramid.exceptions import ConfigurationError

from .registry import as_registry, get_celery
from .settings import SECRETS_FILE_KEY, get_task_settings
from .state import app_state

if t.TYPE_CHECKING:
    from celery import Celery
    from pyramid.registry import Registry

__all__ = ["Secrets", "get_secrets", "read_secrets", "configure_secrets"]

#: Far above any secrets file; a path mistyped to a log or a disk image is refused instead of read.
MAX_SECRETS_BYTES = 1024 * 1024

_FROM_ENVIRONMENT = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


class Secrets(t.Mapping[str, str]):
    """The secrets of one application: a read-only mapping whose repr shows no value."""

    __slots__ = ("_values", "source")

    def __init__(self, values: t.Mapping[str, str], source: str):
        self._values = types.MappingProxyType(dict(values))
        #: The file they came from; "" when ``websauna.secrets_file`` is not set.
        self.source = source

    def __getitem__(self, key: str) -> str:
        try:
            return self._values[key]
        except KeyError:
            where = f"the secrets file {self.source}" if self.source else f"secrets ({SECRETS_FILE_KEY} is not set)"
            raise KeyError(f"{key!r} is not in {where}") from None

    def __iter__(self) -> t.Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        # Tracebacks and debug logs print reprs; the values must not travel with them.
        return f"<Secrets {len(self._values)} keys from {self.source or 'nowhere'}>"


def read_secrets(path: str) -> Secrets:
    """Read the secrets INI at ``path``; :class:`ConfigurationError` saying what is wrong with it."""
    def refuse(why: str) -> t.NoReturn:
        raise ConfigurationError(f"{SECRETS_FILE_KEY}: {path}: {why}")

    try:
        with open(path, "rb") as file:
            data = file.read(MAX_SECRETS_BYTES + 1)
    except OSError as exc:
        refuse(exc.strerror or str(exc))
    if len(data) > MAX_SECRETS_BYTES:
        refuse(f"larger than {MAX_SECRETS_BYTES} bytes; is this the secrets file?")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        refuse(f"not UTF-8 text ({exc.reason} at byte {exc.start})")
    # No interpolation: a '%' in a password is a character, not a reference.
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    try:
        parser.read_string(text, source=path)
    except configparser.Error as exc:
        refuse(" ".join(str(exc).split()))
    values: dict[str, str] = {}
    for section in parser.sections():
        for name, value in parser.items(section):
            values[f"{section}.{name}"] = _expand(value, f"[{section}] {name}", refuse)
    return Secrets(values, path)


def _expand(value: str, where: str, refuse: t.Callable[[str], t.NoReturn]) -> str:
    match = _FROM_ENVIRONMENT.fullmatch(value.strip())
    if match is None:
        return value
    name = match.group(1) or match.group(2)
    found = os.environ.get(name)
    if found is None:
        # The error names the variable, never a value.
        refuse(f"{where} is ${name}, and the environment has no {name}")
    return found


def configure_secrets(registry: Registry, app: Celery) -> None:
    """Read ``websauna.secrets_file`` once for ``app`` (called by ``includeme``)."""
    path = get_task_settings(registry).secrets_file
    app_state(app).secrets = read_secrets(path) if path else Secrets({}, "")


def get_secrets(request_or_registry: t.Any) -> Secrets:
    """The application's secrets (a request or a registry): ``get_secrets(registry)["slack.token"]``.

    Empty when ``websauna.secrets_file`` is not set; a missing key's
    ``KeyError`` says which file was read.
    """
    registry = as_registry(request_or_registry, "get_secrets")
    secrets = app_state(get_celery(registry)).secrets
    if secrets is None:
        raise ConfigurationError("get_secrets(): websauna_tasks was included without its secrets step")
    return secrets
