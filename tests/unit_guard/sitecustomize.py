"""The unit tier's guard: a unit-tier test may not connect to a service port.

Imported by tests/conftest.py for the test process. Also Python's
``sitecustomize`` for the processes a unit-tier test starts: while one runs,
the conftest puts this directory on PYTHONPATH and describes the test in
``WS_TEST_UNIT_GUARD`` (JSON: test id, ports, report file), so a ``ws-celery``
or ``python -c`` child refuses the same connections and appends each refusal
to the report file, which the test process reads when the test ends.

Self-contained on purpose: a child may not have the ``tests`` package on its
path, and sitecustomize must never stop a child from starting.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import json
import os
import runpy
import sys
import typing as t

ENVIRONMENT = "WS_TEST_UNIT_GUARD"
PORT_NAMES = {6379: "Redis", 5432: "PostgreSQL", 5672: "AMQP"}


class UnitGuard:
    """Refuses connections to ``ports`` while ``test`` is set, and records each refusal.

    An audit hook sees the connect() of every Python socket, whatever library
    (redis-py, kombu, py-amqp, asyncio) makes it; audit hooks cannot be
    removed, hence the ``test`` flag. libpq opens its sockets in C, so
    psycopg's connect step is wrapped as well.
    """

    def __init__(self, ports: t.Iterable[int], hint: str, report: str | None = None) -> None:
        self.ports = frozenset(ports)
        self.hint = hint
        self.report = report
        self.test: str | None = None
        self.refused: list[str] = []

    def install(self) -> None:
        sys.addaudithook(self._audit)
        # Wrapped when psycopg is imported, not before: importing it costs a
        # child that never uses it 0.15 s.
        if "psycopg.generators" in sys.modules:
            self._wrap_psycopg(sys.modules["psycopg.generators"])
        else:
            sys.meta_path.insert(0, _AfterImport("psycopg.generators", self._wrap_psycopg))

    def _wrap_psycopg(self, generators: t.Any) -> None:
        from psycopg import conninfo

        original = generators.connect

        def connect(info: str = "", *args: t.Any, **kwargs: t.Any) -> t.Any:
            if self.test is not None:
                params = conninfo.conninfo_to_dict(info)
                self.check(params.get("hostaddr") or params.get("host") or "localhost",
                           params.get("port") or os.environ.get("PGPORT") or 5432)
            return original(info, *args, **kwargs)

        generators.connect = connect

    def refuse(self, what: str) -> t.NoReturn:
        message = f"unit-tier test {self.test} {what}. Unit tests use no service: {self.hint}"
        self.refused.append(message)
        if self.report:
            try:
                with open(self.report, "a", encoding="utf-8") as report:
                    report.write(json.dumps(message) + "\n")
            except OSError:
                pass  # the refusal still raises here
        raise ConnectionRefusedError(message)

    def check(self, host: t.Any, port: t.Any) -> None:
        if self.test is None:
            return
        try:
            port = int(port)
        except (TypeError, ValueError):
            return
        if port in self.ports:
            self.refuse(f"connected to {PORT_NAMES.get(port, 'a service')} at {host}:{port}"
                        + (f" (process {os.getpid()})" if self.report else ""))

    def _audit(self, event: str, args: tuple) -> None:
        if event == "socket.connect" and self.test is not None:
            address = args[1]
            if isinstance(address, tuple) and len(address) >= 2:
                self.check(address[0], address[1])

    def environment(self, report: str) -> str:
        """``WS_TEST_UNIT_GUARD`` for the children of the running test."""
        return json.dumps({"test": self.test, "ports": sorted(self.ports), "hint": self.hint, "report": report})


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls ``then(module)`` once the module ``name`` has been executed."""

    def __init__(self, name: str, then: t.Callable[[t.Any], None]) -> None:
        self.name = name
        self.then = then

    def find_spec(self, fullname: str, path: t.Any = None, target: t.Any = None) -> t.Any:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # once, and so that the real finders answer below
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module: t.Any) -> None:
            execute(module)
            self.then(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _install_in_child() -> None:
    description = os.environ.get(ENVIRONMENT)
    if not description:
        return
    try:
        spec = json.loads(description)
        guard = UnitGuard(spec["ports"], spec["hint"], spec["report"])
        guard.test = spec["test"]
        guard.install()
    except Exception as exc:  # a broken guard must not stop the child from starting
        print(f"tests/unit_guard: not installed ({exc!r})", file=sys.stderr)


def _run_the_shadowed_sitecustomize() -> None:
    # On PYTHONPATH this file hides any other sitecustomize (a Linux
    # distribution's, say): that one still runs, after the guard.
    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        candidate = os.path.join(entry or ".", "sitecustomize.py")
        if os.path.abspath(entry or ".") != here and os.path.isfile(candidate):
            try:
                runpy.run_path(candidate, run_name="sitecustomize")
            except Exception as exc:
                print(f"tests/unit_guard: {candidate} failed ({exc!r})", file=sys.stderr)
            return


_install_in_child()
if __name__ == "sitecustomize":
    _run_the_shadowed_sitecustomize()
