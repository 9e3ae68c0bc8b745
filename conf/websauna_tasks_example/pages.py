"""HTML for the example, as plain strings: no template engine to install."""
from __future__ import annotations

import datetime
from html import escape

from .models import Heartbeat, Message

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>websauna_tasks example</title>
{refresh}
<style>
body {{ font-family: sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ border-bottom: 1px solid #ddd; padding: .3rem; text-align: left; font-size: .9rem; }}
.pending {{ color: #a60; }} .processed {{ color: #070; }} .error {{ color: #b00; }}
code {{ font-size: .85rem; }}
</style>
</head>
<body>
<h1>websauna_tasks example</h1>
<p id="mode">{mode}</p>
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
<h2>Messages (newest first) <a href="{home_url}">reload</a></h2>
<table>
<tr><th>#</th><th>text</th><th>state</th><th>done by the task</th><th>task id (scheduled / seen by the task)</th></tr>
{rows}
</table>
</body>
</html>
"""

ROW = """<tr id="message-{id}" data-state="{state}">
<td>{id}</td><td>{text}</td><td class="{state}">{state}</td><td>{result}</td>
<td><code>{scheduled}</code><br><code>{seen}</code></td>
</tr>"""

MESSAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Message {id}</title></head>
<body><h1>Message {id}</h1><p id="text">{text}</p><p id="state">{state}</p>
<p><a href="{home_url}">back</a></p></body></html>
"""


def _time(value: datetime.datetime | None) -> str:
    return value.strftime("%H:%M:%S UTC") if value else ""


def mode_text(eager: bool, broker: str) -> str:
    if eager:
        return ("Eager mode (task_always_eager): tasks run in this web process right after the "
                "request's transaction commits. No worker, no beat.")
    return (f"Tasks go through the broker <code>{escape(broker)}</code> to a Celery worker "
            "after the request's transaction commits.")


def heartbeat_text(heartbeat: Heartbeat | None, eager: bool) -> str:
    if heartbeat is not None and heartbeat.beats:
        return (f"{heartbeat.beats} beats, the last at {_time(heartbeat.last_at)} "
                f"(task <code>{escape(heartbeat.last_task_id or '')}</code>).")
    if eager:
        return "No beats: beat does not run in eager mode."
    return "No beats yet: they come every 5 seconds while <code>ws-celery conf/example.ini -- beat</code> runs."


def message_row(message: Message) -> str:
    state = "processed" if message.processed else "pending"
    if message.processed:
        result = (f"{escape(message.shouted or '')} at {_time(message.processed_at)}, "
                  f'<a href="{escape(message.link or "")}">{escape(message.link or "")}</a>')
    else:
        result = "waiting for the task..."
    return ROW.format(
        id=message.id, text=escape(message.text), state=state, result=result,
        scheduled=escape(message.scheduled_task_id or ""), seen=escape(message.processed_by_task_id or ""),
    )


def home_page(*, messages: list[Message], heartbeat: Heartbeat | None, eager: bool, broker: str,
              post_url: str, fail_url: str, home_url: str, error: str = "", refresh: bool = False) -> str:
    return PAGE.format(
        # Reload by itself while a task it just scheduled has not run yet.
        refresh='<meta http-equiv="refresh" content="2">' if refresh else "",
        mode=mode_text(eager, broker),
        error=f'<p class="error">{escape(error)}</p>' if error else "",
        post_url=escape(post_url), fail_url=escape(fail_url), home_url=escape(home_url),
        beats=heartbeat.beats if heartbeat is not None else 0,
        heartbeat=heartbeat_text(heartbeat, eager),
        rows="\n".join(message_row(m) for m in messages),
    )


def message_page(message: Message, home_url: str) -> str:
    state = f"processed at {_time(message.processed_at)}" if message.processed else "pending"
    return MESSAGE.format(id=message.id, text=escape(message.text), state=state, home_url=escape(home_url))
