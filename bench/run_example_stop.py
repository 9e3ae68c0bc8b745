"""How long scripts/run-example takes to stop: ``python bench/run_example_stop.py [--runs N]``.

The goal (issue 12): everything stopped in under 3 s after Ctrl-C or SIGTERM. The tests check that
the script stops and leaves no process behind (tests/test_run_example.py); this is where the
number is measured and compared with the goal. Each run starts the script on a free port with a
copy of conf/example.ini in a temporary directory, waits for its "open" line, sends SIGTERM
(what a service manager sends; Ctrl-C sends SIGINT, handled the same way), and times the moment
the script has exited and every process it started is gone. No service is needed.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.process_tree import alive, descendants  # noqa: E402

GOAL_SECONDS = 3.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def one_stop(directory: pathlib.Path, settle: float) -> tuple[float, int]:
    """Seconds from SIGTERM until the script and all it started are gone; how many processes that was."""
    ini = directory / "conf" / "example.ini"
    ini.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ROOT / "conf" / "example.ini", ini)
    port = free_port()
    log_path = directory / "run-example.log"
    with open(log_path, "wb") as log:
        script = subprocess.Popen([str(ROOT / "scripts" / "run-example"), str(ini)], stdout=log,
                                  stderr=subprocess.STDOUT, env={**os.environ, "EXAMPLE_PORT": str(port)})
    family: set[int] = set()
    try:
        deadline = time.monotonic() + 180
        while "Ctrl-C stops everything" not in log_path.read_text(errors="replace"):
            if script.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"run-example did not start:\n{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.1)
        # The worker and beat at work, as when someone looks at the page and then stops it.
        time.sleep(settle)
        family = descendants(script.pid)
        began = time.monotonic()
        script.send_signal(signal.SIGTERM)
        script.wait(60)
        while alive(family):
            if time.monotonic() - began > 60:
                raise RuntimeError(f"still running 60 s after SIGTERM: {sorted(alive(family))}")
            time.sleep(0.01)
        return time.monotonic() - began, len(family)
    finally:
        if script.poll() is None:
            script.kill()
            script.wait(30)
        for pid in alive(family):
            os.kill(pid, signal.SIGKILL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds between 'open' and SIGTERM")
    args = parser.parse_args()
    times = []
    for run in range(1, args.runs + 1):
        with tempfile.TemporaryDirectory(prefix="bench-run-example-") as directory:
            seconds, processes = one_stop(pathlib.Path(directory), args.settle)
        times.append(seconds)
        print(f"run {run}: stopped {processes} processes in {seconds:.2f} s", flush=True)
    worst = max(times)
    print(f"median {statistics.median(times):.2f} s, max {worst:.2f} s; goal: under {GOAL_SECONDS:.0f} s: "
          f"{'met' if worst < GOAL_SECONDS else 'NOT met'}")
    return 0 if worst < GOAL_SECONDS else 1


if __name__ == "__main__":
    sys.exit(main())
