"""The shop's jobs: `worker run` (in this folder, with DATABASE_URL and PRICES_URL set) imports this file."""

import os

import httpx
from psycopg_pool import AsyncConnectionPool

from worker import job, on_shutdown, on_startup


@on_startup
async def open_clients(app):
    # Made on the worker's job loop: one HTTP client and one pool per worker process, shared by its async jobs.
    app.http = httpx.AsyncClient(base_url=os.environ["PRICES_URL"], timeout=10)
    app.pool = AsyncConnectionPool(os.environ["DATABASE_URL"], open=False)
    await app.pool.open()


@on_shutdown
async def close_clients(app):
    await app.http.aclose()
    await app.pool.close()


@job(max_attempts=3, retry_delay=5, timeout=30)
async def fetch_price(ctx, order_id):
    async with ctx.app.pool.connection() as conn:
        (item,) = await (await conn.execute("SELECT item FROM orders WHERE id = %s", (order_id,))).fetchone()
    answer = await ctx.app.http.get(f"/prices/{item}")  # the loop runs other jobs while this one waits
    answer.raise_for_status()
    price = answer.json()["price"]
    async with ctx.app.pool.connection() as conn:
        await conn.execute("UPDATE orders SET price = %s WHERE id = %s", (price, order_id))
    return {"item": item, "price": price}
