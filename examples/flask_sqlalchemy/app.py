"""A Flask shop on SQLAlchemy 2: POST /orders adds an order and its receipt job in one transaction.

$ export WORKER_DB=shop.db
$ flask --app app run                      # the web app
$ worker run                               # the worker, beside it, on the same file
"""

from flask import Flask, request
from models import Base, Order, make_engine
from sqlalchemy.orm import sessionmaker

import jobs  # noqa: F401  (registers send_receipt, so that enqueue checks the type)
from worker import Queue

app = Flask(__name__)
engine = make_engine()
Base.metadata.create_all(engine)
sessions = sessionmaker(engine)


class PaymentDeclined(Exception):
    """The card was declined."""


def charge(order, card):
    if card == "declined":
        raise PaymentDeclined(f"order {order.id}: card declined")


@app.post("/orders")
def place_order():
    body = request.get_json()
    with sessions.begin() as session:  # a session per request: commits at the end, rolls back on any exception
        order = Order(item=body["item"], email=body["email"])
        session.add(order)
        session.flush()  # the order's id, for the job
        job = Queue(session).enqueue("send_receipt", {"order_id": order.id})
        charge(order, body.get("card"))  # raises PaymentDeclined after the enqueue: no order, no job
        return {"order": order.id, "job": job.id}, 201


@app.errorhandler(PaymentDeclined)
def declined(error):
    return {"error": str(error)}, 402
