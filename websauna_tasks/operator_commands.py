"""``ws-celery INI -- dead-letters ...``, ``ws-celery INI -- outbox-status`` and ``ws-celery INI -- init``.

Ours, not Celery's subcommands (like ``outbox-relay``): they look after what
this package keeps aside, the dead letters (deadletters/), the outbox
table (outbox/) and the library's tables (schema.py), with the app loaded
from the same INI as the workers.

Exit status: 0 done; 1 the entry asked for is not there or cannot be used,
Redis or the database could not be read, or anything else went wrong; 2 a
mistake in the command line or in the configuration (the outbox is off, no
Redis broker and no database to keep dead letters in). Every message is one
line on stderr, as ws-celery's own, for service logs: never a traceback,
whatever the dead letters hold (an entry that cannot be read is listed as
such).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import typing as t

from kombu.utils.url import maybe_sanitize_url


class Failed(Exception):
    """The command cannot do what was asked: its message is printed, its code is the exit status."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse, with mistakes reported as ws-celery reports its own: one line, exit status 2."""

    def error(self, message: str) -> t.NoReturn:
        usage = _one_line(self.format_usage()).removeprefix("usage: ")
        self.exit(2, f"ws-celery: {message} (usage: {usage})\n")


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _run(parser: argparse.ArgumentParser, args: list[str], action: t.Callable[[argparse.Namespace], int]) -> int:
    try:
        options = parser.parse_args(args)
    except SystemExit as exc:
        # argparse has already printed the help (0) or the mistake (2).
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return action(options)
    except Failed as exc:
        print(f"ws-celery: {_one_line(str(exc))}", file=sys.stderr)
        return exc.code
    except Exception as exc:
        # An operator at a console gets one line, not a traceback, whatever went wrong.
        command = parser.prog.removeprefix("ws-celery INI -- ")
        print(f"ws-celery: {command} failed: {type(exc).__name__}: {_one_line(str(exc))[:500]}", file=sys.stderr)
        return 1


# -- dead letters -------------------------------------------------------------------------------------------------

def _seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {raw!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {raw!r}")
    return value


def dead_letters_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ws-celery INI -- dead-letters",
                     description="Messages workers could not run (unknown task, pickle, undecodable body).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{list,requeue,drop,prune}")
    listing = commands.add_parser("list", help="one line per dead letter, oldest first")
    listing.add_argument("--json", action="store_true", help="whole entries as JSON lines, raw message included")
    listing.add_argument("--kind", help="only dead letters of this kind (unknown_task, malformed, ...)")
    requeue = commands.add_parser("requeue", help="put a dead letter back on its queue and remove it from the list")
    requeue.add_argument("id", help="the task id")
    requeue.add_argument("--queue", help="another queue than the one it came from")
    drop = commands.add_parser("drop", help="remove a dead letter")
    drop.add_argument("id", help="the task id")
    prune = commands.add_parser("prune", help="remove dead letters older than a number of seconds")
    prune.add_argument("--older-than", type=_seconds, required=True, metavar="SECONDS")
    return parser


def dead_letters(app: t.Any, args: list[str]) -> int:
    """List, requeue, drop or prune the messages workers could not run (the dead-letter list).

    ``ws-celery INI -- dead-letters {list,requeue,drop,prune}``; the first line above is the command's line in
    ``ws-celery --help``.
    """
    return _run(dead_letters_parser(), args, lambda options: _dead_letters(app, options))


def _dead_letters(app: t.Any, options: argparse.Namespace) -> int:
    import redis
    import sqlalchemy as sa

    from .deadletters import NoDeadLetterStore, SQLStore, get_dead_letters

    letters = get_dead_letters(app)
    try:
        store = letters.backend
    except NoDeadLetterStore as exc:
        # An empty listing would claim a list that does not exist.
        raise Failed(str(exc), code=2) from None
    try:
        return _DEAD_LETTER_COMMANDS[options.command](app, store.where, options)
    except redis.RedisError as exc:
        raise Failed(f"cannot read the dead-letter list {letters.key} at "
                     f"{maybe_sanitize_url(letters.redis_url)}: {exc}") from None
    except sa.exc.SQLAlchemyError as exc:
        url = store.engine.url.render_as_string(hide_password=True) if isinstance(store, SQLStore) else "?"
        reason = " ".join(str(getattr(exc, "orig", None) or exc).split())
        raise Failed(f"cannot read the dead letters in {store.where} at {url}: {reason}") from None


def _cell(value: t.Any, limit: int = 200) -> str:
    # One entry, one line, whatever its fields hold: whitespace runs (newlines
    # included) become one space, so two spaces still separate the columns,
    # other control characters are escaped, and long text is cut.
    text = " ".join(str(value).split()) if value is not None else ""
    text = "".join(char if char.isprintable() else char.encode("unicode_escape").decode("ascii") for char in text)
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    return text or "-"


def _line(entry: dict[str, t.Any]) -> str:
    from .deadletters import UNREADABLE_ENTRY

    if entry["kind"] == UNREADABLE_ENTRY:
        what = f"unreadable entry of {entry['size']} bytes ({entry['reason']}): {json.dumps(entry['raw'][:80])}"
        return "  ".join(["-", entry["id"], "-", "-", _cell(what, 400)])
    return "  ".join(_cell(entry.get(field)) for field in ("time", "id", "task", "queue", "reason"))


def _list(app: t.Any, key: str, options: argparse.Namespace) -> int:
    from .deadletters import list_dead_letters

    entries = list_dead_letters(app, kind=options.kind)
    if options.json:
        for entry in entries:
            print(json.dumps(entry))
        return 0
    if not entries:
        print(f"no dead letters in {key}")
    for entry in entries:
        print(_line(entry))
    return 0


def _requeue(app: t.Any, key: str, options: argparse.Namespace) -> int:
    from .deadletters import UNREADABLE_ENTRY, get_dead_letters, requeue_dead_letter

    # Looked up first to name the queue it goes to, and to refuse a letter
    # that cannot go back before anything is touched.
    found = get_dead_letters(app).find(options.id)
    entry = next((entry for entry in found if entry["kind"] != UNREADABLE_ENTRY), None)
    if entry is None and found:
        raise Failed(f"dead letter {options.id} in {key} is an unreadable entry ({found[0]['reason']}): it cannot be "
                     f"requeued, only dropped")
    if entry is not None and not isinstance(entry.get("message"), dict):
        raise Failed(f"dead letter {options.id} in {key} keeps no whole message (one over the size limit keeps "
                     f"only its head): it cannot be requeued, only dropped")
    target = options.queue or (entry or {}).get("queue")
    if entry is not None and not target:
        raise Failed(f"dead letter {options.id} has no queue recorded: give one with --queue", code=2)
    if entry is None or not requeue_dead_letter(app, options.id, queue=options.queue):
        raise Failed(f"no dead letter with id {options.id} in {key}")
    print(f"requeued dead letter {options.id} to queue {target}")
    return 0


def _drop(app: t.Any, key: str, options: argparse.Namespace) -> int:
    from .deadletters import drop_dead_letter

    if not drop_dead_letter(app, options.id):
        raise Failed(f"no dead letter with id {options.id} in {key}")
    print(f"dropped dead letter {options.id}")
    return 0


def _prune(app: t.Any, key: str, options: argparse.Namespace) -> int:
    from .deadletters import prune_dead_letters

    removed = prune_dead_letters(app, options.older_than)
    print(f"removed {removed} dead letter(s) older than {options.older_than:g} s from {key}")
    return 0


_DEAD_LETTER_COMMANDS = {"list": _list, "requeue": _requeue, "drop": _drop, "prune": _prune}


# -- the outbox ---------------------------------------------------------------------------------------------------

def outbox_status(app: t.Any, args: list[str]) -> int:
    """Show the outbox: unsent rows, the age of the oldest, sent rows kept.

    ``ws-celery INI -- outbox-status [--json]``.
    """
    parser = _Parser(prog="ws-celery INI -- outbox-status",
                     description="Unsent and kept sent rows of this app in the outbox table.")
    parser.add_argument("--json", action="store_true", help="one JSON object")
    return _run(parser, args, lambda options: _outbox_status(app, options))


def _outbox_status(app: t.Any, options: argparse.Namespace) -> int:
    import sqlalchemy as sa
    from pyramid.exceptions import ConfigurationError

    from .outbox import get_outbox

    try:
        outbox = get_outbox(app)
        status = outbox.status()
    except ConfigurationError as exc:
        raise Failed(str(exc), code=2) from None
    except sa.exc.SQLAlchemyError as exc:
        raise Failed(f"cannot read the outbox table: {exc}") from None
    age = status.oldest_unsent_age
    if options.json:
        print(json.dumps({"app": outbox.app_name, "unsent": status.unsent, "oldest_unsent_age_seconds": age,
                          "sent_kept": status.sent_kept, "retention_seconds": status.retention_seconds}))
        return 0
    print(f"app: {outbox.app_name}")
    print(f"unsent: {status.unsent}")
    print(f"oldest unsent age: {'none' if age is None else f'{age:.1f} s'}")
    print(f"sent rows kept: {status.sent_kept} (deleted after {status.retention_seconds:g} s)")
    return 0


# -- the library's tables ------------------------------------------------------------------------------------------

def init(app: t.Any, args: list[str]) -> int:
    """Create the library's tables in the app's database, or check they are there; --sql prints their DDL.

    ``ws-celery INI -- init [--sql]``: each table of websauna_tasks.schema is
    created when missing, or verified (its columns all there) when it exists;
    a table missing columns is reported, not altered (exit 1: that is a
    migration). ``--sql`` prints the CREATE statements in the dialect of the
    app's database and touches nothing.
    """
    parser = _Parser(prog="ws-celery INI -- init",
                     description="Create or verify the tables websauna_tasks keeps in the application's database "
                                 "(docs/schema.md). Needed before startup with websauna_tasks.create_tables = never.")
    parser.add_argument("--sql", action="store_true",
                        help="print the DDL for the configured database instead of running it")
    return _run(parser, args, lambda options: _init(app, options))


def _init_engine(app: t.Any) -> t.Any:
    from .db import get_engine
    from .state import app_state

    engine = get_engine(app_state(app).registry)
    if engine is None:
        raise Failed("init needs the application's database: set sqlalchemy.url (or a websauna_tasks.dbsession_factory "
                     "sessionmaker bound to an engine)", code=2)
    return engine


def _init(app: t.Any, options: argparse.Namespace) -> int:
    import sqlalchemy as sa

    from . import schema

    engine = _init_engine(app)
    if options.sql:
        print(f"-- websauna_tasks tables, {engine.dialect.name} dialect (ws-celery INI -- init runs these)")
        for statement in schema.ddl_statements(engine.dialect):
            print("\n".join(line.rstrip() for line in statement.splitlines()) + ";")
        return 0
    url = schema.masked_url(engine)
    try:
        inspector = sa.inspect(engine)
        existing = {table.name for table in schema.TABLES if inspector.has_table(table.name)}
        created = schema.create_missing(engine)
        missing = schema.missing_parts(engine)
    except sa.exc.SQLAlchemyError as exc:
        raise Failed(f"cannot create the tables in {url}: {' '.join(str(getattr(exc, 'orig', None) or exc).split())}")\
            from None
    print(f"websauna_tasks tables in {url}:")
    for table in schema.TABLES:
        indexes = [name for name in created if name in {str(index.name) for index in table.indexes}]
        plural = "es" if len(indexes) > 1 else ""
        lacking = [part for part in missing if part.startswith(f"column {table.name}.")]
        if table.name not in existing:
            print(f"  created {table.name}" + (f" with its index{plural} {', '.join(indexes)}" if indexes else ""))
            continue
        added = f"; created its missing index{plural} {', '.join(indexes)}" if indexes else ""
        if lacking:
            print(f"  {table.name} exists but lacks {', '.join(lacking)}{added}")
        else:
            print(f"  verified {table.name}: exists with its {len(table.columns)} columns{added}")
    if missing:
        raise Failed(f"{', '.join(missing)} missing in {url}: add them with a migration (docs/schema.md)")
    return 0


# -- health --------------------------------------------------------------------------------------------------------

def _timeout(raw: str) -> float:
    from .health import parse_timeout

    try:
        return parse_timeout(raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def healthcheck(app: t.Any, args: list[str]) -> int:
    """Check the broker, the database, the outbox backlog and a worker, for probes: exit 0 healthy, 1 not.

    ``ws-celery INI -- healthcheck [--liveness | --readiness] [--json] [--timeout SECONDS] [--worker NODE]``.
    Exit status 0 healthy, 1 unhealthy (one line on stderr per failed check), 2 a mistake in the command line or
    the configuration. The checks are websauna_tasks.health's, as the JSON view's.
    """
    from .health import DEFAULT_TIMEOUT

    parser = _Parser(prog="ws-celery INI -- healthcheck",
                     description="Exit 0 when healthy, 1 when a check failed (one line each on stderr), 2 for a "
                                 "mistake: for liveness and readiness probes (docs/running.md#health-checks).")
    probe = parser.add_mutually_exclusive_group()
    probe.add_argument("--liveness", action="store_true", help="the broker and the database only (cheap)")
    probe.add_argument("--readiness", action="store_true",
                       help="those, the outbox backlog and a worker's ping (the default)")
    parser.add_argument("--json", action="store_true", help="the report as one JSON object on stdout")
    parser.add_argument("--timeout", type=_timeout, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help=f"how long each check may take; they run side by side (default {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--worker", metavar="NODE",
                        help="ping this worker (node name, e.g. celery@$HOSTNAME) rather than any, in --liveness too")
    return _run(parser, args, lambda options: _healthcheck(app, options))


def _healthcheck(app: t.Any, options: argparse.Namespace) -> int:
    from pyramid.exceptions import ConfigurationError

    from .health import check_health

    try:
        report = check_health(app, readiness=not options.liveness, timeout=options.timeout, worker=options.worker)
    except ConfigurationError as exc:
        raise Failed(str(exc), code=2) from None
    if options.json:
        print(json.dumps(report.as_dict()))
    else:
        width = max(len(check.name) for check in report.checks)
        for check in report.checks:
            print(f"{check.name.ljust(width)}  {check.status}: {check.detail}")
        print(f"{'healthy' if report.healthy else 'unhealthy'} ({report.probe}, {report.seconds:.2f} s)")
    for check in report.failed:
        print(f"ws-celery: healthcheck: {check.name} failed: {check.detail}", file=sys.stderr)
    return 0 if report.healthy else 1


# -- cancellation --------------------------------------------------------------------------------------------------

def cancel(app: t.Any, args: list[str]) -> int:
    """Cancel a pending task by id, or the one holding a name: it will not run, whichever worker takes it.

    ``ws-celery INI -- cancel ID`` or ``cancel --name NAME`` (websauna_tasks.cancel).
    """
    parser = _Parser(prog="ws-celery INI -- cancel",
                     description="Mark a task id cancelled for websauna_tasks.cancel_retention_seconds; workers "
                                 "acknowledge its message as REVOKED without running it (docs/cancel_and_progress.md).")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("task_id", nargs="?", help="the task id")
    target.add_argument("--name", help="the name a pending task claimed (unique_name= / _name=)")
    return _run(parser, args, lambda options: _cancel(app, options))


def _cancel(app: t.Any, options: argparse.Namespace) -> int:
    from pyramid.exceptions import ConfigurationError

    from .cancel import cancel as cancel_id
    from .cancel import cancel_name

    try:
        if options.name is not None:
            held = cancel_name(options.name, app)
            if held is None:
                raise Failed(f"cancel: no pending task holds the name {options.name[:200]!r}")
            print(f"cancelled {held} (name {options.name})")
            return 0
        removed = cancel_id(options.task_id, app)
    except (TypeError, ValueError, ConfigurationError) as exc:
        raise Failed(f"cancel: {exc}", code=2) from None
    print(f"cancelled {options.task_id}" + (" (its unsent outbox row deleted)" if removed else ""))
    return 0


# -- progress -----------------------------------------------------------------------------------------------------

def progress(app: t.Any, args: list[str]) -> int:
    """Show the progress a running task reported with set_progress: done, total, note.

    ``ws-celery INI -- progress ID [--json]`` (websauna_tasks.task_progress).
    """
    parser = _Parser(prog="ws-celery INI -- progress",
                     description="The last figures a task's run reported with self.set_progress(), from the "
                                 "result backend.")
    parser.add_argument("task_id", help="the task id")
    parser.add_argument("--json", action="store_true", help="one JSON object")
    return _run(parser, args, lambda options: _progress(app, options))


def _progress(app: t.Any, options: argparse.Namespace) -> int:
    from .progress import task_progress

    try:
        figures = task_progress(options.task_id, app)
    except (TypeError, ValueError) as exc:
        raise Failed(f"progress: {exc}", code=2) from None
    if figures is None:
        state = app.AsyncResult(options.task_id).state
        if options.json:
            print(json.dumps({"task_id": options.task_id, "state": state, "progress": None}))
            return 0
        raise Failed(f"progress: task {options.task_id} reports none (state {state})")
    if options.json:
        print(json.dumps({"task_id": options.task_id, "state": "PROGRESS", "progress": figures.as_meta()}))
        return 0
    percent = "" if figures.fraction is None else f" ({figures.fraction:.1%})"
    note = f": {_cell(figures.note)}" if figures.note else ""
    print(f"{options.task_id}: {figures.done:g} of {figures.total:g}{percent}{note}")
    return 0


# -- stored payloads ----------------------------------------------------------------------------------------------

def stored_payloads(app: t.Any, args: list[str]) -> int:
    """Count the stored payloads (large task arguments), or prune those past their retention.

    ``ws-celery INI -- stored-payloads {status,prune} [--json]``.
    """
    parser = _Parser(prog="ws-celery INI -- stored-payloads",
                     description="Rows of websauna_tasks_payloads: arguments too large for the broker.")
    parser.add_argument("command", choices=("status", "prune"))
    parser.add_argument("--json", action="store_true", help="one JSON object")
    return _run(parser, args, lambda options: _stored_payloads(app, options))


def _stored_payloads(app: t.Any, options: argparse.Namespace) -> int:
    import sqlalchemy as sa

    from .claim_check import claim_check_of, prune_stored_payloads

    claim_check = claim_check_of(app)
    if claim_check is None:
        raise Failed("stored payloads live in the app's database, and sqlalchemy.url is not set", code=2)
    try:
        if options.command == "prune":
            figures = {"pruned": prune_stored_payloads(app)}
        else:
            figures = {"stored": claim_check.stored_count(), "retention_seconds": claim_check.retention_seconds}
    except sa.exc.SQLAlchemyError as exc:
        raise Failed(f"cannot read the stored payloads: {exc}") from None
    if options.json:
        print(json.dumps(figures))
    else:
        for key, value in figures.items():
            print(f"{key.replace('_', ' ')}: {value:g}" if isinstance(value, float) else f"{key}: {value}")
    return 0


COMMANDS: dict[str, t.Callable[[t.Any, list[str]], int]] = {
    "dead-letters": dead_letters,
    "outbox-status": outbox_status,
    "init": init,
    "healthcheck": healthcheck,
    "cancel": cancel,
    "progress": progress,
    "stored-payloads": stored_payloads,
}
