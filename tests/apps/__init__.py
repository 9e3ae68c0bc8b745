"""Helper applications of the test suite: app factories, task and deferred-function modules, scripts run by tests.

Kept apart from the test files so that tests/ shows what is tested and tests/apps/ what the tests run.
Importing this package imports none of its modules (tests/test_defer.py relies on that).
"""
