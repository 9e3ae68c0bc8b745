"""A process's descendants, read from Linux /proc, for tests of scripts that start processes."""
from __future__ import annotations

import os
import pathlib


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, None when it is gone."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses; the fields after the last ")" are fixed.
    state, ppid = stat.rsplit(")", 1)[1].split()[:2]
    return state, int(ppid)


def descendants(pid: int) -> set[int]:
    """Live (not zombie) processes below ``pid``: its children, theirs, and so on."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (found := _stat(int(entry))) and found[0] != "Z":
            parents[int(entry)] = found[1]
    below: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - below
        below |= frontier
    return below


def alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` still running (a zombie has stopped: only its exit status is left)."""
    return {pid for pid in pids if (found := _stat(pid)) and found[0] != "Z"}


def command_line(pid: int) -> str:
    try:
        return pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""
