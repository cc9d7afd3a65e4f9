from django.db import transaction
from django.http import HttpResponse, JsonResponse

from .models import Order
from .tasks import confirm_order


def place_order(request):
    """Save an order and enqueue its confirmation in one transaction; `fail=1` makes the
    request fail after both, so the transaction rolls back."""
    try:
        with transaction.atomic():
            order = Order.objects.create(item=request.POST["item"])
            task_id = confirm_order.delay(args=(order.id,))
            if request.POST.get("fail"):
                raise RuntimeError("payment declined")
    except RuntimeError as exc:
        return HttpResponse(str(exc), status=402)
    return JsonResponse({"order": order.id, "task": task_id})
