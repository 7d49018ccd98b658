"""The shop's jobs: `worker run` (in this folder, with WORKER_DB=shop.db) imports this file."""

from models import DATABASE, Order, make_engine
from sqlalchemy.orm import sessionmaker

from worker import job, on_shutdown, on_startup


@on_startup
def open_database(app):
    app.engine = make_engine(DATABASE)  # one engine (and pool) per worker process, shared by its job threads
    app.sessions = sessionmaker(app.engine)


@on_shutdown
def close_database(app):
    app.engine.dispose()


@job(max_attempts=3, retry_delay=30)
def send_receipt(ctx, order_id):
    with ctx.app.sessions() as session:
        order = session.get(Order, order_id)
        ctx.logger.info("mailing the receipt of order %s to %s", order.id, order.email)
        order.receipt_sent = True
        session.commit()  # one short write transaction: see "the shared-file rule"
        return {"sent_to": order.email}
