"""Transactional enqueue with SQLAlchemy: an order and the job that mails its receipt are
committed together, or not at all.

Needs the PostgreSQL store and SQLAlchemy with an async PostgreSQL driver
(``pip install 'backlane[postgres]' 'sqlalchemy[asyncio]'``), both on the same database.
"""

import os
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from backlane import Backlane
from backlane.fastapi import BackgroundTasks

DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql+psycopg://postgres@localhost/shop")

lane = Backlane(os.environ.get("BACKLANE_URL", "postgresql://postgres@localhost/shop"))
engine = create_async_engine(DATABASE_URL)
Session = async_sessionmaker(engine, expire_on_commit=False)

RECEIPTS: list[str] = []  # stands in for an email service


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str]


@lane.task(retries=5)
async def send_receipt(order_id: int, email: str) -> None:
    RECEIPTS.append(f"receipt for order {order_id} to {email}")


# Outside a request: the order and its job in one transaction.
async def place_order(email: str) -> int:
    async with Session() as session, session.begin():  # commits here, or rolls back
        order = Order(email=email)
        session.add(order)
        await session.flush()  # the order has its id
        await send_receipt.options(connection=session).enqueue(order.id, email)
    return order.id


# Inside a request: the drop-in, with a session that commits after the response is sent.
async def get_session() -> AsyncIterator[AsyncSession]:
    async with Session() as session, session.begin():  # an exception rolls it back
        yield session


app = FastAPI()
lane.install(app, workers=1)


@app.post("/orders")
async def create_order(
    email: str,
    session: Annotated[AsyncSession, Depends(get_session)],
    background_tasks: BackgroundTasks,
) -> dict[str, int]:
    order = Order(email=email)
    session.add(order)
    await session.flush()
    if email.endswith("@invalid"):
        raise HTTPException(status_code=422, detail="undeliverable address")  # rolled back
    background_tasks.add_task(send_receipt.options(connection=session), order.id, email)
    return {"order": order.id}
