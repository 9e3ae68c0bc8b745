"""The web half of scripts/run-example: where to listen, and the server itself.

    example_web.py address INI   prints "HOST PORT", or one line and status 3 when the port is taken
    example_web.py serve INI HOST PORT   serves the INI's application with waitress on HOST:PORT

pserve binds what the INI's [server:main] says and takes no port on its command line (an INI
variable would need a default, and PasteDeploy lets a file's [DEFAULT] win over the command
line). So run-example serves through here: the rest of [server:main] is kept, only the address
comes from EXAMPLE_PORT / EXAMPLE_URL, and a port taken by someone else is one line, not
pserve's traceback.

The address: EXAMPLE_PORT, else the port of EXAMPLE_URL, else the INI's ``listen`` (or
``port``), else 6543; the host from EXAMPLE_URL, else the INI, else 127.0.0.1.
"""
from __future__ import annotations

import errno
import os
import socket
import sys
import urllib.parse

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 6543


class Refused(Exception):
    """A setting or a port that cannot be used: one line for the user, status 3."""


def server_settings(ini: str) -> dict[str, str]:
    import plaster

    try:
        return dict(plaster.get_settings(ini, "server:main"))
    except OSError as exc:
        raise Refused(f"cannot read {ini}: {exc.strerror or exc}") from None


def ini_address(settings: dict[str, str]) -> tuple[str, int]:
    listen = settings.get("listen", "").split()
    if listen:
        host, _, port = listen[0].rpartition(":")
        return host.strip("[]") or DEFAULT_HOST, int(port)
    return settings.get("host", DEFAULT_HOST), int(settings.get("port", DEFAULT_PORT))


def parse_port(text: str, what: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise Refused(f"{what} must be a port number, not {text!r}") from None
    if not 0 < port < 65536:
        raise Refused(f"{what} must be a port number from 1 to 65535, not {port}")
    return port


def address(ini: str) -> tuple[str, int]:
    host, port = ini_address(server_settings(ini))
    url = os.environ.get("EXAMPLE_URL", "")
    if url:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme != "http" or not parsed.hostname:
            raise Refused(f"EXAMPLE_URL must look like http://127.0.0.1:6543, not {url!r}")
        host = parsed.hostname
        try:
            port = parsed.port or 80
        except ValueError:
            raise Refused(f"EXAMPLE_URL has no valid port: {url!r}") from None
    if os.environ.get("EXAMPLE_PORT"):
        port = parse_port(os.environ["EXAMPLE_PORT"], "EXAMPLE_PORT")
        if url and urllib.parse.urlsplit(url).port not in (None, port):
            raise Refused(f"EXAMPLE_URL ({url}) and EXAMPLE_PORT ({port}) name two ports: set one of them")
    return host, port


def check_free(host: str, port: int) -> None:
    # Bound the way waitress binds (SO_REUSEADDR), so a port in TIME_WAIT from the last run counts
    # as free and only a live listener as taken.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise Refused(taken(host, port, exc)) from None


def taken(host: str, port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (f"port {port} on {host} is taken (another run-example or server?); "
                f"stop it, or run on another port: EXAMPLE_PORT={port + 1} scripts/run-example")
    return f"cannot listen on {host}:{port}: {exc.strerror or exc}"


def serve(ini: str, host: str, port: int) -> None:
    import waitress
    from pyramid.paster import get_app, setup_logging

    settings = server_settings(ini)
    for key in ("use", "listen", "host", "port"):
        settings.pop(key, None)
    setup_logging(ini)
    app = get_app(ini)
    try:
        listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        server = waitress.create_server(app, listen=listen, **settings)
    except OSError as exc:
        # Taken since run-example looked: still one line.
        raise Refused(taken(host, port, exc)) from None
    server.print_listen("Serving on http://{}:{}")
    server.run()


def main(argv: list[str]) -> int:
    try:
        if len(argv) == 2 and argv[0] == "address":
            host, port = address(argv[1])
            check_free(host, port)
            print(host, port)
        elif len(argv) == 4 and argv[0] == "serve":
            serve(argv[1], argv[2], int(argv[3]))
        else:
            print("usage: example_web.py address INI | serve INI HOST PORT", file=sys.stderr)
            return 2
    except Refused as exc:
        print(f"run-example: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
