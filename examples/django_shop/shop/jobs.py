"""The shop's jobs: `worker run --django-settings django_shop.settings --jobs shop.jobs` (from the project folder).

The worker runs django.setup() before importing this module, so models import at module level.
"""

import functools

from django.db import close_old_connections

from shop.models import Order
from worker import job


def django_job(fn):
    """Each job as Django's request cycle would treat it: a stale connection is closed before and after.

    Django keeps a connection per thread, and the worker's job threads live as long as the worker;
    without a request to end, nothing else would close a broken one or honour CONN_MAX_AGE.
    """

    @functools.wraps(fn)
    def run(ctx, **data):
        close_old_connections()
        try:
            return fn(ctx, **data)
        finally:
            close_old_connections()

    return run


@job(max_attempts=3, retry_delay=30)
@django_job
def send_receipt(ctx, order_id):
    order = Order.objects.get(pk=order_id)
    ctx.logger.info("mailing the receipt of order %s to %s", order.pk, order.email)
    Order.objects.filter(pk=order.pk).update(receipt_sent=True)  # one short write: see "the shared-file rule"
    return {"sent_to": order.email}
