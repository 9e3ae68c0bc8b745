"""docs/getting-started.md, followed step by step on the application its code blocks make.

The files come out of the page itself: every fenced block whose first line is ``# <path>`` (or
``# <path> (before)``) is a whole file. The "before" application is written and run first, then
the steps' files replace it, and the page's own commands run it: ``pserve development.ini`` and
``ws-celery development.ini -- worker ...`` against the machine's PostgreSQL and Redis, a POST as
the page's curl line sends it, and the page's task_client test under pytest. What the test has to
change is only where the services are (and ``egg:myapp``, which would need the package installed);
each replaced text must be on the page, so an edit of the page that breaks a step fails here.
"""
from __future__ import annotations

import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import urllib.parse
import urllib.request

import pytest
import sqlalchemy

from tests.servers import free_port
from websauna_tasks.testing import wait_for

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "getting-started.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.MULTILINE | re.DOTALL)
FILE_MARK = re.compile(r"# (\S+)( \(before\))?\n")


def page_files() -> tuple[dict[str, str], dict[str, str]]:
    """(before, after) as {path: text}: the starting application, and it with the steps' files laid over it."""
    text = PAGE.read_text()
    steps = text.index("\n## 1. ")
    before: dict[str, str] = {}
    after: dict[str, str] = {}
    for block in FENCE.finditer(text):
        mark = FILE_MARK.match(block.group(2))
        if mark:
            (before if block.start() < steps else after)[mark.group(1)] = block.group(2)[mark.end():]
    return before, {**before, **after}


def page_commands() -> list[list[str]]:
    """The lines of the page's console blocks, as words."""
    commands = []
    for language, body in FENCE.findall(PAGE.read_text()):
        if language == "console":
            commands += [shlex.split(line) for line in body.splitlines() if line.strip()]
    return commands


def replaced(text: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        assert old in text, f"{old!r} is no longer on the page: update tests/test_getting_started.py with it"
        text = text.replace(old, new)
    return text


def write(directory: pathlib.Path, files: dict[str, str], services: dict[str, str]) -> None:
    for path, text in files.items():
        target = directory / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(replaced(text, services) if path.endswith(".ini") else text)


def run_python(directory: pathlib.Path, code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], cwd=directory, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(directory)})
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def post(url: str, form: dict[str, str]) -> str:
    with urllib.request.urlopen(url, data=urllib.parse.urlencode(form).encode(), timeout=10) as response:
        return response.read().decode()


def test_the_page_has_the_blocks_this_test_follows():
    before, after = page_files()
    assert set(before) == {"myapp/models.py", "myapp/__init__.py", "myapp/views.py", "development.ini"}
    assert set(after) == set(before) | {"myapp/tasks.py", "tests/test_signup.py"}
    assert ["pip", "install", "websauna_tasks[postgresql]"] in page_commands()
    assert "config.include(\"websauna_tasks\")" in after["myapp/__init__.py"]
    assert "tm=request.tm" in after["myapp/views.py"]


@pytest.mark.slow
def test_getting_started_from_an_existing_app_to_a_task_run_by_a_worker(tmp_path, database_url, redis_url,
                                                                       queue_name, redis_client,
                                                                       ws_celery_worker_factory):
    port = free_port()
    services = {
        "use = egg:myapp": "use = call:myapp:main",
        "sqlalchemy.url = postgresql+psycopg://127.0.0.1/myapp": f"sqlalchemy.url = {database_url}",
        # A queue of this test's own: other runs' workers share the machine's Redis.
        '"broker_url": "redis://127.0.0.1:6379/0",':
            f'"broker_url": "{redis_url}", "task_default_queue": "{queue_name}",',
        "listen = 127.0.0.1:6543": f"listen = 127.0.0.1:{port}",
    }
    before, after = page_files()
    engine = sqlalchemy.create_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text("DROP TABLE IF EXISTS signup"))

        # The starting point is a working application without websauna_tasks.
        write(tmp_path, before, {k: v for k, v in services.items() if "broker_url" not in k})
        assert "websauna" not in "".join(before.values())
        assert run_python(tmp_path, "import webtest; from pyramid.paster import get_app; "
                                    "print(webtest.TestApp(get_app('development.ini'))"
                                    ".post('/signup', {'email': 'before@example.com'}).json['id'])").strip()

        # Steps 2 to 4: the page's files replace the application's.
        write(tmp_path, after, services)
        ini = str(tmp_path / "development.ini")

        # Step 5, as the page writes it.
        commands = page_commands()
        assert ["pserve", "development.ini"] in commands
        (worker_command,) = [c for c in commands if c[:3] == ["ws-celery", "development.ini", "--"]]
        worker = ws_celery_worker_factory(ini, *worker_command[3:], env={"PYTHONPATH": str(tmp_path)})
        web_log = tmp_path / "pserve.log"
        with open(web_log, "wb") as log:
            web = subprocess.Popen([str(pathlib.Path(sys.executable).parent / "pserve"), "development.ini"],
                                   cwd=tmp_path,
                                   stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONPATH": str(tmp_path)})
        try:
            (curl,) = [c for c in commands if c[0] == "curl"]
            assert curl[1:3] == ["-d", "email=ada@example.com"] and curl[3] == "http://127.0.0.1:6543/signup"
            url = curl[3].replace("6543", str(port))
            signup_id = wait_for(lambda: web.poll() is not None or _post_or_none(url, {"email": "ada@example.com"}),
                                 timeout=60, describe=web_log.read_text)
            assert web.poll() is None, web_log.read_text()
            signup_id = int(re.search(r'"id": (\d+)', signup_id).group(1))

            # The worker ran the task after the commit: it found the committed row and set welcomed_at.
            def welcomed():
                with engine.connect() as conn:
                    return conn.execute(sqlalchemy.text("SELECT welcomed_at FROM signup WHERE id = :id"),
                                        {"id": signup_id}).scalar_one()

            wait_for(welcomed, timeout=60, describe=worker.output)
            log = worker.output()
            task_id = re.search(r"Task myapp\.tasks\.send_welcome\[([\w-]+)\] received", log).group(1)
            assert re.search(rf"Task myapp\.tasks\.send_welcome\[{task_id}\] succeeded", log), log
        finally:
            web.send_signal(signal.SIGTERM)
            web.wait(30)

        # The page's test, under pytest in the application's directory: task_client, no worker.
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                 "tests/test_signup.py"], cwd=tmp_path, capture_output=True, text=True,
                                timeout=300, env={**os.environ, "PYTHONPATH": str(tmp_path)})
        assert result.returncode == 0, result.stdout + result.stderr
        assert "1 passed" in result.stdout
        with engine.connect() as conn:
            emails = conn.execute(sqlalchemy.text("SELECT email, welcomed_at IS NOT NULL FROM signup ORDER BY id"))
            assert emails.all() == [("before@example.com", False), ("ada@example.com", True),
                                    ("grace@example.com", True)]
    finally:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text("DROP TABLE IF EXISTS signup"))
        engine.dispose()


def _post_or_none(url: str, form: dict[str, str]) -> str | None:
    """The response to a POST, or None while the server is not listening yet."""
    try:
        return post(url, form)
    except OSError:
        return None
