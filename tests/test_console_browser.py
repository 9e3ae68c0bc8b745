"""The console in a real headless Chromium, against dead letters a real ws-celery worker produced.

Debian's ``chromium`` and ``chromium-driver`` (installed by .ci/run when
missing), driven by selenium; the test app (tests/apps/console_app.py) is
served by waitress in a process of its own on a free port; the operator is
the ``test_user`` cookie. The browser clicks the same buttons an operator
would, with no JavaScript of ours involved. When a test fails, a screenshot
of the page is saved under the test's tmp directory and its path printed.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import typing as t
import urllib.request

import pytest

from tests.conftest import IN_CI
from websauna_tasks.testing import wait_for

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1400,1000")

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def browser(tmp_path):
    """A headless Chromium through chromedriver; both stopped by PID afterwards, whatever happened."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        message = "chromium and chromium-driver are not installed (apt-get install -y chromium chromium-driver)"
        if IN_CI:
            pytest.fail(message + " and CI=true", pytrace=False)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        try:
            driver.quit()
        finally:
            process = service.process
            if process is not None and process.poll() is None:
                # chromedriver's process group holds the browser it started.
                os.killpg(process.pid, signal.SIGKILL) if os.getpgid(process.pid) == process.pid else process.kill()
                process.wait(10)


@contextlib.contextmanager
def screenshot_on_failure(driver: t.Any, path: t.Any) -> t.Iterator[None]:
    try:
        yield
    except BaseException:
        try:
            driver.save_screenshot(str(path))
            print(f"\nscreenshot of the failing page: {path} ({driver.current_url})")
        except Exception as exc:
            print(f"\nno screenshot ({type(exc).__name__}: {exc})")
        raise


@pytest.fixture
def console_ini(tmp_path, redis_url, database_url, queue_name, dead_key, redis_client):
    celery = {"broker_url": redis_url, "task_default_queue": queue_name, "result_backend": redis_url,
              "worker_hijack_root_logger": False}
    path = tmp_path / "console.ini"
    path.write_text("\n".join([
        "[app:main]", "use = call:tests.apps.console_app:main",
        f"websauna.celery_config = {celery!r}", f"sqlalchemy.url = {database_url}",
        f"websauna_tasks.deadletter_queue = {dead_key}", "websauna_tasks.outbox = true",
        "websauna_tasks.unknown_task_grace_seconds = 0",
        f"websauna_tasks.app_name = console-{queue_name}", ""]))
    yield str(path)
    redis_client.delete(f"websauna_tasks:console:runs:console-{queue_name}")


@pytest.fixture
def web(console_ini, subprocess_env, tmp_path):
    """The console app under waitress on a free port, in a process stopped by its PID."""
    port = free_port()
    log = open(tmp_path / "waitress.log", "wb")
    code = ("import sys; from pyramid.paster import get_app; from waitress import serve; "
            "serve(get_app(sys.argv[1]), listen=f'127.0.0.1:{sys.argv[2]}', threads=4)")
    process = subprocess.Popen([sys.executable, "-c", code, console_ini, str(port)], stdout=log,
                               stderr=subprocess.STDOUT, env={**os.environ, **subprocess_env})
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert process.poll() is None, (tmp_path / "waitress.log").read_text()
        try:
            urllib.request.urlopen(base + "/_tasks/", timeout=2)
        except urllib.error.HTTPError:
            return True  # 403: it answers
        except OSError:
            return False
        return True

    try:
        wait_for(up, timeout=60, describe=lambda: (tmp_path / "waitress.log").read_text())
        yield base
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        log.close()


def click_and_load(driver: t.Any, element: t.Any) -> None:
    """Click a submit button and wait for the next page: click() may return before the browser has left this one."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    page = driver.find_element(By.TAG_NAME, "html")
    element.click()
    WebDriverWait(driver, 15).until(expected_conditions.staleness_of(page))


def forge_undecodable(celery: t.Any, redis_client: t.Any, queue_name: str) -> str:
    """A tests.add message whose body is cut off, written straight to Redis as something else would."""
    task_id = celery.send_task("tests.add", args=(1, 2), queue=queue_name).id
    stored = [json.loads(raw) for raw in redis_client.lrange(queue_name, 0, -1)]
    index = next(i for i, message in enumerate(stored) if message["headers"]["id"] == task_id)
    stored[index]["body"] = base64.b64encode(b'[[1, 2], {}, {').decode()
    redis_client.lset(queue_name, index, json.dumps(stored[index]))
    return task_id


def test_an_operator_requeues_and_drops_real_dead_letters_in_chromium(
        browser, web, console_ini, redis_client, queue_name, dead_key, ws_celery_worker_factory, subprocess_env,
        tmp_path):
    from pyramid.paster import get_appsettings
    from selenium.webdriver.common.by import By

    from tests.apps.console_app import main
    from websauna_tasks import get_celery
    from websauna_tasks.deadletter import list_dead_letters

    router = main({}, **get_appsettings(console_ini))
    celery = get_celery(router.registry)
    unknown = celery.send_task("tests.no_such_task", args=("<b>bold</b>",), queue=queue_name).id
    broken = forge_undecodable(celery, redis_client, queue_name)
    extra = [celery.send_task("tests.no_such_task", args=(n,), queue=queue_name).id for n in range(2)]
    worker = ws_celery_worker_factory(console_ini, "worker", "-c", "1", "--without-gossip", "--without-mingle",
                                      env=subprocess_env)
    letters = lambda: {entry["id"]: entry for entry in list_dead_letters(celery)}  # noqa: E731
    wait_for(lambda: set(letters()) == {unknown, broken, *extra}, describe=worker.output)
    assert letters()[broken]["kind"] == "undecodable" and letters()[unknown]["kind"] == "unknown_task"
    ran = celery.send_task("tests.add", args=(2, 3), queue=queue_name).id

    driver = browser
    with screenshot_on_failure(driver, tmp_path / "console-failure.png"):
        driver.get(web + "/_tasks/")
        assert "403" in driver.title or "Forbidden" in driver.page_source
        driver.add_cookie({"name": "test_user", "value": "operator", "path": "/"})
        driver.get(web + "/_tasks/dead-letters")
        assert driver.title.startswith("Dead letters")
        rows = {row.get_attribute("data-id"): row for row in driver.find_elements(By.CSS_SELECTOR, "tr[data-id]")}
        assert set(rows) == {unknown, broken, *extra}
        assert "<b>bold</b>" in rows[unknown].text  # shown as text, not markup
        first_seen = letters()[unknown]["timestamp"]

        # Requeue: the worker meets it again and puts it back among the dead letters.
        click_and_load(driver, rows[unknown].find_element(By.CSS_SELECTOR, "button.requeue"))
        assert "Requeued 1." in driver.find_element(By.CSS_SELECTOR, "p.notice").text
        wait_for(lambda: letters().get(unknown, {}).get("timestamp", first_seen) > first_seen
                 and redis_client.llen(queue_name) == 0, describe=worker.output)
        assert len(letters()) == 4
        # A new entry, which keeps the first time (carried by the requeued message) and counts two.
        again = letters()[unknown]
        assert (again["first_seen"], again["times"]) == (first_seen, 2) and again["timestamp"] > first_seen

        # Drop one: a confirmation first, then it is gone.
        driver.get(web + "/_tasks/dead-letters")
        row = driver.find_element(By.CSS_SELECTOR, f'tr[data-id="{unknown}"]')
        assert "dead-lettered 2 times" in row.find_element(By.CSS_SELECTOR, "td.last-seen").text
        first_shown = row.find_element(By.CSS_SELECTOR, "td.first-seen time").get_attribute("datetime")
        last_shown = row.find_element(By.CSS_SELECTOR, "td.last-seen time").get_attribute("datetime")
        assert first_shown <= last_shown
        click_and_load(driver, driver.find_element(By.CSS_SELECTOR, f'tr[data-id="{broken}"] button.drop'))
        assert "Drop 1 dead letter(s)?" in driver.find_element(By.TAG_NAME, "h1").text
        assert broken in letters()
        click_and_load(driver, driver.find_element(By.ID, "confirm"))
        assert "Dropped 1." in driver.find_element(By.CSS_SELECTOR, "p.notice").text
        assert broken not in letters()

        # Bulk: tick two, drop them, confirm.
        for task_id in extra:
            driver.find_element(By.CSS_SELECTOR, f'input[name="ids"][value="{task_id}"]').click()
        click_and_load(driver, driver.find_element(By.CSS_SELECTOR, 'button[name="action"][value="drop"]'))
        assert "Drop 2 dead letter(s)?" in driver.find_element(By.TAG_NAME, "h1").text
        click_and_load(driver, driver.find_element(By.ID, "confirm"))
        assert "Dropped 2." in driver.find_element(By.CSS_SELECTOR, "p.notice").text
        assert set(letters()) == {unknown}

        # The run the real worker made: state, host and pid on the Tasks page.
        wait_for(lambda: ran in (driver.get(web + "/_tasks/tasks") or driver.page_source), timeout=30)
        row = driver.find_element(By.XPATH, f'//tr[.//small[text()="{ran}"]]')
        assert "SUCCESS" in row.text and "pid " in row.text and "celery@" in row.text
        driver.get(web + "/_tasks/")
        overview = driver.page_source
        assert "unknown_task" in overview and queue_name in overview
        assert driver.find_element(By.CSS_SELECTOR, "link[rel=stylesheet]").get_attribute("href").endswith(
            "/_tasks/static/console.css")
        # The stylesheet is Pyramid's static view, and it applied: the header is dark.
        assert driver.find_element(By.CSS_SELECTOR, "header.top").value_of_css_property(
            "background-color") == "rgba(29, 36, 48, 1)"


def test_a_failing_browser_test_leaves_a_screenshot(browser, web, tmp_path, capsys):
    path = tmp_path / "shot.png"
    with pytest.raises(AssertionError):
        with screenshot_on_failure(browser, path):
            browser.get(web + "/_tasks/")
            raise AssertionError("on purpose")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(path) in capsys.readouterr().out
