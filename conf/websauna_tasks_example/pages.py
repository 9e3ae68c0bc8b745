"""HTML for the example, as plain strings: no template engine to install."""
from __future__ import annotations

import datetime
import json
import typing as t
from html import escape

from .models import AfterResponseLog, Heartbeat, Message, MessageStats, WordCount, WordCountRequest

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>websauna_tasks example</title>
{refresh}
<style>
body {{ font-family: sans-serif; max-width: 70rem; margin: 2rem auto; padding: 0 1rem; }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ border-bottom: 1px solid #ddd; padding: .3rem; text-align: left; font-size: .9rem; vertical-align: top; }}
.pending {{ color: #a60; }} .processed {{ color: #070; }} .error {{ color: #b00; }}
code {{ font-size: .85rem; }} .ran-by {{ color: #555; }}
td form {{ margin: 0; }} td ul {{ margin: .2rem 0; padding-left: 1rem; }}
</style>
</head>
<body>
<h1>websauna_tasks example</h1>
<p id="mode">{mode}</p>
<p id="results">{results}</p>
{console}
{error}
<form method="post" action="{post_url}">
  <label>Message <input name="text" maxlength="200" required autofocus></label>
  <button type="submit">Save and process in a task</button>
</form>
<form method="post" action="{fail_url}">
  <button type="submit">Schedule a task that fails</button>
</form>
<h2>Heartbeat (periodic task from the INI's beat_schedule)</h2>
<p id="heartbeat" data-beats="{beats}">{heartbeat}</p>
<h2>Message count (periodic task declared in code: <code>@task(periodic=timedelta(seconds=10))</code>)</h2>
<p id="message-stats" data-runs="{stats_runs}">{stats}</p>
<h2>After the response (<code>run_after_response</code>)</h2>
<p id="after-response" data-count="{after_count}">{after_text}</p>
<ul id="after-response-log">{after_lines}</ul>
<h2>Messages (newest first) <a href="{home_url}">reload</a></h2>
<table>
<tr><th>#</th><th>text</th><th>state</th><th>done by the task</th>
<th>task id (scheduled / seen by the task)</th><th>words, counted later with <code>defer()</code></th></tr>
{rows}
</table>
</body>
</html>
"""

ROW = """<tr id="message-{id}" data-state="{state}">
<td>{id}</td><td>{text}</td><td class="{state}">{state}</td><td>{result}</td>
<td class="task-ids">{scheduled}<br>{seen}</td>
<td class="words">{words}</td>
</tr>"""

WORDS = """<form method="post" action="{url}"><button type="submit">{button}</button></form>
{count}<ul>{requests}</ul>"""

MESSAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Message {id}</title></head>
<body><h1>Message {id}</h1><p id="text">{text}</p><p id="state">{state}</p>
<p><a href="{home_url}">back</a></p></body></html>
"""

TASK = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Task {task_id}</title>{refresh}
<style>body {{ font-family: sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; }}
pre {{ background: #f4f4f4; padding: .5rem; overflow-x: auto; }}</style></head>
<body><h1>Task <code>{task_id}</code></h1>
<p id="backend">{backend}</p>
{body}
<p><a href="{home_url}">back</a></p></body></html>
"""

#: A task that has not run yet, or that the backend has never heard of: Celery cannot tell them apart.
PENDING_TEXT = ("PENDING: not run yet, or unknown to the result backend (Celery cannot tell the two apart). "
                "This page reloads itself until the state changes.")


def _time(value: datetime.datetime | None) -> str:
    return value.strftime("%H:%M:%S UTC") if value else ""


class TaskLinks:
    """How the page links task ids: the /tasks/{id} URL, and the worker process that ran each, when known."""

    def __init__(self, url: t.Callable[[str], str], ran_by: t.Mapping[str, str]):
        self.url = url
        #: task id -> "celery@host, pid 1234"
        self.ran_by = ran_by

    def __call__(self, task_id: str) -> str:
        return self.url(task_id)


def task_link(task_id: str | None, task_url: t.Callable[[str], str]) -> str:
    """A task id as shown everywhere on the page: a link to its /tasks/{id} page, and who ran it."""
    if not task_id:
        return "<code></code>"
    link = f'<a class="task" href="{escape(task_url(task_id))}"><code>{escape(task_id)}</code></a>'
    ran_by = task_url.ran_by.get(task_id) if isinstance(task_url, TaskLinks) else None
    if ran_by:
        link += f' <small class="ran-by">ran on {escape(ran_by)}</small>'
    return link


def mode_text(eager: bool, broker: str) -> str:
    if eager:
        return ("Eager mode (task_always_eager): tasks run in this web process right after the "
                "request's transaction commits. No worker, no beat.")
    return (f"Tasks go through the broker <code>{escape(broker)}</code> to a Celery worker "
            "after the request's transaction commits.")


def results_text(backend: str | None, eager: bool, store_eager: bool) -> str:
    if backend is None:
        return ("No result backend (<code>result_backend</code> is not set): the task pages can only say that "
                "Celery keeps no states or return values.")
    text = (f"Results (state, return value or error) are stored in <code>{escape(backend)}</code>: "
            "every task id on this page links to its <code>/tasks/&lt;id&gt;</code> page.")
    if eager and not store_eager:
        text += (" In eager mode Celery stores nothing unless <code>task_store_eager_result</code> is set, "
                 "so the task pages will show PENDING.")
    return text


def heartbeat_text(heartbeat: Heartbeat | None, eager: bool, task_url: t.Callable[[str], str]) -> str:
    if heartbeat is not None and heartbeat.beats:
        return (f"{heartbeat.beats} beats, the last at {_time(heartbeat.last_at)} "
                f"(task {task_link(heartbeat.last_task_id, task_url)}).")
    if eager:
        return "No beats: beat does not run in eager mode."
    return "No beats yet: they come every 5 seconds while <code>ws-celery conf/example.ini -- beat</code> runs."


def stats_text(stats: MessageStats | None, eager: bool, task_url: t.Callable[[str], str]) -> str:
    if stats is not None and stats.runs:
        return (f'<span id="stats-figures" data-messages="{stats.messages}" data-processed="{stats.processed}">'
                f"{stats.messages} messages, {stats.processed} of them processed</span>, "
                f"counted at {_time(stats.last_at)} by task {task_link(stats.last_task_id, task_url)} "
                f"(run {stats.runs}). <code>example.count_messages</code> is an <code>async def</code> task that "
                "nothing in the INI mentions: <code>config.scan()</code> put it in beat's schedule.")
    if eager:
        return "Not counted: beat does not run in eager mode."
    return ("Not counted yet: beat sends <code>example.count_messages</code> every 10 seconds "
            "(declared with <code>@task(periodic=...)</code> in tasks.py, not in the INI).")


def after_response_parts(log: AfterResponseLog) -> tuple[int, str, str]:
    count, lines = log.snapshot()
    text = (f"Callbacks run: {count}. The message form registers one with <code>run_after_response</code>; it "
            "runs in this web process after the response has been sent, and only if the request committed. "
            "Kept in memory: a restart starts again from 0.")
    items = "\n".join(f"<li>{escape(line)}</li>" for line in reversed(lines))
    return count, text, items


def words_cell(count: WordCount | None, requests: list[WordCountRequest], *, url: str, delay: int | None,
               task_url: t.Callable[[str], str]) -> str:
    """The defer() column; ``delay`` is None in eager mode, where a countdown is not waited for."""
    if count is not None:
        counted = (f'<span class="word-count" data-words="{count.words}" data-runs="{count.runs}">'
                   f"{count.words} words</span>, counted at {_time(count.counted_at)} by task "
                   f"{task_link(count.task_id, task_url)} (runs of count_words so far: {count.runs})")
    else:
        counted = '<span class="word-count-none">not counted yet</span>'
    items = []
    for item in requests:
        if item.reused:
            what = (f"a task of that name was still pending: <strong>reused task</strong> "
                    f"{task_link(item.task_id, task_url)}, nothing sent")
        else:
            what = f"sent task {task_link(item.task_id, task_url)}"
        items.append(f'<li class="word-request" data-task-id="{escape(item.task_id)}" '
                     f'data-reused="{int(item.reused)}">click at {_time(item.requested_at)}: {what}</li>')
    if requests and (count is None or count.task_id != requests[-1].task_id):
        items[-1] = items[-1].replace("</li>", " <em>(waiting for it)</em></li>")
    button = "Count the words" if delay is None else f"Count the words in {delay} s"
    return WORDS.format(url=escape(url), button=button, count=counted, requests="\n".join(items))


def message_row(message: Message, words: str, task_url: t.Callable[[str], str]) -> str:
    state = "processed" if message.processed else "pending"
    if message.processed:
        result = (f"{escape(message.shouted or '')} at {_time(message.processed_at)}, "
                  f'<a href="{escape(message.link or "")}">{escape(message.link or "")}</a>')
    else:
        result = "waiting for the task..."
    return ROW.format(
        id=message.id, text=escape(message.text), state=state, result=result,
        scheduled=task_link(message.scheduled_task_id, task_url),
        seen=task_link(message.processed_by_task_id, task_url),
        words=words,
    )


def home_page(*, rows: list[str], heartbeat: Heartbeat | None, stats: MessageStats | None,
              after_response: AfterResponseLog, eager: bool, broker: str, backend: str | None, store_eager: bool,
              post_url: str, fail_url: str, home_url: str, task_url: t.Callable[[str], str], error: str = "",
              refresh: bool = False, console_url: str | None = None) -> str:
    after_count, after_text, after_lines = after_response_parts(after_response)
    return PAGE.format(
        # Reload by itself while a task it just scheduled has not run yet.
        refresh='<meta http-equiv="refresh" content="2">' if refresh else "",
        mode=mode_text(eager, broker),
        results=results_text(backend, eager, store_eager),
        error=f'<p class="error">{escape(error)}</p>' if error else "",
        console=(f'<p id="console">The <a href="{escape(console_url)}">operator console</a> shows the queues, workers, '
                 "dead letters, runs and the periodic schedule.</p>") if console_url else "",
        post_url=escape(post_url), fail_url=escape(fail_url), home_url=escape(home_url),
        beats=heartbeat.beats if heartbeat is not None else 0,
        heartbeat=heartbeat_text(heartbeat, eager, task_url),
        stats_runs=stats.runs if stats is not None else 0,
        stats=stats_text(stats, eager, task_url),
        after_count=after_count, after_text=after_text, after_lines=after_lines,
        rows="\n".join(rows),
    )


def message_page(message: Message, home_url: str) -> str:
    state = f"processed at {_time(message.processed_at)}" if message.processed else "pending"
    return MESSAGE.format(id=message.id, text=escape(message.text), state=state, home_url=escape(home_url))


def _json(value: t.Any) -> str:
    return json.dumps(value, indent=2, default=repr, ensure_ascii=False)


def task_page(task_id: str, *, backend: str | None, eager: bool, home_url: str, state: str = "",
              ready: bool = False, name: str | None = None, value: t.Any = None, traceback: str | None = None,
              date_done: datetime.datetime | None = None) -> str:
    if backend is None:
        why = " (eager mode keeps none either)" if eager else ""
        body = ('<p id="state" data-state="">No result backend is configured (<code>result_backend</code> in the '
                f"INI's <code>websauna.celery_config</code>), so Celery keeps no state or return value{why}.</p>")
        return TASK.format(task_id=escape(task_id), refresh="", backend="result backend: none", body=body,
                           home_url=escape(home_url))
    parts = [f'<p id="state" data-state="{escape(state)}">'
             f"{escape(PENDING_TEXT if state == 'PENDING' else state)}</p>"]
    if name:
        parts.append(f'<p id="name">task <code>{escape(name)}</code></p>')
    if date_done is not None:
        # Celery's backends keep date_done in UTC; the SQL one hands it back without a time zone.
        if date_done.tzinfo is not None:
            date_done = date_done.astimezone(datetime.timezone.utc).replace(tzinfo=None)  # noqa: UP017
        parts.append(f'<p id="date-done">done at {_time(date_done)}</p>')
    if state == "SUCCESS":
        parts.append(f'<h2>Return value</h2><pre id="value">{escape(_json(value))}</pre>')
    elif state in ("FAILURE", "RETRY", "REVOKED"):
        parts.append(f'<h2>Error</h2><pre id="error">{escape(repr(value))}</pre>')
        if traceback:
            parts.append(f'<details open><summary>traceback</summary><pre id="traceback">{escape(traceback)}</pre>'
                         "</details>")
    return TASK.format(
        task_id=escape(task_id),
        refresh="" if ready else '<meta http-equiv="refresh" content="2">',
        backend=f"result backend: <code>{escape(backend)}</code>",
        body="\n".join(parts),
        home_url=escape(home_url),
    )
