"""One producer process of tests/test_fault_redis_outage.py.

``python -m tests.apps.fault_producer INI INDEX COUNT BATCH`` builds the
app of INI and commits COUNT / BATCH transactions, each writing BATCH rows
of ``fault_commits`` (the producer's own record of what it committed) and
dispatching one ``tests.fault.effect`` task per row, on commit. It keeps
going whatever happens to the broker: a commit the library lets an error
escape from is counted, and makes the exit status 1 once the stream is
done, so the test sees it without losing the rest of the stream.

The last line on stdout is a JSON summary.
"""
from __future__ import annotations

import json
import sys
import time
import traceback

from pyramid.paster import get_app
from sqlalchemy import text

from tests.apps import fault_tasks
from websauna_tasks.outbox import find_outbox
from websauna_tasks.registry import get_celery
from websauna_tasks.request import task_request

COMMITS_DDL = ("CREATE TABLE IF NOT EXISTS fault_commits "
               "(producer int NOT NULL, commit_no int NOT NULL, key text PRIMARY KEY)")


class _FastPathCounter:
    """Counts the rows the outbox's fast path publishes in this process.

    Wraps the one method ``Outbox.after_commit`` publishes through, on this
    process's instance only; the relay in the worker has its own instance
    and is not counted, so relay = all rows - every producer's count.
    """

    def __init__(self, outbox):
        self.published = 0
        self._publish = outbox.publish_pending
        outbox.publish_pending = self

    def __call__(self, ids=None, engine=None):
        count = self._publish(ids, engine=engine)
        self.published += count
        return count


def main(argv: list[str] | None = None) -> int:
    ini, index, count, batch = argv if argv is not None else sys.argv[1:]
    index, count, batch = int(index), int(count), int(batch)
    registry = get_app(ini).registry
    outbox = find_outbox(get_celery(registry))
    counter = _FastPathCounter(outbox) if outbox is not None else None

    started = time.monotonic()
    commits = errors = 0
    slowest = 0.0
    for commit_no in range(count // batch):
        keys = [f"p{index}-{commit_no * batch + offset}" for offset in range(batch)]
        began = time.monotonic()
        try:
            with task_request(registry) as request, request.tm:
                request.dbsession.execute(
                    text("INSERT INTO fault_commits (producer, commit_no, key) VALUES (:producer, :commit_no, :key)"),
                    [{"producer": index, "commit_no": commit_no, "key": key} for key in keys])
                for key in keys:
                    fault_tasks.effect.apply_async(args=(key,), tm=request.tm)
            commits += 1
        except Exception:
            # Whether this commit stood is in fault_commits; the error itself
            # is what the test must hear about.
            errors += 1
            traceback.print_exc()
        slowest = max(slowest, time.monotonic() - began)
    if outbox is not None:
        # What the fast path still holds would otherwise be published at exit, after the count is printed.
        outbox.fast_path.flush()

    summary = {"producer": index, "commits": commits, "errors": errors, "seconds": time.monotonic() - started,
               "slowest_commit_seconds": slowest,
               "fast_path_published": counter.published if counter is not None else None}
    print(json.dumps(summary), flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
