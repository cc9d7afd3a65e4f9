"""Found by the procqueue app's autodiscovery, as Flagsmith's apps' tasks modules are."""

import os
from datetime import timedelta

from procqueue import register_recurring_task, register_task_handler

from .models import Order, Tick


@register_task_handler()
def confirm_order(order_id: int) -> None:
    Order.objects.filter(id=order_id).update(confirmed=True, confirmed_by_pid=os.getpid())


@register_recurring_task(run_every=timedelta(seconds=1))
def tick() -> None:
    Tick.objects.create()
