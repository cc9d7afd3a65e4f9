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


@register_task_handler()
def note_backend() -> None:
    """Which database session this worker's Django connection is: each worker must have
    its own."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE IF NOT EXISTS backends_seen (worker_pid int, backend_pid int)")
        cursor.execute("INSERT INTO backends_seen VALUES (%s, pg_backend_pid())", [os.getpid()])
