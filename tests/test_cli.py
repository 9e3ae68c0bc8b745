"""``ws-celery`` and ``run-celery.bash``, run as real subprocesses against real Redis."""
from __future__ import annotations

import ctypes
import os
import pathlib
import re
import signal
import subprocess
import sys
import uuid

import pytest
from pyramid.paster import get_app
from sqlalchemy import text

from websauna_tasks import cli, get_celery, operator_commands
from websauna_tasks.testing import wait_for

ROOT = pathlib.Path(__file__).resolve().parent.parent
RUN_CELERY = ROOT / "run-celery.bash"


def ws_celery_argv() -> list[str]:
    """The installed console script next to this interpreter (falls back to ``-m``)."""
    script = pathlib.Path(sys.executable).parent / "ws-celery"
    return [str(script)] if script.exists() else [sys.executable, "-m", "websauna_tasks.cli"]


@pytest.fixture
def run_cli(subprocess_env, tmp_path):
    def run(*args: str, preexec_fn=None, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*ws_celery_argv(), *args], capture_output=True, text=True, timeout=timeout, cwd=tmp_path,
            env={**os.environ, **subprocess_env}, preexec_fn=preexec_fn,
        )

    return run


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ws-celery: ")
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


@pytest.fixture
def settings(redis_url, queue_name):
    """Celery settings private to the test: own queue, own control exchange (inspect/status see only ours)."""
    config = {"broker_url": redis_url, "task_default_queue": queue_name, "control_exchange": f"{queue_name}-ctl"}
    return {"websauna.celery_config": repr(config)}


# -- mistakes: one line on stderr, exit status 2, no traceback -----------------------------------------------------

def test_missing_ini(run_cli):
    assert_one_line_error(run_cli("no-such.ini", "--", "worker"), "INI file not found: no-such.ini")


def drop_file_read_override() -> None:
    """In the child, as root: give up CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH so file modes apply."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_capbset_drop = 24
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(pr_capbset_drop, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_unreadable_ini(run_cli, write_ini, settings):
    ini = write_ini(settings)
    os.chmod(ini, 0)
    # chmod 000 does not stop root (tests often run as root): there, the child drops the
    # capabilities that let root read any file, and execs ws-celery without them.
    preexec = drop_file_read_override if os.geteuid() == 0 else None
    check = subprocess.run(["cat", ini], capture_output=True, preexec_fn=preexec)
    assert check.returncode != 0, "test setup: the INI is still readable for the child process"
    line = assert_one_line_error(run_cli(ini, "--", "report", preexec_fn=preexec), f"INI file not readable: {ini}")
    assert "Permission denied" in line


def test_missing_double_dash(run_cli, write_ini, settings):
    assert_one_line_error(run_cli(write_ini(settings), "worker"),
                          "missing '--' between the INI file and the celery command",
                          "usage: ws-celery INI [NAME=VALUE ...] --")


def test_nothing_after_double_dash(run_cli, write_ini, settings):
    assert_one_line_error(run_cli(write_ini(settings), "--"), "give a command after '--'", "ws-celery --help")


def test_no_arguments(run_cli):
    assert_one_line_error(run_cli(), "usage: ws-celery INI [NAME=VALUE ...] --")


def test_two_ini_files(run_cli, write_ini, settings):
    assert_one_line_error(run_cli(write_ini(settings), "other.ini", "--", "worker"), "exactly one INI file")


def test_ini_without_celery_settings(run_cli, write_ini):
    ini = write_ini({"websauna.site_url": "https://example.com"})
    assert_one_line_error(run_cli(ini, "--", "worker"), "has no websauna.celery_config (nor celery.* keys)")


def test_ini_without_app_section(run_cli, tmp_path):
    ini = tmp_path / "server-only.ini"
    ini.write_text("[server:main]\nuse = egg:waitress#main\n")
    assert_one_line_error(run_cli(str(ini), "--", "worker"), "cannot read the application settings")


def test_invalid_config_literal_runs_nothing(run_cli, write_ini, tmp_path):
    marker = tmp_path / "pwned"
    ini = write_ini({"websauna.celery_config": "{'broker_url': __import__('os').system('touch %s')}" % marker})
    assert_one_line_error(run_cli(ini, "--", "worker"),
                          "configuration error: websauna.celery_config: only timedelta(), crontab() and schedule()",
                          "__import__('os').system(")
    assert not marker.exists()


def test_multiline_config_error_stays_on_one_line(run_cli, write_ini, redis_url):
    ini = write_ini({"websauna.celery_config": "{'broker_url': %r,\n 'beat_schedule': {'nightly': {'task': 'x',\n"
                                               " 'schedule': '0 25 * * *'}}}" % redis_url})
    assert_one_line_error(run_cli(ini, "--", "beat"), "configuration error: beat_schedule['nightly']['schedule']")


def test_unknown_subcommand_is_clicks_usage_error(run_cli, write_ini, settings):
    result = run_cli(write_ini(settings), "--", "frobnicate")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "Usage: " in result.stderr
    assert "No such command 'frobnicate'" in result.stderr


# -- working subcommands ------------------------------------------------------------------------------------------

def test_celery_help_lists_subcommands(run_cli, write_ini, settings):
    result = run_cli(write_ini(settings), "--", "--help")
    assert result.returncode == 0, result.stderr
    for command in ("worker", "beat", "inspect", "purge", "status", "report"):
        assert re.search(rf"^\s+{command}\b", result.stdout, re.MULTILINE), command


def test_worker_help(run_cli, write_ini, settings):
    result = run_cli(write_ini(settings), "--", "worker", "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage: " in result.stdout and "worker [OPTIONS]" in result.stdout
    assert "--concurrency" in result.stdout


def test_report_shows_the_ini_configuration(run_cli, write_ini, settings, queue_name):
    result = run_cli(write_ini(settings), "--", "report")
    assert result.returncode == 0, result.stderr
    assert "loader   -> websauna_tasks.loader.WebsaunaLoader" in result.stdout
    assert f"task_default_queue: '{queue_name}'" in result.stdout


def test_pipeline_ini_points_to_the_app_section(run_cli, tmp_path, settings, queue_name):
    ini = tmp_path / "pipeline.ini"
    ini.write_text(
        "[pipeline:main]\npipeline = myapp\n\n"
        "[app:myapp]\nuse = call:tests.apps.testapp:main\n"
        f"websauna.celery_config = {settings['websauna.celery_config']}\n"
    )
    line = assert_one_line_error(run_cli(str(ini), "--", "report"), "[pipeline:main]", f"{ini}#myapp")
    assert "[app:main]" in line
    result = run_cli(f"{ini}#myapp", "--", "report")
    assert result.returncode == 0, result.stderr
    assert f"task_default_queue: '{queue_name}'" in result.stdout


def test_purge_empties_the_private_queue(run_cli, write_ini, settings, queue_name, redis_client):
    ini = write_ini(settings)
    app = get_celery(get_app(ini).registry)
    for number in range(3):
        app.send_task("tests.add", args=(number, 1), queue=queue_name)
    assert redis_client.llen(queue_name) == 3
    result = run_cli(ini, "--", "purge", "-f", "-Q", queue_name)
    assert result.returncode == 0, result.stderr
    assert "Purged 3 messages from 1 known task queue." in result.stdout
    assert redis_client.llen(queue_name) == 0


def test_status_without_workers_fails_cleanly(run_cli, write_ini, settings):
    result = run_cli(write_ini(settings), "--", "status", "-t", "0.5")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "No nodes replied within time constraint" in result.stderr


@pytest.mark.slow
def test_inspect_ping_and_status_reach_a_running_worker(run_cli, write_ini, settings, queue_name,
                                                         ws_celery_worker_factory, subprocess_env):
    ini = write_ini(settings)
    node = f"{queue_name}@testhost"
    ws_celery_worker_factory(ini, "worker", "-c", "1", "-l", "info", "-n", node,
                             "--without-gossip", "--without-mingle", env=subprocess_env)
    ping = run_cli(ini, "--", "inspect", "ping", "-d", node, "-t", "5")
    assert ping.returncode == 0, ping.stderr
    assert f"->  {node}: OK" in ping.stdout and "pong" in ping.stdout
    status = run_cli(ini, "--", "status", "-t", "2")  # waits the whole timeout for replies
    assert status.returncode == 0, status.stderr
    assert f"->  {node}: OK" in status.stdout
    assert "1 node online." in status.stdout


# -- run-celery.bash ----------------------------------------------------------------------------------------------

def session_processes(session_id: int) -> set[int]:
    """Live (non-zombie) processes of a session, found in /proc."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        state, session = fields[0], int(fields[3])
        if session == session_id and state != "Z":
            found.add(int(entry))
    return found




class RunCelery:
    """``run-celery.bash INI`` in its own session, output in a log file."""

    def __init__(self, ini: str, tmp_path: pathlib.Path, env: dict[str, str]):
        self.log_path = tmp_path / f"run-celery-{uuid.uuid4().hex[:6]}.log"
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [str(RUN_CELERY), ini], cwd=tmp_path, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **env, "WORKER_OPTS": "-c 1 -l info --without-gossip --without-mingle",
                 "BEAT_OPTS": f"-l info -s {tmp_path / 'beat-schedule'}"},
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def pids(self) -> dict[str, int]:
        return {name: int(pid) for name, pid in re.findall(r"^run-celery: (worker|beat) pid (\d+)$", self.output(),
                                                           re.MULTILINE)}

    def cleanup(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self._log.close()


@pytest.fixture
def run_celery_factory(tmp_path, subprocess_env):
    started = []

    def start(ini: str) -> RunCelery:
        runner = RunCelery(ini, tmp_path, subprocess_env)
        started.append(runner)
        return runner

    yield start
    for runner in started:
        runner.cleanup()


@pytest.fixture
def beat_ini(write_ini, redis_url, database_url, queue_name, db, redis_client):  # redis_client deletes the queue
    config = {
        "broker_url": redis_url, "task_default_queue": queue_name,
        "beat_schedule": {"tick": {"task": "tests.record", "schedule": 1.0, "args": ("tick",)}},
    }
    return write_ini({"websauna.celery_config": repr(config), "sqlalchemy.url": database_url})


def effect_count(db) -> int:
    with db.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM ws_test_effects")).scalar_one()


def wait_until_running(runner: RunCelery, db) -> dict[str, int]:
    """Both up: beat's schedule produced an effect through the worker."""
    try:
        wait_for(lambda: len(runner.pids()) == 2 and effect_count(db) >= 1, timeout=40)
    except AssertionError:
        raise AssertionError(f"run-celery.bash did not get going:\n{runner.output()[-4000:]}") from None
    pids = runner.pids()
    alive = session_processes(runner.process.pid)
    assert {runner.process.pid, pids["worker"], pids["beat"]} <= alive
    assert len(alive) >= 4, "script, worker, beat and the worker's pool child"
    return pids


@pytest.mark.slow
def test_run_celery_sigterm_stops_worker_and_beat(run_celery_factory, beat_ini, db):
    runner = run_celery_factory(beat_ini)
    pids = wait_until_running(runner, db)
    os.kill(runner.process.pid, signal.SIGTERM)  # the script only, not its process group
    assert runner.process.wait(30) == 143
    # The script waited for its children: they are gone, not even zombies.
    for name, pid in pids.items():
        assert not os.path.exists(f"/proc/{pid}"), f"{name} ({pid}) still exists"
    assert session_processes(runner.process.pid) == set(), "pool children or other processes left behind"
    assert "worker: Warm shutdown" in runner.output()


@pytest.mark.slow
def test_run_celery_stops_beat_when_worker_exits(run_celery_factory, beat_ini, db):
    runner = run_celery_factory(beat_ini)
    pids = wait_until_running(runner, db)
    os.kill(pids["worker"], signal.SIGTERM)
    runner.process.wait(30)
    assert not os.path.exists(f"/proc/{pids['beat']}"), "beat outlived the worker"
    assert session_processes(runner.process.pid) == set()


def test_run_celery_without_ini_prints_usage():
    result = subprocess.run([str(RUN_CELERY)], capture_output=True, text=True, timeout=10)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: ")


# -- issue 12: PasteDeploy variables, help, remote control, beat ---------------------------------------------------

MEMORY = {"websauna.celery_config": repr({"broker_url": "memory://"})}


@pytest.mark.parametrize("words, fragment", [
    (["other.ini"], "'other.ini' is not a NAME=VALUE variable"),
    (["=value"], "'=value' has no variable name before '='"),
    (["1db=x"], "'1db' is not a variable name"),
    (["db url=x"], "'db url' is not a variable name"),
    (["db_url=a", "db_url=b"], "variable db_url is given twice"),
    (["db_url=a\nb"], "the value of db_url contains control characters"),
])
def test_malformed_variables_are_one_line_usage_errors(run_cli, write_ini, words, fragment):
    assert_one_line_error(run_cli(write_ini(MEMORY), *words, "--", "report"), fragment, "usage: ws-celery INI")


def test_variables_reach_the_ini_as_pserve_gives_them(run_cli, tmp_path):
    # A [DEFAULT] value, overridden on the command line: PasteDeploy lets the file's
    # [DEFAULT] win over %(name)s interpolation, so the INI takes it with 'get'.
    ini = tmp_path / "vars.ini"
    ini.write_text("[DEFAULT]\nqueue = from-the-file\n\n[app:main]\nuse = call:tests.apps.testapp:main\n"
                   "celery.broker_url = memory://\nget celery.task_default_queue = queue\n")
    default = run_cli(str(ini), "--", "report")
    assert default.returncode == 0, default.stderr
    assert "task_default_queue: 'from-the-file'" in default.stdout
    given = run_cli(str(ini), "queue=from-the-command-line", "--", "report")
    assert given.returncode == 0, given.stderr
    assert "task_default_queue: 'from-the-command-line'" in given.stdout


def test_help_lists_usage_and_every_own_command_with_its_docstring(run_cli):
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ws-celery INI [NAME=VALUE ...] -- <command> [options]")
    commands = {"outbox-relay": cli.outbox_relay, **operator_commands.COMMANDS}
    assert {"outbox-relay", "outbox-status", "dead-letters"} <= set(commands)
    for name, command in commands.items():
        first_line = command.__doc__.strip().splitlines()[0].replace("``", "")
        assert first_line, f"{name} has no docstring to show in --help"
        assert re.search(rf"^  {re.escape(name)} +{re.escape(first_line)}$", result.stdout, re.MULTILINE), name


def test_a_new_command_appears_in_help_without_editing_it(monkeypatch):
    def frobnicate(app, args):
        """Frobnicate the widgets.

        Not this line.
        """
        return 0

    monkeypatch.setitem(operator_commands.COMMANDS, "frobnicate", frobnicate)
    assert re.search(r"^  frobnicate +Frobnicate the widgets\.$", cli.help_text(), re.MULTILINE)
    assert "Not this line" not in cli.help_text()


def test_every_own_command_help_works_without_the_application(run_cli, tmp_path):
    # The application would fail to start (its database is nowhere): help does not need it.
    ini = tmp_path / "down.ini"
    ini.write_text("[app:main]\nuse = call:tests.apps.testapp:main\ncelery.broker_url = memory://\n"
                   "sqlalchemy.url = postgresql+psycopg://nobody@127.0.0.1:1/none\n")
    for name in ["outbox-relay", *operator_commands.COMMANDS]:
        result = run_cli(str(ini), "--", name, "--help")
        assert result.returncode == 0, (name, result.stderr)
        assert f"usage: ws-celery INI -- {name}" in result.stdout, name
        assert "Traceback" not in result.stderr


def test_celery_help_shows_our_commands_and_not_django(run_cli, write_ini):
    result = run_cli(write_ini(MEMORY), "--", "--help")
    assert result.returncode == 0, result.stderr
    assert "ws-celery's own commands" in result.stdout
    for name in ["outbox-relay", *operator_commands.COMMANDS]:
        assert re.search(rf"^  {re.escape(name)} ", result.stdout, re.MULTILINE), name
    assert "Django" not in result.stdout and "--skip-checks" not in result.stdout


@pytest.mark.parametrize("command", [["status"], ["inspect", "active"], ["control", "shutdown"]])
def test_remote_control_on_a_transport_without_it_says_so(run_cli, write_ini, tmp_path, command):
    broker = f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}"
    ini = write_ini({"websauna.celery_config": repr({"broker_url": broker})})
    line = assert_one_line_error(run_cli(ini, "--", *command), f"'{command[0]}' needs remote control",
                                 "docs/running.md#remote-control")
    assert broker in line


def test_unreachable_broker_is_one_line_naming_it_without_password(run_cli, write_ini):
    ini = write_ini({"websauna.celery_config": repr({"broker_url": "redis://:s3cret@127.0.0.1:1/0"})})
    result = run_cli(ini, "--", "status")
    assert result.returncode == 1, result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("ws-celery: cannot reach the broker redis://:**@127.0.0.1:1/0: ")
    assert "s3cret" not in result.stderr and "broker_url=" in result.stderr


def test_beat_creates_the_directory_of_its_schedule_file(tmp_path, subprocess_env):
    schedule = tmp_path / "new" / "dir" / "beat-schedule"
    ini = tmp_path / "beat.ini"
    ini.write_text("[app:main]\nuse = call:tests.apps.testapp:main\ncelery.broker_url = memory://\n"
                   f"celery.beat_schedule_filename = {schedule}\n")
    log = tmp_path / "beat.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([*ws_celery_argv(), str(ini), "--", "beat"], stdout=out, stderr=subprocess.STDOUT,
                                   cwd=tmp_path, env={**os.environ, **subprocess_env})
    try:
        wait_for(lambda: list(schedule.parent.glob("beat-schedule*")) or process.poll() is not None, timeout=30)
        assert process.poll() is None, log.read_text()
        assert list(schedule.parent.glob("beat-schedule*")), log.read_text()
    finally:
        process.terminate()
        process.wait(15)


def test_beat_schedule_directory_that_cannot_be_made_is_one_line(run_cli, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    ini = tmp_path / "beat.ini"
    ini.write_text("[app:main]\nuse = call:tests.apps.testapp:main\ncelery.broker_url = memory://\n"
                   f"celery.beat_schedule_filename = {blocker}/sub/beat-schedule\n")
    assert_one_line_error(run_cli(str(ini), "--", "beat"), f"cannot create {blocker}/sub for the beat schedule file",
                          "beat_schedule=PATH")


def test_beat_failure_is_logged_once_not_one_character_per_line(run_cli, tmp_path):
    ini = tmp_path / "beat.ini"
    ini.write_text("[app:main]\nuse = call:tests.apps.testapp:main\ncelery.broker_url = memory://\n")
    # -s names a file whose directory does not exist: ws-celery leaves it to beat, which fails.
    result = run_cli(str(ini), "--", "beat", "-s", str(tmp_path / "missing" / "schedule"))
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "beat raised exception" in output
    lines = output.splitlines()
    assert lines[-1].startswith("ws-celery: beat stopped: FileNotFoundError: ")
    # Before: the traceback went through Celery's stderr proxy, one WARNING record per write.
    assert not [line for line in lines if "WARNING/MainProcess]" in line], output[-2000:]


def test_celery_command_help_works_while_the_database_is_down(run_cli):
    production = str(ROOT / "conf" / "production.ini")
    nowhere = "db_url=postgresql+psycopg://nobody@127.0.0.1:1/none"
    result = run_cli(production, nowhere, "--", "worker", "--help")
    assert result.returncode == 0, result.stderr
    assert "worker [OPTIONS]" in result.stdout and "--concurrency" in result.stdout
    # Without --help the same command line is the one-line startup error.
    failed = run_cli(production, nowhere, "--", "worker")
    assert failed.returncode == 1 and len(failed.stderr.splitlines()) == 1, failed.stderr
    assert "cannot use the database postgresql+psycopg://nobody@127.0.0.1:1/none" in failed.stderr


@pytest.mark.parametrize("returned, status", [(7, 7), (0, 0), (None, 0), ("text", 0), (True, 0), ({"a": 1}, 0)])
def test_only_an_int_a_command_returns_is_the_exit_status(monkeypatch, returned, status):
    # Celery's command line passes on what a command's callback returns (a worker's exit code,
    # and whatever a plugin returns): only an int is a status, or sys.exit() would print the rest.
    monkeypatch.setattr(cli, "_start_command_line", lambda app, celery_args: returned)
    assert cli._start(object(), ["report"]) == status
