from django.db import connection
from django.test import TestCase

from shop.models import Order
from worker import Queue


def pending_jobs():
    """The worker's rows in the test database (Queue(connection) creates its tables at first use)."""
    Queue(connection)
    with connection.cursor() as cursor:
        cursor.execute("SELECT type, data FROM worker_jobs WHERE status = 'pending'")
        return cursor.fetchall()


class PlaceOrderTests(TestCase):
    def test_an_order_and_its_receipt_job_commit_together(self):
        response = self.client.post("/orders", {"item": "book", "email": "ada@example.com"})
        self.assertEqual(response.status_code, 201)
        order = Order.objects.get()
        self.assertEqual(Queue(connection).get(response.json()["job"]).data, {"order_id": order.pk})

    def test_a_declined_payment_leaves_no_order_and_no_job(self):
        response = self.client.post("/orders", {"item": "lamp", "email": "bob@example.com", "card": "declined"})
        self.assertEqual(response.status_code, 402)
        self.assertFalse(Order.objects.exists())
        self.assertEqual(pending_jobs(), [])

    def test_on_commit_enqueues_after_the_commit(self):
        with self.captureOnCommitCallbacks(execute=True) as callbacks:
            response = self.client.post("/orders/on-commit", {"item": "pen", "email": "cy@example.com"})
        self.assertEqual((response.status_code, len(callbacks)), (201, 1))
        order = Order.objects.get()
        self.assertEqual(pending_jobs(), [("send_receipt", f'{{"order_id":{order.pk}}}')])
