"""The seed's ``myapp.models``: ``Delivery`` (with its customer) and ``Asset``, plus what the stand-ins record."""
from __future__ import annotations

import uuid

from sqlalchemy import JSON, BigInteger, ForeignKey, Integer, String
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = "seed_customers"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String)
    phone_number: Mapped[str] = mapped_column(String)


class Delivery(Base):
    __tablename__ = "seed_deliveries"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    uuid: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), default=uuid.uuid4)
    customer_id: Mapped[int] = mapped_column(ForeignKey("seed_customers.id"))
    customer: Mapped[Customer] = relationship()


class Asset(Base):
    __tablename__ = "seed_assets"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    slug: Mapped[str] = mapped_column(String, unique=True)
    other_data: Mapped[dict] = mapped_column(JSON, default=dict)


class SentSMS(Base):
    """An SMS the stand-in SMS gateway "sent" (sms.py), written in the sending task's transaction."""
    __tablename__ = "seed_sent_sms"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    phone_number: Mapped[str] = mapped_column(String)
    body: Mapped[str] = mapped_column(String)
    task_id: Mapped[str] = mapped_column(String)
    pid: Mapped[int] = mapped_column(Integer)


class SeoRun(Base):
    """One ``calc_asset_seo`` call, with the PostgreSQL transaction it ran in (seo_calc.py)."""
    __tablename__ = "seed_seo_runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    asset_id: Mapped[int] = mapped_column(Integer)
    txid: Mapped[int] = mapped_column(BigInteger)
