"""The example application mounts the console (conf/example.ini), and its page says which worker ran each task.

A real ws-celery worker on the example's SQLite broker: kombu's SQLAlchemy
transport has no remote control, which the overview must say rather than
show "no workers"; recent runs come from the SQLite result backend's table.
"""
from __future__ import annotations

import pathlib
import re

import pytest
import webtest
from pyramid.paster import get_app

from tests.test_example import copy_ini, message_states, post_message, row_html
from websauna_tasks.testing import wait_for

RAN_BY = re.compile(r'<small class="ran-by">ran on (celery@[^,<]+), pid (\d+)</small>')


def worker_pids(main_pid: int) -> set[int]:
    """The worker's main process and its pool children (from /proc)."""
    pids = {main_pid}
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == main_pid:
            pids.add(int(stat.parent.name))
    return pids


@pytest.mark.slow
def test_the_example_shows_the_console_and_who_ran_each_task(tmp_path, ws_celery_worker_factory):
    ini = copy_ini("conf/example.ini", tmp_path)
    app = webtest.TestApp(get_app(ini))
    home = app.get("/").text
    assert 'id="console">The <a href="http://localhost/_tasks/">operator console</a>' in home
    overview = app.get("/_tasks/").text
    # No login in the example: open, and saying so on every page.
    assert "Open to anyone." in overview
    assert "has no remote control" in overview and "sqla+sqlite" in overview
    assert "heartbeat" in overview and "example.count_messages" in overview

    worker = ws_celery_worker_factory(ini, "worker", "-c", "2", "-l", "info")
    message_id = post_message(app, "who ran me")
    page = wait_for(lambda: (p := app.get("/").text) and message_states(p)[message_id] == "processed"
                    and RAN_BY.search(row_html(p, message_id)) and p, describe=worker.output)
    host, pid = RAN_BY.search(row_html(page, message_id)).groups()
    assert int(pid) in worker_pids(worker.pid) and int(pid) != worker.pid  # a pool child ran it
    assert host in worker.output()

    tasks = app.get("/_tasks/tasks").text
    assert "the result backend&#39;s table" in tasks and "example.process_message" in tasks
    assert "state-success" in tasks and host in tasks
    periodic = app.get("/_tasks/periodic").text
    assert "every 5 seconds" in periodic and "every 10 seconds" in periodic and ">code<" in periodic
    assert app.get("/_tasks/dead-letters").status_int == 200
