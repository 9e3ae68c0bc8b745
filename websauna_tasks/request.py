"""The Pyramid request a task run gets in the worker (or in eager mode).

A worker makes one request per task run, so this path is kept cheap: what
every request of a registry shares (the blank WSGI environ for
``websauna.site_url`` and the request class carrying the methods and
properties added with ``config.add_request_method``) is built once per
registry, instead of ``Request.blank`` plus ``pyramid.scripting.prepare``
per run, which parse the URL again and create a new request class each time.
The result is the same request: fresh object, ``registry``, extensions,
``context`` from the root factory, thread locals pushed, finished callbacks
run at the end.
"""
from __future__ import annotations

import contextvars
import io
import sys
import typing as t

import transaction
from pyramid.interfaces import IRequestExtensions, IRequestFactory, IRootFactory
from pyramid.registry import Registry
from pyramid.request import Request
from pyramid.scripting import prepare
from pyramid.threadlocal import get_current_request as get_threadlocal_request
from pyramid.threadlocal import manager as threadlocal_manager
from pyramid.traversal import DefaultRootFactory
from webob.request import BaseRequest

#: Setting: base URL for ``request.route_url()`` inside tasks (settings.py).
from .settings import SITE_URL_KEY as SITE_URL_KEY
from .settings import current_site_url

_TEMPLATE_KEY = "websauna_tasks.request_template"
_MISSING: t.Any = object()

_current_request: contextvars.ContextVar[Request | None] = contextvars.ContextVar(
    "websauna_tasks_request", default=None
)


class _RequestTemplate:
    """What every task request of one registry shares, built on its first task run.

    ``key`` holds what it was built from; when the configuration changes
    afterwards (a test reusing a registry, a late ``add_request_method``),
    the template is built again rather than going stale.
    """

    def __init__(self, key: tuple):
        self.key = key
        #: ``_utilities_stamp`` of the registry when the key was last checked; None: check every run.
        self.stamp: t.Any = None
        factory, extensions, _methods, _descriptors, site_url, root_factory = key
        self.site_url = site_url
        self.root_factory = root_factory
        # Only a plain ``blank`` can be replaced by a copy of its environ: a
        # factory with its own ``blank`` or one that is not a class is called
        # every run, and gets Pyramid's own extension machinery.
        self.fast = (isinstance(factory, type) and issubclass(factory, BaseRequest)
                     and getattr(factory.blank, "__func__", None) is BaseRequest.blank.__func__)
        base_url = site_url.rstrip("/")
        self.factory = factory
        self.base_url = base_url
        if not self.fast:
            return
        environ = factory.blank("/", base_url=base_url).environ
        # Per run: a fresh body stream and the stderr of that moment (pytest swaps it).
        environ.pop("wsgi.input")
        environ.pop("wsgi.errors")
        self.environ = environ
        self.request_class = _extended_class(factory, extensions)

    def new_request(self) -> Request:
        if not self.fast:
            return self.factory.blank("/", base_url=self.base_url)
        environ = self.environ.copy()
        environ["wsgi.input"] = io.BytesIO()
        environ["wsgi.errors"] = sys.stderr
        return self.request_class(environ)


def _extended_class(factory: type, extensions: t.Any) -> type:
    """``factory`` with the request extensions as class attributes, like Pyramid's per-request subclass.

    ``apply_request_extensions`` binds each method onto the instance and
    derives a new class for the properties on every call; a function in the
    class binds the same way on attribute access, and one class serves all
    runs.
    """
    if extensions is None or not (extensions.methods or extensions.descriptors):
        return factory
    attrs: dict[str, t.Any] = {"__module__": factory.__module__}
    attrs.update(extensions.methods)
    attrs.update(extensions.descriptors)
    cls = type(factory.__name__, (factory, object), attrs)
    # As in Pyramid's InstancePropertyHelper: the class must look like its
    # parent to zope.interface, or adapter lookups would create (and keep)
    # interface specifications for it.
    for name in ("__implemented__", "__provides__"):
        value = getattr(factory, name, _MISSING)
        if value is not _MISSING:
            setattr(cls, name, value)
    return cls


def _template_for(registry: Registry) -> _RequestTemplate:
    template = registry.get(_TEMPLATE_KEY)
    site_url = current_site_url(registry.settings)
    stamp = _utilities_stamp(registry)
    if template is not None and stamp is not None and template.stamp == stamp and template.site_url == site_url:
        # No utility registered or removed since the template was built: the three looked up below are
        # the same objects, and only the extensions' contents (add_request_method mutates them) may differ.
        extensions = template.key[1]
        if extensions is None or (len(extensions.methods), len(extensions.descriptors)) == template.key[2:4]:
            return template
    extensions = registry.queryUtility(IRequestExtensions)
    key = (
        registry.queryUtility(IRequestFactory, default=Request),
        extensions,
        len(extensions.methods) if extensions is not None else 0,
        len(extensions.descriptors) if extensions is not None else 0,
        site_url,
        registry.queryUtility(IRootFactory, default=DefaultRootFactory),
    )
    if template is None or template.key != key:
        template = _RequestTemplate(key)
        registry[_TEMPLATE_KEY] = template
    template.stamp = stamp
    return template


def _utilities_stamp(registry: Registry) -> t.Any:
    """What changes whenever a utility of ``registry`` is registered or unregistered, else None.

    zope.interface counts the changes of an adapter registry in ``_generation``
    (its own lookup caches use it). A registry with bases (Pyramid's have
    none) could see a utility change in a base: it gets None, and its
    utilities are looked up every run.
    """
    utilities = registry.utilities
    if utilities.__bases__:
        return None
    return getattr(utilities, "_generation", None)


def make_task_request(registry: Registry, path: str = "/") -> Request:
    """A blank request routable with ``websauna.site_url`` and its own explicit TM.

    The transaction manager is explicit and private to this request so a task
    can never commit or abort somebody else's thread-local transaction (eager
    tasks run inside the web thread, after its commit).
    """
    template = _template_for(registry)
    request = template.new_request() if path == "/" else template.factory.blank(path, base_url=template.base_url)
    request.registry = registry
    request.tm = transaction.TransactionManager(explicit=True)
    return request


class task_request:  # noqa: N801 - used as ``with task_request(registry) as request``
    """A fresh request for one task run, closed afterwards.

    On entry the request gets the registry's request extensions
    (``dbsession``, ``celery``...), its ``context`` from the root factory, and
    is pushed on Pyramid's thread locals so ``get_current_request()`` works.
    On exit a transaction still open is aborted, the finished callbacks run
    (that is where the database session is closed and its connection goes
    back to the pool) and the thread locals are popped. This is what
    ``pyramid.scripting.prepare`` and its closer do, without their per-run
    class creation. (A class, not a generator: it runs once per task.)
    """

    __slots__ = ("registry", "request", "_token", "_closer")

    def __init__(self, registry: Registry):
        self.registry = registry
        self._closer: t.Callable[[], None] | None = None

    def __enter__(self) -> Request:
        registry = self.registry
        template = _template_for(registry)
        request = template.new_request()
        request.registry = registry
        request.tm = transaction.TransactionManager(explicit=True)
        if template.fast:
            threadlocal_manager.push({"registry": registry, "request": request})
            try:
                root = template.root_factory(request)
                if getattr(request, "context", None) is None:
                    request.context = root
            except BaseException:
                threadlocal_manager.pop()
                raise
            self._token = _current_request.set(request)
            self.request = request
            return request
        # A custom request factory: Pyramid's own preparation, as before.
        self._closer = prepare(request=request, registry=registry)["closer"]
        self._token = _current_request.set(request)
        self.request = request
        return request

    def __exit__(self, *exc_info: t.Any) -> None:
        request = self.request
        _current_request.reset(self._token)
        try:
            if transaction_in_progress(request.tm):
                request.tm.abort()
        finally:
            if self._closer is not None:
                self._closer()
            else:
                try:
                    # Read from the instance: Pyramid's reified property would make an empty deque on every run.
                    if request.__dict__.get("finished_callbacks"):
                        request._process_finished_callbacks()
                finally:
                    threadlocal_manager.pop()


def transaction_in_progress(tm: t.Any) -> bool:
    """Whether ``tm`` has a transaction now, without creating one (an implicit manager's ``get()`` would).

    Read from the manager rather than asked with ``get()``: an explicit
    manager answers that with an exception, which every run paid at its end.
    """
    manager = tm.manager if isinstance(tm, transaction.ThreadTransactionManager) else tm
    current = getattr(manager, "_txn", _MISSING)
    if current is not _MISSING:
        return current is not None
    if getattr(tm, "explicit", False):
        try:
            tm.get()
        except transaction.interfaces.NoTransaction:
            return False
        return True
    return False  # another ITransactionManager, implicit: nothing to ask that would not begin one


def _get_tm(request: Request) -> transaction.TransactionManager:
    return request.tm


def _set_tm(request: Request, tm: transaction.TransactionManager) -> None:
    request.tm = tm


#: ``request.transaction_manager``, Websauna's name for ``request.tm`` (includeme adds it to web and
#: task requests alike). A property rather than a reified copy: it follows ``request.tm`` when
#: that is replaced, and assigning it replaces ``request.tm``.
TRANSACTION_MANAGER_ALIAS = property(_get_tm, _set_tm, doc="Websauna's name for request.tm.")


def current_task_request() -> Request | None:
    """The request of the task run executing in this context, if any."""
    return _current_request.get()


def get_current_request() -> Request | None:
    """The request of the running task, else Pyramid's current (web) request, else None.

    Deferred functions and task bodies that are not bound (``bind=False``)
    reach their task request this way.
    """
    request = _current_request.get()
    if request is not None:
        return request
    return get_threadlocal_request()
