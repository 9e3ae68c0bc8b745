"""The example's two tables: messages a visitor posts and the beat heartbeat."""
from __future__ import annotations

import datetime

from sqlalchemy import DateTime, Integer, String
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.schema import CreateTable


def utcnow() -> datetime.datetime:
    # Naive UTC: SQLite has no time zones, and every process writes the same way.
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)  # noqa: UP017 (datetime.UTC is 3.11+)


class Base(DeclarativeBase):
    pass


class Message(Base):
    """A row the web request writes; a task fills in the ``processed_*`` columns."""

    __tablename__ = "example_messages"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    text: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime.datetime] = mapped_column(DateTime, default=utcnow)
    #: The id apply_async() returned before the commit...
    scheduled_task_id: Mapped[str | None] = mapped_column(String(64))
    #: ...and the id the task saw when it ran: they are the same.
    processed_by_task_id: Mapped[str | None] = mapped_column(String(64))
    processed_at: Mapped[datetime.datetime | None] = mapped_column(DateTime)
    #: The task's "work": the text in capitals.
    shouted: Mapped[str | None] = mapped_column(String(200))
    #: request.route_url() made inside the task, from websauna.site_url.
    link: Mapped[str | None] = mapped_column(String(500))

    @property
    def processed(self) -> bool:
        return self.processed_at is not None


class Heartbeat(Base):
    """One row (id 1) counting the runs of the periodic task beat sends."""

    __tablename__ = "example_heartbeat"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    beats: Mapped[int] = mapped_column(Integer, default=0)
    last_at: Mapped[datetime.datetime | None] = mapped_column(DateTime)
    last_task_id: Mapped[str | None] = mapped_column(String(64))


def create_tables(engine: Engine) -> None:
    """Create the tables if missing; a real application would use migrations.

    ``IF NOT EXISTS`` instead of ``metadata.create_all``: the web server, the
    worker and beat all load the app at the same moment, and create_all's
    check-then-create races between processes on a fresh database.
    """
    with engine.begin() as conn:
        for table in Base.metadata.sorted_tables:
            conn.execute(CreateTable(table, if_not_exists=True))
