"""A FastAPI shop on PostgreSQL's async driver: POST /orders adds an order and its job in one transaction.

$ export DATABASE_URL=postgresql://localhost/shop PRICES_URL=http://127.0.0.1:8001
$ uvicorn app:app                          # the web app
$ worker run                               # the worker, beside it: jobs.py's async jobs run on its job loop
"""

import os
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel

import jobs  # noqa: F401  (registers fetch_price, so that enqueue checks the type)
from worker import AsyncQueue

DATABASE = os.environ["DATABASE_URL"]
pool = AsyncConnectionPool(DATABASE, open=False)


@asynccontextmanager
async def lifespan(app):
    await pool.open()
    async with pool.connection() as conn:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS orders (id serial PRIMARY KEY, item text NOT NULL, price numeric)"
        )
    yield
    await pool.close()


app = FastAPI(lifespan=lifespan)


class NewOrder(BaseModel):
    item: str
    card: str = "ok"


@app.post("/orders", status_code=201)
async def place_order(order: NewOrder):
    async with pool.connection() as conn, conn.transaction():  # commits at the end, rolls back on any exception
        cursor = await conn.execute("INSERT INTO orders (item) VALUES (%s) RETURNING id", (order.item,))
        (order_id,) = await cursor.fetchone()
        job = await AsyncQueue(conn).enqueue("fetch_price", {"order_id": order_id})
        if order.card == "declined":  # raised after the enqueue: no order, no job
            raise HTTPException(402, f"order {order_id}: card declined")
        return {"order": order_id, "job": job.id}
