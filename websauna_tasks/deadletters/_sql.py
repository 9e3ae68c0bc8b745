"""Dead letters as rows of ``websauna_tasks_dead_letters`` in the application's database.

For every broker that is not Redis (RabbitMQ, kombu's SQLAlchemy transport,
any other): the broker has no list of ours to keep them in, the application
has a database. A row is the entry's JSON text, as the Redis list keeps it,
plus the columns it is found by (the list's name, the task id, the kind, the
time); ``seq`` orders rows oldest first and is the key of the indexes that
page through them.

The entry is the truth, the columns only find it: a row whose columns
disagree with its entry (written by hand, or by something else) is listed
as an unreadable entry, as a forged Redis entry is, and only ``drop`` of its
``unreadable-...`` id touches it.
"""
from __future__ import annotations

import threading
import typing as t
import weakref

import sqlalchemy as sa

from ..schema import dead_letters_table, ensure_tables
from ._entries import UNREADABLE_ENTRY, UNREADABLE_PREFIX, read_entry, recorded_at, unreadable

if t.TYPE_CHECKING:
    from celery import Celery

#: Rows read per query by the walks that cannot use an index (unreadable ids, prune's checks).
BATCH_ROWS = 1000

_ready: weakref.WeakSet[sa.Engine] = weakref.WeakSet()
_ready_lock = threading.Lock()


class SQLStore:
    """One app's dead letters in the table, under its list name (``websauna_tasks.deadletter_queue``)."""

    def __init__(self, engine: sa.Engine, key: str, create_table: bool):
        self.engine = engine
        self.key = key
        self.create_table = create_table

    @property
    def where(self) -> str:
        """What operators are told the letters are in."""
        return f"{dead_letters_table.name} (list {self.key})"

    def _engine(self) -> sa.Engine:
        # Created (create_tables = auto) or checked (never) once per engine and process.
        if self.engine not in _ready:
            with _ready_lock:
                if self.engine not in _ready:
                    ensure_tables(self.engine, [dead_letters_table], self.create_table)
                    _ready.add(self.engine)
        return self.engine

    def append(self, text: str, entry: dict[str, t.Any]) -> None:
        task_id = entry.get("id")
        with self._engine().begin() as conn:
            conn.execute(dead_letters_table.insert().values(
                list_name=self.key, task_id=task_id if isinstance(task_id, str) else None, kind=str(entry["kind"]),
                recorded_at=recorded_at(entry), entry=text))

    def _mine(self) -> t.Any:
        return dead_letters_table.c.list_name == self.key

    def count(self, kind: str | None = None, limit: int | None = None) -> int:
        """The rows of this list (of ``kind``); with ``limit``, counted up to ``limit + 1`` at most.

        An exact count reads every row's index entry and, until a vacuum
        marks them visible, the rows too: a third of a second at 100,000 on
        PostgreSQL. A page needs only to know whether there are more than it
        says.
        """
        query = sa.select(dead_letters_table.c.seq).where(self._mine())
        if kind is not None:
            query = query.where(dead_letters_table.c.kind == kind)
        if limit is not None:
            query = query.limit(limit + 1)
        with self._engine().connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(query.subquery())).scalar_one())

    def read(self, start: int, stop: int, kind: str | None) -> list[dict[str, t.Any]]:
        """Entries ``start``..``stop`` (both included, negative from the end, as LRANGE), oldest first.

        An offset along an index, (list_name, seq) or (list_name, kind, seq),
        walked from the end the indexes count from: both negative reads the
        newest letters backwards, and costs a few rows however long the list
        is; both from the start walks ``start`` index entries. Only a range
        with one end of each kind counts the rows first.
        """
        table = dead_letters_table
        query = sa.select(table.c.seq, table.c.task_id, table.c.kind, table.c.recorded_at, table.c.entry).where(
            self._mine())
        if kind is not None:
            query = query.where(table.c.kind == kind)
        backwards = start < 0 and stop < 0
        if backwards:
            if start > stop:
                return []
            query = query.order_by(table.c.seq.desc()).offset(-stop - 1).limit(stop - start + 1)
        elif start >= 0 and stop == -1:
            query = query.order_by(table.c.seq).offset(start)
        else:
            if start < 0 or stop < 0:
                size = self.count(kind)
                start = max(size + start, 0) if start < 0 else start
                stop = size + stop if stop < 0 else stop
            if start > stop:
                return []
            query = query.order_by(table.c.seq).offset(start).limit(stop - start + 1)
        with self._engine().connect() as conn:
            rows = [checked(row) for row in conn.execute(query)]
        return rows[::-1] if backwards else rows

    def page(self, after: int | None, limit: int, kind: str | None) -> list[tuple[int, dict[str, t.Any]]]:
        """Up to ``limit`` ``(seq, entry)`` after the row ``after`` (None: from the oldest): a keyset page."""
        table = dead_letters_table
        query = sa.select(table.c.seq, table.c.task_id, table.c.kind, table.c.recorded_at, table.c.entry).where(
            self._mine()).order_by(table.c.seq).limit(limit)
        if after is not None:
            query = query.where(table.c.seq > after)
        if kind is not None:
            query = query.where(table.c.kind == kind)
        with self._engine().connect() as conn:
            return [(row.seq, checked(row)) for row in conn.execute(query)]

    def newest_first(self, before: int | None, after: int | None, limit: int,
                     kind: str | None = None) -> tuple[list[tuple[int, dict[str, t.Any]]], bool, bool]:
        """A keyset page, newest first: ``(rows, newer ones exist, older ones exist)``.

        ``before``: the ``limit`` rows just older than the row ``before``;
        ``after``: those just newer than ``after`` (0: the oldest page);
        neither: the newest. Each is one walk of ``limit + 1`` entries along
        the (list_name, seq) index from where the cursor points, and one
        EXISTS on the other side: the same cost at the first page and the
        last, unlike an offset, which walks every row before the page.
        """
        table = dead_letters_table
        where = [self._mine()] if kind is None else [self._mine(), table.c.kind == kind]
        query = sa.select(table.c.seq, table.c.task_id, table.c.kind, table.c.recorded_at, table.c.entry).where(
            *where).limit(limit + 1)
        if after is not None:
            query = query.where(table.c.seq > after).order_by(table.c.seq)
            other = table.c.seq <= after
        else:
            query = query.order_by(table.c.seq.desc())
            if before is not None:
                query = query.where(table.c.seq < before)
            other = table.c.seq >= before if before is not None else None
        with self._engine().connect() as conn:
            rows = [(row.seq, checked(row)) for row in conn.execute(query)]
            beyond = len(rows) > limit
            rows = rows[:limit]
            # The other side of the cursor: rows there may have been dropped since the link was made.
            across = other is not None and conn.execute(sa.select(sa.exists().where(*where, other))).scalar_one()
        if after is not None:
            return rows[::-1], beyond, bool(across)
        return rows, bool(across), beyond

    def _walk(self) -> t.Iterator[tuple[int, dict[str, t.Any]]]:
        after = None
        while True:
            rows = self.page(after, BATCH_ROWS, None)
            yield from rows
            if len(rows) < BATCH_ROWS:
                return
            after = rows[-1][0]

    def find(self, task_id: str) -> t.Iterator[tuple[int, dict[str, t.Any]]]:
        """``(seq, entry)`` of every entry with id ``task_id``, oldest first."""
        if task_id.startswith(UNREADABLE_PREFIX):
            # A hash of the row's text, in no column: rare enough to walk the list for.
            yield from ((seq, entry) for seq, entry in self._walk() if entry["id"] == task_id)
            return
        table = dead_letters_table
        query = sa.select(table.c.seq, table.c.task_id, table.c.kind, table.c.recorded_at, table.c.entry).where(
            self._mine(), table.c.task_id == task_id).order_by(table.c.seq)
        with self._engine().connect() as conn:
            rows = [(row.seq, checked(row)) for row in conn.execute(query)]
        # A row that claims the id in its column but not in its entry is unreadable: not this one.
        yield from ((seq, entry) for seq, entry in rows if entry["id"] == task_id)

    def remove(self, handle: int) -> bool:
        with self._engine().begin() as conn:
            # 0 rows: another operator removed it first.
            return conn.execute(dead_letters_table.delete().where(dead_letters_table.c.seq == handle)).rowcount == 1

    def requeue(self, app: Celery, handle: int, entry: dict[str, t.Any], target: str) -> bool:
        """Delete the row and publish its message in one transaction; False if the row was gone.

        Of two operators requeueing one letter, the second's DELETE waits for
        the first's commit and then finds nothing. A publish that fails rolls
        the delete back: the letter stays. Only a commit failing after the
        publish leaves the message sent and the letter kept (sent twice if
        requeued again), never lost.
        """
        from ..dispatch import requeue

        with self._engine().begin() as conn:
            deleted = conn.execute(dead_letters_table.delete().where(dead_letters_table.c.seq == handle)).rowcount
            if deleted != 1:
                return False
            requeue(app, entry["message"], target)
        return True

    def older_than(self, cutoff: float) -> list[int]:
        """Rows recorded before ``cutoff`` whose entries say so too; unreadable ones are never among them."""
        table = dead_letters_table
        found: list[int] = []
        after = -1
        while True:
            query = sa.select(table.c.seq, table.c.task_id, table.c.kind, table.c.recorded_at, table.c.entry).where(
                self._mine(), table.c.recorded_at < cutoff, table.c.seq > after).order_by(table.c.seq).limit(
                BATCH_ROWS)
            with self._engine().connect() as conn:
                rows = list(conn.execute(query))
            for row in rows:
                when = recorded_at(entry) if (entry := checked(row))["kind"] != UNREADABLE_ENTRY else None
                if when is not None and when < cutoff:
                    found.append(row.seq)
            if len(rows) < BATCH_ROWS:
                return found
            after = rows[-1].seq

    def remove_all(self, handles: list[int]) -> int:
        removed = 0
        for start in range(0, len(handles), BATCH_ROWS):
            chunk = handles[start:start + BATCH_ROWS]
            with self._engine().begin() as conn:
                removed += conn.execute(dead_letters_table.delete().where(dead_letters_table.c.seq.in_(chunk))).rowcount
        return removed


def checked(row: t.Any) -> dict[str, t.Any]:
    """The entry of ``row``, or the unreadable-entry dict when it cannot be read or its columns disagree with it."""
    text = row.entry if isinstance(row.entry, str) else ""
    entry = read_entry(text)
    if entry["kind"] == UNREADABLE_ENTRY:
        return entry
    problems = []
    task_id = entry.get("id")
    if row.task_id != task_id:
        problems.append(f"task_id {row.task_id!r} but id {task_id!r}"[:80])
    if row.kind != entry["kind"]:
        problems.append(f"kind {row.kind!r} but kind {entry['kind'][:40]!r}"[:80])
    when = recorded_at(entry)
    if row.recorded_at != when and not (row.recorded_at is None and when is None):
        problems.append(f"recorded_at {row.recorded_at!r} but a time of {when!r}")
    if problems:
        return unreadable(text.encode("utf-8", "surrogatepass"),
                          "the row's columns disagree with its entry: " + "; ".join(problems))
    return entry
