"""Models, query factories and callbacks of the sharded-iteration tests (tests/test_iteration.py).

The worker finds them by path, as an application's would be found: they
live in the ``tests`` package, the test app's default allow-list.
"""
from __future__ import annotations

import os

from sqlalchemy import String, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from websauna_tasks import get_current_request, get_deferred_shard_index
from websauna_tasks.db import get_engine

TABLES = """
DROP TABLE IF EXISTS ws_iter_items, ws_iter_processed, ws_iter_failed_once, ws_iter_finalized;
CREATE TABLE ws_iter_items (id int PRIMARY KEY, value int NOT NULL, touched int NOT NULL DEFAULT 0);
CREATE TABLE ws_iter_processed (item_id int NOT NULL UNIQUE, shard int, label text, pid int);
CREATE TABLE ws_iter_failed_once (item_id int PRIMARY KEY);
CREATE TABLE ws_iter_finalized (id serial PRIMARY KEY, label text, shard_index text, pid int);
"""


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "ws_iter_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    value: Mapped[int]
    touched: Mapped[int] = mapped_column(default=0)


class Tag(Base):
    """A text primary key: cannot be split into ranges."""
    __tablename__ = "ws_iter_tags"
    name: Mapped[str] = mapped_column(String(40), primary_key=True)


class Pair(Base):
    """A composite primary key: refused too."""
    __tablename__ = "ws_iter_pairs"
    left: Mapped[int] = mapped_column(primary_key=True)
    right: Mapped[int] = mapped_column(primary_key=True)


# -- query factories --------------------------------------------------------------------------

def items_from(minimum: int = 0):
    return select(Item).where(Item.value >= minimum)


def no_items():
    return select(Item).where(Item.value < 0)


def all_tags():
    return select(Tag)


def item_ids():
    return select(Item.id)


def first_ten_items():
    return select(Item).limit(10)


def not_a_select():
    return "SELECT * FROM ws_iter_items"


# -- callbacks -------------------------------------------------------------------------------

def _first_failure(item_id: int) -> bool:
    """Mark ``item_id`` as failed, committed at once outside the batch's transaction; True the first time."""
    engine = get_engine(get_current_request().registry).execution_options(isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        inserted = conn.execute(text("INSERT INTO ws_iter_failed_once (item_id) VALUES (:id) "
                                     "ON CONFLICT DO NOTHING"), {"id": item_id}).rowcount
    return inserted == 1


def process(item: Item, label: str, *, fail_on: list[int] = ()) -> None:
    """Record the row (unique per item) and touch it through the ORM; fail once on the ids in ``fail_on``."""
    request = get_current_request()
    if item.id in fail_on and _first_failure(item.id):
        raise RuntimeError(f"item {item.id}: failing once on purpose")
    request.dbsession.execute(
        text("INSERT INTO ws_iter_processed (item_id, shard, label, pid) VALUES (:id, :shard, :label, :pid)"),
        {"id": item.id, "shard": get_deferred_shard_index(), "label": label, "pid": os.getpid()})
    item.touched += 1


def process_or_always_fail(item: Item, label: str, *, fail_on: list[int] = ()) -> None:
    if item.id in fail_on:
        raise RuntimeError(f"item {item.id}: failing every time")
    process(item, label)


def finalize(label: str, *, fail_on: list[int] = ()) -> None:
    get_current_request().dbsession.execute(
        text("INSERT INTO ws_iter_finalized (label, shard_index, pid) VALUES (:label, :shard, :pid)"),
        {"label": label, "shard": repr(get_deferred_shard_index()), "pid": os.getpid()})
