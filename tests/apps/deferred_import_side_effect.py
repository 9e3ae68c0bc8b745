"""Importing this module creates the file named by WS_TEST_IMPORT_MARKER.

A worker must refuse a forged defer() message naming a function here
without importing the module: importing already runs code.
"""
import os
import pathlib

_marker = os.environ.get("WS_TEST_IMPORT_MARKER")
if _marker:
    pathlib.Path(_marker).write_text("imported")


def harmless() -> str:  # pragma: no cover - must never run
    return "ran"
