"""The shop's table and engine, shared by the Flask app and its jobs."""

import os

from sqlalchemy import create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# One setting for the app and its worker: the worker itself reads WORKER_DB too.
DATABASE = os.environ.get("WORKER_DB", "shop.db")


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    item: Mapped[str]
    email: Mapped[str]
    receipt_sent: Mapped[bool] = mapped_column(default=False)


def make_engine(path=DATABASE):
    # timeout: how long a write waits for the lock the worker may hold (see "the shared-file rule").
    return create_engine(f"sqlite:///{path}", connect_args={"timeout": 5})
