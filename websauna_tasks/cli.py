"""``ws-celery INI -- <celery subcommand> [options]``.

Loads the Pyramid application from the INI first (so settings, tasks and
the beat schedule come from the same file as the web app), then hands the
rest of the command line to Celery 5's click group through
``Celery.start(argv)``. Nothing is added to Celery's own options, which keeps
every subcommand (``flower``, ``purge``...) working as documented.
"""
from __future__ import annotations

import os
import sys
import typing as t

USAGE = "usage: ws-celery INI -- <celery subcommand> [options]   e.g. ws-celery production.ini -- worker -l info"


class CommandError(Exception):
    """A mistake on the command line or in the INI: one line, exit code 2."""


def split_argv(argv: list[str]) -> tuple[str, list[str]]:
    if "--" not in argv:
        raise CommandError("missing '--' between the INI file and the celery command")
    index = argv.index("--")
    head, celery_args = argv[:index], argv[index + 1:]
    if len(head) != 1:
        raise CommandError("give exactly one INI file before '--'")
    if not celery_args:
        raise CommandError("give a celery subcommand after '--' (worker, beat, inspect, purge, status...)")
    return head[0], celery_args


def load_celery(config_uri: str) -> t.Any:
    """Bootstrap the Pyramid app of ``config_uri`` and return its Celery app."""
    from pyramid.paster import get_app, get_appsettings

    from .config import has_celery_settings
    from .registry import get_celery

    path = config_uri.split("#", 1)[0]
    if not os.path.isfile(path):
        raise CommandError(f"INI file not found: {path}")
    if not os.access(path, os.R_OK):
        raise CommandError(f"INI file not readable: {path}")
    try:
        settings = get_appsettings(config_uri)
    except Exception as exc:
        raise CommandError(f"cannot read the application settings from {path}: {exc}") from None
    if not has_celery_settings(settings):
        raise CommandError(f"{path} has no websauna.celery_config (nor celery.* keys) in its application section")
    wsgi_app = get_app(config_uri)
    registry = getattr(wsgi_app, "registry", None)
    if registry is None:
        raise CommandError(f"{path}: the application is not a Pyramid router (cannot find its registry)")
    return get_celery(registry)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    try:
        from pyramid.exceptions import ConfigurationError

        try:
            config_uri, celery_args = split_argv(argv)
            app = load_celery(config_uri)
        except ConfigurationError as exc:
            raise CommandError(f"configuration error: {exc}") from None
    except CommandError as exc:
        print(f"ws-celery: {exc}", file=sys.stderr)
        print(USAGE, file=sys.stderr)
        return 2

    import click

    try:
        code = app.start(argv=celery_args)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        return 1
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code or 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
