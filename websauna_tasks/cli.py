"""``ws-celery INI -- <celery subcommand> [options]``.

Loads the Pyramid application from the INI first (so settings, tasks and
the beat schedule come from the same file as the web app), then hands the
rest of the command line to Celery 5's click group through
``Celery.start(argv)``. Nothing is added to Celery's own options, which keeps
every subcommand (``flower``, ``purge``...) working as documented.

A few commands are ours, looked up before Celery's: ``outbox-relay`` (below),
``outbox-status`` and ``dead-letters`` (operator_commands.py).

The INI may also be named with Websauna's URIs, ``ws://conf/production.ini``
or ``ws+file://conf/production.ini`` (config_uri.py): the same file.

A mistake in the command line or the INI (missing file, no ``--``, unsafe
``websauna.celery_config``...) is one line on stderr and exit status 2, so it
reads well in a service log; errors after that are Celery's and click's own.
"""
from __future__ import annotations

import os
import sys
import typing as t

USAGE = "usage: ws-celery INI -- <celery subcommand> [options]   e.g. ws-celery production.ini -- worker -l info"
OWN_COMMANDS = "ws-celery's own commands: outbox-relay, outbox-status, dead-letters (each with --help)"


class CommandError(Exception):
    """A mistake on the command line or in the INI: one line, exit code 2."""


class UsageError(CommandError):
    """A malformed command line: the message is followed by the usage."""


def split_argv(argv: list[str]) -> tuple[str, list[str]]:
    if "--" not in argv:
        raise UsageError("missing '--' between the INI file and the celery command")
    index = argv.index("--")
    head, celery_args = argv[:index], argv[index + 1:]
    if len(head) != 1:
        raise UsageError("give exactly one INI file before '--'")
    if not celery_args:
        raise UsageError("give a celery subcommand after '--' (worker, beat, inspect, purge, status...)")
    return head[0], celery_args


def load_celery(config_uri: str) -> t.Any:
    """Bootstrap the Pyramid app of ``config_uri`` and return its Celery app."""
    from pyramid.paster import get_app, get_appsettings

    from .config import has_celery_settings
    from .config_uri import config_file, is_ws_uri
    from .registry import get_celery

    # A ws:// URI (Websauna's form) is checked as the file it names, then
    # loaded through plaster as given, the way pserve loads it.
    path = config_file(config_uri)
    if not path:
        raise CommandError(f"{config_uri} names no INI file (e.g. ws://conf/production.ini)")
    if not os.path.isfile(path):
        raise CommandError(f"INI file not found: {path}")
    try:
        # Opening is the honest test: os.access() answers for the real uid
        # and says yes to root even where reading would fail.
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise CommandError(f"INI file not readable: {path} ({exc.strerror})") from None
    try:
        settings = get_appsettings(config_uri)
    except Exception as exc:
        raise CommandError(f"cannot read the application settings from {path}: {exc}") from None
    if not has_celery_settings(settings):
        section = config_uri.split("#", 1)[1] if "#" in config_uri else "main"
        named = config_uri.split("#", 1)[0] if is_ws_uri(config_uri) else path
        raise CommandError(
            f"{path} has no websauna.celery_config (nor celery.* keys) in its [app:{section}] section "
            f"(if 'main' is a [pipeline:main], name the application: {named}#myapp)"
        )
    wsgi_app = get_app(config_uri)
    registry = getattr(wsgi_app, "registry", None)
    if registry is None:
        raise CommandError(f"{path}: the application is not a Pyramid router (cannot find its registry)")
    return get_celery(registry)


def one_line(message: str) -> str:
    # Pyramid's ConfigurationExecutionError and paste errors span lines; an
    # operator reading a service log wants the whole error on one.
    return " ".join(str(message).split())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        print(OWN_COMMANDS)
        return 0
    try:
        from pyramid.exceptions import ConfigurationError

        try:
            if not argv:
                raise UsageError("give an INI file, '--' and a celery subcommand")
            config_uri, celery_args = split_argv(argv)
            app = load_celery(config_uri)
        except ConfigurationError as exc:
            raise CommandError(f"configuration error: {exc}") from None
    except CommandError as exc:
        message = f"ws-celery: {one_line(str(exc))}"
        if isinstance(exc, UsageError):
            message += f" ({USAGE})"
        print(message, file=sys.stderr)
        return 2

    command = own_command(celery_args[0])
    if command is not None:
        return command(app, celery_args[1:])

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


def own_command(name: str) -> t.Callable[[t.Any, list[str]], int] | None:
    """The command of ours called ``name``, or None for Celery's."""
    if name == "outbox-relay":
        return outbox_relay
    from .operator_commands import COMMANDS

    return COMMANDS.get(name)


def outbox_relay(app: t.Any, args: list[str]) -> int:
    """``ws-celery INI -- outbox-relay [-l LEVEL]``: publish the outbox until SIGTERM/SIGINT.

    Not a Celery subcommand: it is ours (websauna_tasks.outbox), for
    deployments that run the relay apart from the workers.
    """
    import argparse
    import logging
    import signal
    import threading

    from .outbox import get_outbox, run_relay

    parser = argparse.ArgumentParser(prog="ws-celery INI -- outbox-relay")
    parser.add_argument("-l", "--loglevel", default="INFO")
    options = parser.parse_args(args)
    logging.basicConfig(level=options.loglevel.upper(), format="[%(asctime)s: %(levelname)s] %(name)s: %(message)s")
    try:
        get_outbox(app)
    except Exception as exc:
        print(f"ws-celery: {one_line(str(exc))}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, _frame: t.Any) -> None:
        logging.getLogger(__name__).info("outbox relay: %s received, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    run_relay(app, stop)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
