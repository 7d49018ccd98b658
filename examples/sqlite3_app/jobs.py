"""The shop's jobs: `worker run` (in this folder, with WORKER_DB=shop.db) imports this file."""

import contextlib
import os
import sqlite3

from worker import job

# One setting for the shop and its worker: the worker itself reads WORKER_DB too.
DATABASE = os.environ.get("WORKER_DB", "shop.db")


@job(max_attempts=3, retry_delay=30)
def send_receipt(ctx, order_id):
    with contextlib.closing(sqlite3.connect(DATABASE, timeout=5)) as conn:
        email = conn.execute("SELECT email FROM orders WHERE id = ?", (order_id,)).fetchone()[0]
        ctx.logger.info("mailing the receipt of order %s to %s", order_id, email)
        with conn:  # one short write transaction: see "the shared-file rule"
            conn.execute("UPDATE orders SET receipt_sent = 1 WHERE id = ?", (order_id,))
    return {"sent_to": email}
