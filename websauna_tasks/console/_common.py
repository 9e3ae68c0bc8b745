"""What every console page shares: its settings, the layout's values, times, paging and input checks.

Nothing here writes: the pages read the app's state (state.py) and the
public functions of the modules that keep it, and the actions call the same
public functions as ``ws-celery INI -- ...`` (operator_commands.py).
"""
from __future__ import annotations

import dataclasses
import datetime
import math
import pathlib
import re
import time
import typing as t

from pyramid.csrf import get_csrf_token
from pyramid.httpexceptions import HTTPBadRequest

from ..registry import get_celery
from ..settings import mask_password

if t.TYPE_CHECKING:
    from celery import Celery
    from pyramid.request import Request

REGISTRY_KEY = "websauna_tasks.console_mounted"
#: The renderer extension of the console's templates: its own, so that an application's
#: ``jinja2.*`` settings (autoescape among them) never change how the console renders.
RENDERER = ".wstasks"
#: The console's CSS, served by add_static_view under the prefix.
STATIC_DIR = pathlib.Path(__file__).parent / "static"
#: Rows on one page of a long list (dead letters, outbox rows, runs).
PAGE_SIZE = 50
#: Ids in one bulk action at most: one form of checkboxes is one page.
MAX_BULK = 200
#: Auto-refresh intervals offered, in seconds (0: off).
REFRESH_CHOICES = (0, 5, 15, 60)

# Task ids are uuids in practice; anything a worker could have been given is allowed,
# but not markup, whitespace or a length that would make a page or a Redis scan heavy.
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+=-]{0,199}", re.ASCII)


@dataclasses.dataclass(frozen=True)
class ConsoleConfig:
    """How the console was mounted (kept on the registry by includeme)."""

    prefix: str
    permission: str
    #: Mounted without a security policy (websauna_tasks.console_insecure): every page says so.
    insecure: bool
    #: Runs kept for the Tasks page (0: none).
    recent_runs: int


def console_config(request: Request) -> ConsoleConfig:
    return request.registry[REGISTRY_KEY]


def app_of(request: Request) -> Celery:
    return get_celery(request.registry)


# -- input ------------------------------------------------------------------------------------------------------

def page_number(request: Request, pages: int) -> int:
    """``?page=`` within 1..pages; a forged value is clamped, text that is not a number is a 400."""
    number = whole_number(request, "page")
    return min(max(number or 1, 1), max(pages, 1))


def whole_number(request: Request, name: str) -> int | None:
    """``?name=`` as an int, None when absent; 400 for text that is not a whole number (range is the caller's)."""
    raw = request.params.get(name)
    if raw is None:
        return None
    raw = raw.strip()
    if not raw.isascii() or not re.fullmatch(r"-?[0-9]{1,30}", raw):
        raise HTTPBadRequest(f"{name} must be a whole number")
    return int(raw)


def task_id_param(raw: t.Any, what: str = "id") -> str:
    """A task id from a form or the URL; 400 for anything that cannot be one."""
    if not isinstance(raw, str) or not _ID.fullmatch(raw):
        raise HTTPBadRequest(f"{what}: not a task id")
    return raw


def refresh_seconds(request: Request) -> int:
    raw = request.params.get("refresh", "0")
    return int(raw) if raw in {str(choice) for choice in REFRESH_CHOICES} else 0


# -- times ------------------------------------------------------------------------------------------------------

def as_timestamp(value: t.Any) -> float | None:
    """Epoch seconds from a number, an aware or naive (UTC) datetime or ISO text; None when it is none."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) and abs(value) < 1e11 else None
    if isinstance(value, str):
        try:
            value = datetime.datetime.fromisoformat(value)
        except ValueError:
            return None
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.timezone.utc)
        return value.timestamp()
    return None


def relative(seconds_ago: float) -> str:
    """``5 s ago``, ``in 3 min``: short, for a table cell."""
    future = seconds_ago < 0
    span = abs(seconds_ago)
    if span < 5:
        return "just now"
    for limit, unit, size in ((60, "s", 1), (3600, "min", 60), (86400 * 2, "h", 3600), (math.inf, "d", 86400)):
        if span < limit:
            amount = f"{int(span // size)} {unit}"
            break
    return f"in {amount}" if future else f"{amount} ago"


def duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "–"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return relative(seconds).removesuffix(" ago")


class Clock:
    """Times for templates in the app's timezone: ``clock.when(ts)`` gives what the ``when`` macro shows."""

    def __init__(self, tz: datetime.tzinfo, now: float | None = None):
        self.tz = tz
        self.now = time.time() if now is None else now

    def when(self, value: t.Any) -> dict[str, str] | None:
        stamp = as_timestamp(value)
        if stamp is None:
            return None
        moment = datetime.datetime.fromtimestamp(stamp, self.tz)
        return {"relative": relative(self.now - stamp), "absolute": moment.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "iso": moment.isoformat(timespec="seconds")}

    def age(self, value: t.Any) -> str:
        stamp = as_timestamp(value)
        return duration(self.now - stamp) if stamp is not None else "–"


# -- text -------------------------------------------------------------------------------------------------------

def preview(value: t.Any, limit: int = 120) -> str:
    """One line of at most ``limit`` characters: what a table cell shows of args, results, reasons."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else repr(value)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def failure(exc: BaseException) -> str:
    """What a page says of an error: its type and message, passwords of URLs in it masked."""
    return preview(f"{type(exc).__name__}: {mask_password(str(exc))}", 300)


# -- the layout -------------------------------------------------------------------------------------------------

NAV = (("overview", "Overview"), ("dead_letters", "Dead letters"), ("outbox", "Outbox"), ("tasks", "Tasks"),
       ("periodic", "Periodic"), ("names", "Name claims"), ("health", "Health (JSON)"))


def route(name: str) -> str:
    """The console's route names: ``websauna_tasks.console.<page>``."""
    return f"websauna_tasks.console.{name}"


def page(request: Request, current: str, title: str, **values: t.Any) -> dict[str, t.Any]:
    """The values every template gets (the layout's), plus the page's own."""
    config = console_config(request)
    app = app_of(request)
    refresh = refresh_seconds(request)
    base = {
        "title": title,
        "current": current,
        "nav": [(name, label, request.route_path(route(name))) for name, label in NAV],
        "insecure": config.insecure,
        "app_name": app.main,
        "csrf_token": get_csrf_token(request),
        "clock": Clock(app.timezone),
        "refresh": refresh,
        "refresh_links": [(choice, request.current_route_path(_query={**_params(request), "refresh": choice}))
                          for choice in REFRESH_CHOICES],
        "static": request.static_path(str(STATIC_DIR / "console.css")),
        "route": lambda name, **kw: request.route_path(route(name), **kw),
        "preview": preview,
        "duration": duration,
    }
    base.update(values)
    return base


# -- confirm, then act -------------------------------------------------------------------------------------------

def unconfirmed(request: Request) -> bool:
    """Whether an action's POST still lacks the ``confirmed=yes`` that its confirmation page posts back."""
    return request.POST.get("confirmed") != "yes"


def ask(request: Request, current: str, title: str, *, action: str, back: str, target: str,
        **shown: t.Any) -> dict[str, t.Any]:
    """The confirmation page (confirm.wstasks): what ``action`` would touch, "Yes" posting to ``target``, a way back.

    Every action that cannot be undone, or touches more than one thing,
    goes through here first: a POST (with its CSRF token) shows this page,
    and only the form it shows, posted with ``confirmed=yes``, acts.
    """
    return page(request, current, title, action=action, back=back, target=target, **{"rows": [], **shown})


def _params(request: Request) -> dict[str, str]:
    return {key: value for key, value in request.GET.items() if key in ("page", "kind", "show", "before", "after")}


@dataclasses.dataclass(frozen=True)
class Pager:
    """Page ``number`` of ``pages`` over ``total`` rows, newest first."""

    number: int
    pages: int
    total: int
    size: int = PAGE_SIZE
    #: The total is a count of every row (deadletters.LetterPage may stop counting).
    exact: t.ClassVar[bool] = True

    @classmethod
    def of(cls, request: Request, total: int, size: int = PAGE_SIZE) -> Pager:
        pages = max(1, math.ceil(total / size))
        return cls(page_number(request, pages), pages, total, size)

    @property
    def offset(self) -> int:
        return (self.number - 1) * self.size

    # The query values of the pages around this one, as deadletters.LetterPage has them (None: no page that way).
    @property
    def newest(self) -> dict[str, int] | None:
        return {"page": 1} if self.number > 1 else None

    @property
    def newer(self) -> dict[str, int] | None:
        return {"page": self.number - 1} if self.number > 1 else None

    @property
    def older(self) -> dict[str, int] | None:
        return {"page": self.number + 1} if self.number < self.pages else None

    @property
    def oldest(self) -> dict[str, int] | None:
        return {"page": self.pages} if self.number < self.pages else None
