from django.db import connection, transaction
from django.http import JsonResponse
from django.views.decorators.http import require_POST

from shop import jobs  # noqa: F401  (registers send_receipt, so that enqueue checks the type)
from shop.models import Order
from worker import Queue


class PaymentDeclined(Exception):
    """The card was declined."""


def charge(order, card):
    if card == "declined":
        raise PaymentDeclined(f"order {order.pk}: card declined")


@require_POST
def place_order(request):
    try:
        with transaction.atomic():  # the order and its job commit together, or neither does
            order = Order.objects.create(item=request.POST["item"], email=request.POST["email"])
            job = Queue(connection).enqueue("send_receipt", {"order_id": order.pk})
            charge(order, request.POST.get("card"))  # raises PaymentDeclined after the enqueue: no order, no job
    except PaymentDeclined as e:
        return JsonResponse({"error": str(e)}, status=402)
    return JsonResponse({"order": order.pk, "job": job.id}, status=201)


@require_POST
def place_order_on_commit(request):
    with transaction.atomic():
        order = Order.objects.create(item=request.POST["item"], email=request.POST["email"])
        # After the commit, in autocommit mode: the enqueue commits by itself.  If the process
        # dies between the two commits the order has no job; inside atomic() (above) it cannot.
        transaction.on_commit(lambda: Queue(connection).enqueue("send_receipt", {"order_id": order.pk}))
    return JsonResponse({"order": order.pk}, status=201)
