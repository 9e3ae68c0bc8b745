"""``defer(fn, *args, **kwargs)``: run a plain function later in a worker.

For users of App Engine's ``deferred``, The Blue Alliance's ``defer`` and
djangae's ``defer``. The function travels as its dotted path and its
arguments as JSON, never pickle: a pickled message lets whoever can write to
the broker run anything. The path is a second line of defence, because a
forged JSON message can still name ``os:system``: the worker runs only
functions whose module is in ``websauna_tasks.defer_allowed_modules`` (by
default the application's own package) or that carry :func:`deferrable`, and
it checks the path *before* importing anything, since importing a module is
already running its code.

Every deferred call is one task, ``websauna_tasks.deferred``, a
:class:`~websauna_tasks.tasks.TransactionalTask`: the function runs in a
task request whose transaction commits when it returns, and the on-commit
dispatch of ``dispatch.py`` sends it, so there is one way of waiting for a
commit, not two.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import logging
import typing as t
from datetime import datetime

import celery
from celery.utils import uuid
from pyramid.exceptions import ConfigurationError
from pyramid.registry import Registry
from pyramid.threadlocal import get_current_registry

from .async_dispatch import off_loop, running_loop
from .dispatch import send, transaction_to_wait_for
from .registry import ICeleryApp
from .request import current_task_request
from .tasks import TaskProxy, TransactionalTask, task

if t.TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger(__name__)

#: The one Celery task that runs every deferred call.
DEFERRED_TASK_NAME = "websauna_tasks.deferred"
#: Setting: module prefixes whose functions a worker may run for defer() (whitespace or comma separated).
ALLOWED_MODULES_KEY = "websauna_tasks.defer_allowed_modules"
_ALLOWED_KEY = "websauna_tasks.defer_allowed_prefixes"

# "module:qualname" of functions marked with @deferrable. A worker knows the
# marks of the modules it has imported (the app's own, scanned ones).
_marked: set[str] = set()


class DeferNotAllowed(PermissionError):
    """The function is outside ``websauna_tasks.defer_allowed_modules`` and not marked ``@deferrable``."""


F = t.TypeVar("F", bound=t.Callable[..., t.Any])


def deferrable(fn: F) -> F:
    """Allow ``defer(fn)`` for a function outside the allowed modules."""
    # The module's name is not bound to fn yet while the decorator runs:
    # only the shape is checked here, the lookup when it is deferred.
    _marked.add(_path_of(fn))
    return fn


def function_path(fn: t.Callable[..., t.Any]) -> str:
    """``module:qualname`` of a module-level function, static method or class method; TypeError otherwise."""
    path = _path_of(fn)
    module, _, qualname = path.partition(":")
    try:
        found = _lookup(module, qualname)
    except (ImportError, AttributeError):
        found = None
    if found is not fn and found != fn:
        raise TypeError(f"defer(): {fn!r} cannot be found again as {path} (is it shadowed or decorated?)")
    problem = target_problem(module, qualname, found)
    if problem is not None:
        raise TypeError(f"defer(): {path} {problem}")
    return path


def target_problem(module: str, qualname: str, target: t.Any) -> str | None:
    """Why ``target`` (found at ``module:qualname``) may not be deferred, or None when it may.

    One rule for ``defer()`` in the caller and for the worker's intake: a
    forged message must not reach what the call refuses. Plain functions,
    static methods and class methods only; a task would skip its queue's
    limits, its idempotency and its unique name, a class would be built from
    message data, and an unbound method would take any ``self``.
    """
    if isinstance(target, (TaskProxy, celery.Task)):
        return "is a @task; call its .apply_async() or .defer() instead"
    if isinstance(target, type):
        return "is a class, not a function"
    if not callable(target):
        return "is not callable"
    owner_path, _, attribute = qualname.rpartition(".")
    if not owner_path:
        return None
    try:
        owner = _lookup(module, owner_path)
    except (ImportError, AttributeError):
        return "cannot be found again through its owner"
    if not isinstance(owner, type):
        return "is not a module-level function, static method or class method"
    if not isinstance(inspect.getattr_static(owner, attribute, None), (staticmethod, classmethod)):
        return "is a method that needs an instance; defer a staticmethod or classmethod and pass the instance's id"
    return None


def _path_of(fn: t.Callable[..., t.Any]) -> str:
    if isinstance(fn, TaskProxy):
        raise TypeError(f"defer(): {fn!r} is a @task; call its .apply_async() instead")
    if isinstance(fn, functools.partial):
        raise TypeError("defer(): a functools.partial cannot travel as JSON; pass its arguments to defer()")
    owner = getattr(fn, "__self__", None)
    if owner is not None and not isinstance(owner, type) and not _is_module(owner):
        raise TypeError(
            f"defer(): {fn!r} is a method bound to an instance, which cannot travel as JSON; defer a "
            "module-level function, a staticmethod or a classmethod and pass the instance's id")
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not module or not qualname or "<" in qualname:
        raise TypeError(f"defer(): {fn!r} is not a module-level function (lambdas and nested functions "
                        "cannot be found again by a worker)")
    return f"{module}:{qualname}"


def _is_module(value: t.Any) -> bool:
    return type(value).__name__ == "module"


def _lookup(module: str, qualname: str) -> t.Any:
    target: t.Any = importlib.import_module(module)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


def allowed_prefixes(registry: Registry) -> tuple[str, ...]:
    prefixes = registry.get(_ALLOWED_KEY)
    if prefixes is None:
        raise ConfigurationError("defer() needs config.include('websauna_tasks')")
    return prefixes


def configure_allowed_modules(registry: Registry, root_package: str | None) -> None:
    """Take ``websauna_tasks.defer_allowed_modules`` from the settings layer; by default the application's package."""
    from .settings import get_task_settings  # parsed and checked there (settings.py)

    prefixes = get_task_settings(registry).defer_allowed_modules
    if prefixes is None:
        prefixes = (root_package,) if root_package else ()
    registry[_ALLOWED_KEY] = prefixes


def check_allowed(path: str, prefixes: t.Iterable[str]) -> None:
    """Refuse ``path`` unless marked or in an allowed module, without importing anything."""
    if path in _marked:
        return
    module = path.partition(":")[0]
    if any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes):
        return
    raise DeferNotAllowed(
        f"defer(): {path} is not allowed: its module is not in {ALLOWED_MODULES_KEY} "
        f"({' '.join(prefixes) or 'empty'}) and the function is not marked @deferrable")


def _app_of(registry: Registry | None) -> tuple[Celery, Registry]:
    if registry is None:
        request = current_task_request()
        registry = request.registry if request is not None else get_current_registry()
    app = registry.queryUtility(ICeleryApp)
    if app is None:
        raise ConfigurationError(
            "defer() found no Celery app: call it inside a request or a task of an app that includes "
            "websauna_tasks, or pass _registry=app.registry (e.g. from pyramid.paster.bootstrap)")
    return app, registry


def queue_option(app: Celery, queue: str | None) -> str | None:
    """The ``queue`` option for a ``_queue`` of ``defer()``: None means the app's default queue."""
    # "default" is what defer()'s users call the queue everybody consumes;
    # Celery's is task_default_queue ("celery" unless configured).
    if queue is None or (queue == "default" and queue not in app.amqp.queues):
        return None
    return queue


def defer(fn: t.Callable[..., t.Any], *args: t.Any, _queue: str | None = "default",
          _countdown: float | None = None, _eta: datetime | None = None, _name: str | None = None,
          _transactional: bool | None = None, _tm: t.Any = None, _raise_if_enqueued: bool = False,
          _registry: Registry | None = None, **kwargs: t.Any) -> str:
    """Run ``fn(*args, **kwargs)`` later in a worker and return the task id.

    - ``_queue``: queue name; ``"default"`` is the app's ``task_default_queue``
      unless a queue named ``default`` is declared.
    - ``_countdown`` (seconds) wins over ``_eta`` (an aware ``datetime``).
    - ``_name``: while a task of that name is pending (or ran within
      ``websauna_tasks.name_retention_seconds``), return its id instead of
      sending another one, or raise :class:`AlreadyEnqueued` with
      ``_raise_if_enqueued=True``.
    - ``_transactional``: ``True`` sends after the commit of ``_tm`` (or of
      the current request's / thread's transaction), ``False`` sends now,
      ``None`` (default) sends after the commit when a transaction is active.
    """
    path = function_path(fn)
    app, registry = _app_of(_registry)
    check_allowed(path, allowed_prefixes(registry))
    manager = transaction_to_wait_for(_transactional, _tm)
    runner = app.tasks[DEFERRED_TASK_NAME]

    options: dict[str, t.Any] = {"serializer": "json"}
    queue = queue_option(app, _queue)
    if queue is not None:
        options["queue"] = queue
    if _countdown is not None:
        options["countdown"] = _countdown
    elif _eta is not None:
        options["eta"] = _eta
    if manager is None and app.conf.task_always_eager:
        # As if the function had been called: its error reaches the caller.
        options["throw"] = True
    task_id = uuid()
    # The checks (the function's own arguments), the name claim and the way
    # out are the send pipeline's, as for apply_async (dispatch.py).
    sent = send(runner, (path, list(args), dict(kwargs)), {}, options, tm=manager, task_id=task_id,
                unique_name=_name, raise_if_enqueued=_raise_if_enqueued, what=f"defer({path})",
                arguments=(args, kwargs))
    if sent.id != task_id:
        logger.info("defer(%s): a task named %r is already enqueued as %s", path, _name, sent.id)
    return sent.id


def defer_async(fn: t.Callable[..., t.Any], *args: t.Any, _queue: str | None = "default",
                _countdown: float | None = None, _eta: datetime | None = None, _name: str | None = None,
                _transactional: bool | None = None, _tm: t.Any = None, _raise_if_enqueued: bool = False,
                _registry: Registry | None = None, **kwargs: t.Any) -> t.Coroutine[t.Any, t.Any, str]:
    """``await defer_async(fn, *args, **kwargs)``: :func:`defer` from a coroutine, returns the task id.

    The same options and refusals, raised from the ``await``. The app and the
    transaction are looked up at the call, on the loop's thread (both may be
    thread locals); a message sent now then goes through :func:`defer`, and
    so the send pipeline, in the publisher thread, off the event loop
    (websauna_tasks/async_dispatch.py). RuntimeError at the call when no
    event loop is running.
    """
    loop = running_loop("defer_async()", "defer()")
    registry = _app_of(_registry)[1]
    manager = transaction_to_wait_for(_transactional, _tm)
    call = functools.partial(
        defer, fn, *args, _queue=_queue, _countdown=_countdown, _eta=_eta, _name=_name,
        _transactional=manager is not None, _tm=manager, _raise_if_enqueued=_raise_if_enqueued,
        _registry=registry, **kwargs)
    return _defer_when_awaited(loop, call, held=manager is not None)


async def _defer_when_awaited(loop: t.Any, call: t.Callable[[], str], held: bool) -> str:
    if held:
        # Held for the commit on this thread, whose transaction.manager it may be: nothing is published yet.
        return call()
    return await off_loop(loop, call)


# dont_autoretry_for: a refused path stays refused, whatever a declared queue's max_attempts says.
@task(name=DEFERRED_TASK_NAME, base=TransactionalTask, bind=True, serializer="json",
      dont_autoretry_for=(DeferNotAllowed,))
def run_deferred(self: t.Any, path: str, args: list, kwargs: dict) -> t.Any:
    """The worker side: the intake has checked the call already; checked again for eager runs and test drains."""
    registry = self.get_request().registry
    try:
        func = resolve_deferred(path, args, kwargs, allowed_prefixes(registry))
    except DeferNotAllowed as exc:
        logger.error("websauna_tasks: refused deferred call (task id %s): %s", self.request.id, exc)
        raise
    return func(*args, **kwargs)


def resolve_deferred(path: t.Any, args: t.Any, kwargs: t.Any, prefixes: t.Iterable[str]) -> t.Callable[..., t.Any]:
    """The function a deferred-call message names, or :class:`DeferNotAllowed` saying why not.

    The path is checked against the allow-list before anything is imported
    (importing a module runs its code), then resolved and held to the same
    rule as ``defer()`` in the caller (:func:`target_problem`).
    """
    if not isinstance(path, str) or path.count(":") != 1:
        raise DeferNotAllowed(f"malformed function path {path!r}"[:300])
    check_allowed(path, prefixes)
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise DeferNotAllowed(f"malformed arguments for {path}")
    try:
        func = resolve_path(path)
    except (ImportError, AttributeError) as exc:
        raise DeferNotAllowed(f"refused deferred call {path}: cannot be found ({type(exc).__name__}: {exc})") from None
    module, _, qualname = path.partition(":")
    problem = target_problem(module, qualname, func)
    if problem is not None:
        raise DeferNotAllowed(f"refused deferred call {path}: it {problem}")
    return func


def resolve_path(path: str) -> t.Callable[..., t.Any]:
    """Import ``module:qualname`` and return what it names; ImportError/AttributeError when it is not there.

    :class:`DeferNotAllowed` for a path that is not a plain qualified name or
    names an object defined in another module. Check the allow-list first.
    """
    module, _, qualname = path.partition(":")
    if not all(part.isidentifier() for part in module.split(".")):
        raise DeferNotAllowed(f"refused deferred call {path}: not a module name")
    if any(not part.isidentifier() or part.startswith("__") for part in qualname.split(".")):
        raise DeferNotAllowed(f"refused deferred call {path}: not a plain qualified name")
    func = _lookup(module, qualname)
    # The allow-list is about where a function is defined: a module of the
    # app that imports os must not make "myapp.views:os.system" callable.
    if getattr(func, "__module__", None) != module or getattr(func, "__qualname__", None) != qualname:
        raise DeferNotAllowed(f"refused deferred call {path}: it names an object defined elsewhere")
    return func
