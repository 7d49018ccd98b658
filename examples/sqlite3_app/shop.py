"""A shop on the standard library's sqlite3: an order and its receipt job commit together, or neither does.

$ export WORKER_DB=shop.db
$ python shop.py book ada@example.com      # an order, and a pending send_receipt job
$ worker run --burst                       # mails the receipt and marks the order
"""

import sqlite3
import sys

from jobs import DATABASE  # the jobs module registers send_receipt, so that enqueue checks the type
from worker import Queue

ORDERS = """
CREATE TABLE IF NOT EXISTS orders (
    id INTEGER PRIMARY KEY,
    item TEXT NOT NULL,
    email TEXT NOT NULL,
    receipt_sent INTEGER NOT NULL DEFAULT 0
)
"""


class PaymentDeclined(Exception):
    """The card was declined."""


def connect(path=DATABASE):
    conn = sqlite3.connect(path, timeout=5)  # wait up to 5 s for the write lock (the worker shares the file)
    conn.execute(ORDERS)
    return conn


def charge(order_id, card):
    if card == "declined":
        raise PaymentDeclined(f"order {order_id}: card declined")


def place_order(conn, item, email, card="4242"):
    with conn:  # commits at the end of the block; any exception rolls back the order and its job
        order_id = conn.execute("INSERT INTO orders (item, email) VALUES (?, ?)", (item, email)).lastrowid
        Queue(conn).enqueue("send_receipt", {"order_id": order_id})
        charge(order_id, card)  # raises PaymentDeclined after the enqueue: no order, no job
    return order_id


if __name__ == "__main__":
    item, email, *card = sys.argv[1:]
    conn = connect()
    try:
        print(f"order {place_order(conn, item, email, *card)} placed")
    except PaymentDeclined as e:
        sys.exit(f"no order: {e}")
    finally:
        conn.close()
