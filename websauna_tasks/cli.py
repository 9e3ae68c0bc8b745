"""``ws-celery INI [NAME=VALUE ...] -- <command> [options]``.

Loads the Pyramid application from the INI first (so settings, tasks and
the beat schedule come from the same file as the web app), then hands the
rest of the command line to Celery 5's click group as ``Celery.start(argv)``
does (``worker`` and ``beat`` run their Celery command alone: see
:func:`_start_alone`). Nothing is added to Celery's own options, which keeps
every subcommand (``flower``, ``purge``...) working as documented.

``NAME=VALUE`` pairs between the INI and ``--`` are PasteDeploy variables,
given to the INI exactly as ``pserve INI NAME=VALUE`` gives them
(``ws-celery conf/production.ini db_url=postgresql+psycopg://app@db/app -- worker``).

A few commands are ours, looked up before Celery's: ``outbox-relay`` (below)
and those of ``operator_commands.COMMANDS``. ``ws-celery --help`` lists them
with the first line of each one's docstring, so a new command needs no
change here.

The INI may also be named with Websauna's URIs, ``ws://conf/production.ini``
or ``ws+file://conf/production.ini`` (config_uri.py): the same file.

A mistake in the command line or the INI (missing file, no ``--``, a
malformed variable, unsafe ``websauna.celery_config``...) is one line on
stderr and exit status 2, so it reads well in a service log; a database or
broker that cannot be reached while the application starts is one line and
status 1; errors after that are Celery's and click's own.
"""
from __future__ import annotations

import inspect
import os
import re
import sys
import typing as t

USAGE = "usage: ws-celery INI [NAME=VALUE ...] -- <command> [options]   e.g. ws-celery production.ini -- worker -l info"
DOCS = "docs/running.md"

#: A PasteDeploy variable's name: what ``%(name)s`` and ``get x = name`` can refer to without surprises.
VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
#: Celery commands that talk to workers through broadcast (fanout) messages: remote control.
REMOTE_CONTROL_COMMANDS = frozenset({"status", "inspect", "control"})
#: Celery commands that need the broker at once and would otherwise fail without naming it.
BROKER_COMMANDS = REMOTE_CONTROL_COMMANDS | {"purge", "call"}
HELP_FLAGS = frozenset({"-h", "--help"})
#: Celery's long-running commands, which are never ours: finding that out imports no module of
#: ours, so a worker or beat process does not hold operator_commands and argparse all its life.
CELERY_PROCESSES = frozenset({"worker", "beat"})


class CommandError(Exception):
    """A mistake on the command line or in the INI: one line, exit code 2."""

    code = 2


class UsageError(CommandError):
    """A malformed command line: the message is followed by the usage."""


class Unreachable(CommandError):
    """The database or the broker could not be reached: one line, exit code 1."""

    code = 1


def split_argv(argv: list[str]) -> tuple[str, dict[str, str], list[str]]:
    """``INI [NAME=VALUE ...] -- command...`` as (INI, variables, command)."""
    if "--" not in argv:
        raise UsageError("missing '--' between the INI file and the celery command")
    index = argv.index("--")
    head, celery_args = argv[:index], argv[index + 1:]
    if not head:
        raise UsageError("give exactly one INI file before '--'")
    variables = parse_variables(head[1:])
    if not celery_args:
        raise UsageError("give a command after '--' (worker, beat, inspect, purge, status, or one of ours: "
                         "ws-celery --help)")
    return head[0], variables, celery_args


def parse_variables(items: list[str]) -> dict[str, str]:
    """``NAME=VALUE`` words as a dict, refusing anything else with a UsageError."""
    variables: dict[str, str] = {}
    for item in items:
        name, equals, value = item.partition("=")
        if not equals:
            raise UsageError(f"{item!r} is not a NAME=VALUE variable: give exactly one INI file before '--', "
                             f"then any NAME=VALUE variables")
        if not name:
            raise UsageError(f"{item!r} has no variable name before '='")
        if not VARIABLE_NAME.match(name):
            raise UsageError(f"{name!r} is not a variable name (letters, digits and '_', not starting with a digit)")
        if name in variables:
            raise UsageError(f"variable {name} is given twice")
        if any(not char.isprintable() for char in value):
            raise UsageError(f"the value of {name} contains control characters")
        variables[name] = value
    return variables


def check_ini(config_uri: str) -> str:
    """The INI file ``config_uri`` names, which exists and can be read; else a CommandError."""
    from .config_uri import config_file

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
    return path


def load_celery(config_uri: str, variables: t.Mapping[str, str] | None = None) -> t.Any:
    """Bootstrap the Pyramid app of ``config_uri`` (with PasteDeploy ``variables``) and return its Celery app."""
    from pyramid.paster import get_app, get_appsettings

    from .config import has_celery_settings
    from .config_uri import is_ws_uri
    from .registry import get_celery
    from .unreachable import describe

    path = check_ini(config_uri)
    options = dict(variables or {})
    try:
        settings = get_appsettings(config_uri, options=options)
    except Exception as exc:
        raise CommandError(f"cannot read the application settings from {path}: {exc}") from None
    if not has_celery_settings(settings):
        section = config_uri.split("#", 1)[1] if "#" in config_uri else "main"
        named = config_uri.split("#", 1)[0] if is_ws_uri(config_uri) else path
        raise CommandError(
            f"{path} has no websauna.celery_config (nor celery.* keys) in its [app:{section}] section "
            f"(if 'main' is a [pipeline:main], name the application: {named}#myapp)"
        )
    try:
        wsgi_app = get_app(config_uri, options=options)
    except SystemExit as exc:
        # An application factory that reports a startup failure in one line (the example's does).
        if isinstance(exc.code, str):
            raise Unreachable(exc.code) from None
        raise
    except Exception as exc:
        line = describe(exc, settings, broker_url=_broker_url_of(settings))
        if line is None:
            raise
        raise Unreachable(line) from None
    registry = getattr(wsgi_app, "registry", None)
    if registry is None:
        raise CommandError(f"{path}: the application is not a Pyramid router (cannot find its registry)")
    return get_celery(registry)


def forget_load_caches() -> None:
    """Drop what loading the application cached for its error messages and a worker never reads again.

    Pyramid records the source line of every configuration directive and venusian that of every
    scanned decorator: linecache then holds whole source files, and inspect a map of every
    module's file, for the life of the process (900 KB of a worker's resident set with the
    benchmark's small application, bench/growth.py --parts rss). Only lines read from files are
    dropped: a traceback reads them again, while generated code (``<...>``) has no file to read.
    """
    import linecache

    for name in [name for name in linecache.cache if not name.startswith("<")]:
        linecache.cache.pop(name, None)
    # inspect.getmodule()'s caches, filled again on the next call (private, hence looked up).
    for cache in ("modulesbyfile", "_filesbymodname"):
        mapping = getattr(inspect, cache, None)
        if isinstance(mapping, dict):
            mapping.clear()


def load_for_command(config_uri: str, variables: t.Mapping[str, str], celery_args: list[str]) -> t.Any:
    """:func:`load_celery`; for a Celery command's ``--help``, a bare app when the INI's cannot start."""
    try:
        return load_celery(config_uri, variables)
    except Unreachable:
        if not _asks_for_help(celery_args):
            raise
        # Help lists options, which need an app but not its database: 'worker --help' works
        # while PostgreSQL is down.
        from celery import Celery

        return Celery(set_as_current=False)


def _broker_url_of(settings: t.Mapping[str, t.Any]) -> str | None:
    try:
        from .config import celery_config_from_settings

        return celery_config_from_settings(settings).get("broker_url")
    except Exception:
        return None


def one_line(message: str) -> str:
    # Pyramid's ConfigurationExecutionError and paste errors span lines; an
    # operator reading a service log wants the whole error on one.
    return " ".join(str(message).split())


def own_commands() -> dict[str, t.Callable[[t.Any, list[str]], int]]:
    """Our commands, by name: ``outbox-relay`` and operator_commands.COMMANDS."""
    from .operator_commands import COMMANDS

    return {"outbox-relay": outbox_relay, **COMMANDS}


def own_command(name: str) -> t.Callable[[t.Any, list[str]], int] | None:
    """Our command called ``name``, or None when ``name`` is Celery's."""
    if name in CELERY_PROCESSES:
        return None
    return own_commands().get(name)


def summary(command: t.Callable[..., t.Any]) -> str:
    """The first line of ``command``'s docstring, without reST markup."""
    doc = inspect.getdoc(command) or ""
    first = doc.strip().splitlines()[0] if doc.strip() else ""
    return first.replace("``", "")


def help_text() -> str:
    """``ws-celery --help``: the usage and our commands, one line each, from their docstrings."""
    commands = own_commands()
    width = max(len(name) for name in commands)
    lines = [
        USAGE,
        "",
        "Loads the Pyramid application of INI, then runs <command>. NAME=VALUE pairs are PasteDeploy",
        "variables, given to the INI as 'pserve INI NAME=VALUE' gives them (conf/production.ini reads",
        "db_url, broker_url, result_url, beat_schedule).",
        "",
        "<command> is one of Celery's (worker, beat, inspect, status, purge, call, report...: see",
        "'ws-celery INI -- --help') or one of ws-celery's own:",
        "",
    ]
    lines += [f"  {name.ljust(width)}  {summary(command)}" for name, command in sorted(commands.items())]
    lines += ["", f"Every command takes --help (ws-celery INI -- worker --help). More in {DOCS}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in HELP_FLAGS:
        print(help_text())
        return 0
    try:
        from pyramid.exceptions import ConfigurationError

        try:
            if not argv:
                raise UsageError("give an INI file, '--' and a command")
            config_uri, variables, celery_args = split_argv(argv)
            command = own_command(celery_args[0])
            if command is not None and _asks_for_help(celery_args[1:]):
                # Help needs no application: it works while the database is down.
                check_ini(config_uri)
                return command(None, celery_args[1:])
            from .schema_check import loading_for

            with loading_for(celery_args[0]):  # init makes the tables a create_tables = never startup demands
                app = load_for_command(config_uri, variables, celery_args)
        except ConfigurationError as exc:
            raise CommandError(f"configuration error: {exc}") from None
        if command is not None:
            return command(app, celery_args[1:])
        if celery_args[0] in CELERY_PROCESSES:
            forget_load_caches()
        if not _asks_for_help(celery_args):
            preflight(app, celery_args)
    except CommandError as exc:
        message = f"ws-celery: {one_line(str(exc))}"
        if isinstance(exc, UsageError):
            message += f" ({USAGE})"
        print(message, file=sys.stderr)
        return exc.code
    return run_celery(app, celery_args)


def _asks_for_help(args: list[str]) -> bool:
    # Only before a '--' of the command's own: after it, '-h' is an argument.
    head = args[:args.index("--")] if "--" in args else args
    return any(arg in HELP_FLAGS for arg in head)


def preflight(app: t.Any, celery_args: list[str]) -> None:
    """What can be told in one line before Celery starts: no remote control, no broker, no beat directory."""
    from kombu.utils.url import maybe_sanitize_url

    from .unreachable import broker_unreachable, is_broker_error

    name = celery_args[0]
    broker = str(app.conf.broker_url)
    if name in REMOTE_CONTROL_COMMANDS:
        connection = app.connection_for_read()
        try:
            exchange_types = connection.transport.implements.exchange_type
        finally:
            connection.release()
        # Celery's remote control broadcasts on a fanout exchange: a transport
        # without one (kombu's SQLAlchemy transport) delivers it to no worker.
        if "fanout" not in exchange_types:
            raise CommandError(
                f"'{name}' needs remote control, which the broker's transport ({maybe_sanitize_url(broker)}) does "
                f"not have (no fanout exchange), so no worker could answer: see {DOCS}#remote-control "
                f"(use Redis or RabbitMQ, or read the worker's log)")
    if name in BROKER_COMMANDS:
        connection = app.connection_for_write()
        try:
            connection.ensure_connection(max_retries=1, timeout=5)
        except Exception as exc:
            if not is_broker_error(exc) and not isinstance(exc, OSError):
                raise
            raise Unreachable(broker_unreachable(broker, exc)) from None
        finally:
            connection.release()
    if name == "worker":
        check_worker_options(app, celery_args[1:])
    if name == "beat" or (name == "worker" and any(arg in ("-B", "--beat") for arg in celery_args)):
        make_beat_schedule_directory(app, celery_args)


#: Worker options of Celery's that set a setting of settings.CELERY_NUMBERS, by click's parameter name.
WORKER_NUMBER_OPTIONS = {"prefetch_multiplier": "worker_prefetch_multiplier",
                         "max_tasks_per_child": "worker_max_tasks_per_child",
                         "max_memory_per_child": "worker_max_memory_per_child",
                         "time_limit": "task_time_limit", "soft_time_limit": "task_soft_time_limit"}


def check_worker_options(app: t.Any, args: list[str]) -> None:
    """Refuse a worker option that Celery would take and fail on later, as the setting it sets is refused.

    ``--prefetch-multiplier -5`` makes a worker that never consumes; ``--time-limit nan`` a limit
    that is never reached; ``--detach`` exits 0 and starts nothing.
    """
    from pyramid.exceptions import ConfigurationError

    from .settings import CELERY_NUMBERS, ParseContext

    options = parsed_options(_celery_command(app, "worker"), app, args)
    if options.get("detach"):
        # Celery's worker detaches by exec'ing "python -m celery" with our arguments: that process
        # cannot read the INI and exits at once, while this one exits 0 (beat's detach forks instead).
        raise UsageError("worker --detach is not supported: Celery's detach starts 'celery', which cannot "
                         f"read the INI; run ws-celery under a supervisor (systemd, supervisord): see {DOCS}")
    context = ParseContext(settings={})
    for param, setting in WORKER_NUMBER_OPTIONS.items():
        value = options.get(param)
        if value is not None:
            try:
                CELERY_NUMBERS[setting].parse(f"--{param.replace('_', '-')}", value, context)
            except ConfigurationError as exc:
                raise UsageError(str(exc)) from None


def parsed_options(command: t.Any, app: t.Any, args: list[str]) -> dict[str, t.Any]:
    """A Celery subcommand's options as its click command reads ``args``, without running its callbacks.

    Empty when click refuses the arguments: the real run reports that in click's own words.
    """
    import click

    try:
        return dict(command.make_context(f"celery {command.name}", list(args), obj=_cli_context(app),
                                         resilient_parsing=True).params)
    except click.ClickException:
        return {}


def make_beat_schedule_directory(app: t.Any, celery_args: list[str]) -> None:
    """Create the directory of the beat schedule file, unless ``-s`` names another file."""
    if any(arg in ("-s", "--schedule") or arg.startswith(("--schedule=", "-s")) for arg in celery_args[1:]):
        return
    filename = str(app.conf.beat_schedule_filename or "")
    directory = os.path.dirname(filename)
    if not directory or os.path.isdir(directory):
        return
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        # Beat would log this as "Removing corrupted schedule file" and die.
        raise CommandError(f"cannot create {directory} for the beat schedule file {filename} ({exc.strerror}): "
                           f"give another file with beat_schedule=PATH before '--' (conf/production.ini) or "
                           f"'beat -s PATH'") from None


def run_celery(app: t.Any, celery_args: list[str]) -> int:
    """``app.start(celery_args)``, with its exit status, and the real stdout/stderr back afterwards.

    A plain ``worker`` or ``beat`` command runs Celery's command alone (:func:`_start_alone`).
    """
    alone = _runs_alone(app, celery_args)
    if not alone:
        _hide_irrelevant_options()
    if celery_args[0] in HELP_FLAGS:
        status = _start(app, celery_args)
        print()
        print("ws-celery's own commands (before Celery's; each takes --help):")
        commands = own_commands()
        width = max(len(name) for name in commands)
        for name, command in sorted(commands.items()):
            print(f"  {name.ljust(width)}  {summary(command)}")
        return status
    try:
        return _start(app, celery_args, alone)
    except Exception as exc:
        _restore_streams()
        if celery_args[0] == "beat":
            # Beat has logged the traceback at CRITICAL already.
            print(f"ws-celery: beat stopped: {type(exc).__name__}: {one_line(str(exc))}", file=sys.stderr)
            return 1
        raise


#: The long-running processes that :func:`_start_alone` starts without Celery's command-line group.
ALONE = {"worker": "celery.bin.worker:worker", "beat": "celery.bin.beat:beat"}


def _runs_alone(app: t.Any, celery_args: list[str]) -> bool:
    """Whether :func:`_start_alone` starts this command as Celery's whole command line would.

    Only ``worker`` or ``beat`` given first (no global option before it), without ``--help`` (whose
    usage line names Celery's command line), and with no preload options, which Celery's group consumes.
    """
    return (celery_args[0] in ALONE and not _asks_for_help(celery_args[1:])
            and not app.user_options.get("preload"))


def _start_alone(app: t.Any, celery_args: list[str]) -> int | None:
    """Run Celery's ``worker`` (or ``beat``) command without importing Celery's command-line group.

    Importing ``celery.bin.celery`` imports every Celery subcommand (``amqp`` brings click_repl and
    prompt_toolkit) and loads every ``celery.commands`` plugin (Flower, with tornado and
    prometheus_client): about 7.9 MB, and 5.4 MB more with Flower installed, held for the life of
    each worker process, which runs none of them (bench/growth.py --parts rss). The group's callback
    does two things a plain ``worker`` needs, done here: a ``CLIContext`` for the app, and the
    app's ``user_options`` of the command.
    """
    name = celery_args[0]
    return _celery_command(app, name).main(args=celery_args[1:], prog_name=f"celery {name}",
                                           obj=_cli_context(app), standalone_mode=False)


def _celery_command(app: t.Any, name: str) -> t.Any:
    """Celery's click command ``name`` of :data:`ALONE`, with the app's ``user_options[name]`` added once."""
    from kombu.utils.imports import symbol_by_name

    command = symbol_by_name(ALONE[name])
    known = {id(param) for param in command.params}
    # Once, although Celery's group adds them again on every call in one process.
    command.params.extend(param for param in app.user_options.get(name, ()) if id(param) not in known)
    return command


def _cli_context(app: t.Any) -> t.Any:
    """What Celery's command-line group gives its subcommands as ``ctx.obj``, with no global option."""
    from celery.bin.base import CLIContext

    return CLIContext(app=app, no_color=False, workdir=None, quiet=False)


def _start_command_line(app: t.Any, celery_args: list[str]) -> int | None:
    """``Celery.start(argv)``, but returning the command's exit status, which ``start()`` drops.

    A command that ends with ``ctx.exit(status)`` (a worker's or beat's own exit code) would
    otherwise leave ``ws-celery`` with status 0, and a supervisor would not see the failure.
    """
    import click
    from celery.bin.celery import celery as command_line

    # What start() does: the group's --app option defaults to this app for the call.
    command_line.params[0].default = app
    try:
        return command_line.main(args=celery_args, standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    finally:
        command_line.params[0].default = None


def _start(app: t.Any, celery_args: list[str], alone: bool = False) -> int:
    import click

    try:
        code = _start_alone(app, celery_args) if alone else _start_command_line(app, celery_args)
    except click.ClickException as exc:
        _restore_streams()
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        return 1
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        _restore_streams()
    # An exit status, as Celery's command line would give it; a callback's other return values
    # (None, and whatever a plugin returns) are not statuses.
    return code if isinstance(code, int) and not isinstance(code, bool) else 0


def _restore_streams() -> None:
    # Worker and beat replace sys.stdout/sys.stderr with Celery's LoggingProxy,
    # which logs every write() as a WARNING record: an uncaught traceback
    # written there came out one character per line.
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__


def _hide_irrelevant_options() -> None:
    from celery.bin.celery import celery as celery_group

    for param in celery_group.params:
        # Django's start-up checks: nothing to skip in a Pyramid application.
        if param.name == "skip_checks":
            param.hidden = True


def outbox_relay(app: t.Any, args: list[str]) -> int:
    """Publish the outbox's unsent rows until SIGTERM or SIGINT, apart from the workers' relays.

    ``ws-celery INI -- outbox-relay [-l LEVEL]``. Not a Celery subcommand: it is ours (websauna_tasks.outbox), for
    deployments that run the relay apart from the workers.
    """
    import argparse
    import logging
    import signal
    import threading

    from .outbox import get_outbox, run_relay

    parser = argparse.ArgumentParser(prog="ws-celery INI -- outbox-relay", description=summary(outbox_relay))
    parser.add_argument("-l", "--loglevel", default="INFO", help="logging level (default INFO)")
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
