"""Example tasks for `procqueue demo`, and the producer that feeds them.

    python -m procqueue.examples --rate 4    # enqueue a steady mix until interrupted
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import sys
import time
from datetime import datetime, timedelta, timezone

from .errors import ProcqueueError
from .logs import log_event, setup_logging
from .records import TaskPriority
from .registry import TaskBackoffError, register_recurring_task, register_task_handler

logger = logging.getLogger("procqueue.examples")


@register_task_handler(task_name="examples.send_welcome_email")
def send_welcome_email(user_id: int, email: str) -> None:
    time.sleep(random.uniform(0.01, 0.05))  # talking to an SMTP server
    log_event(logger, logging.INFO, "example.email_sent", user_id=user_id, to=email)


@register_task_handler(task_name="examples.resize_image", priority=TaskPriority.LOW, timeout=timedelta(seconds=10))
def resize_image(path: str, width: int) -> None:
    time.sleep(random.uniform(0.05, 0.2))
    log_event(logger, logging.INFO, "example.image_resized", path=path, width=width)


@register_task_handler(task_name="examples.charge_card", priority=TaskPriority.HIGH,
                       max_attempts=4, retry_backoff=timedelta(seconds=1))
def charge_card(order_id: int, cents: int) -> None:
    """Fails now and then, to show retries with backoff in the log."""
    if random.random() < 0.3:
        raise ConnectionError(f"payment gateway timed out for order {order_id}")
    log_event(logger, logging.INFO, "example.card_charged", order_id=order_id, cents=cents)


@register_task_handler(task_name="examples.sync_inventory")
def sync_inventory(sku: str) -> None:
    """Asks to be retried later, as a rate-limited API would make it."""
    if random.random() < 0.2:
        raise TaskBackoffError(delay_until=datetime.now(timezone.utc) + timedelta(seconds=2))
    log_event(logger, logging.INFO, "example.inventory_synced", sku=sku)


@register_recurring_task(run_every=timedelta(seconds=10), task_name="examples.heartbeat_report")
def heartbeat_report() -> None:
    log_event(logger, logging.INFO, "example.recurring_ran", every="10s")


def enqueue_one(sequence: int) -> None:
    choice = sequence % 4
    if choice == 0:
        task_id = send_welcome_email.delay(args=(sequence, f"user{sequence}@example.com"))
    elif choice == 1:
        task_id = resize_image.delay(kwargs={"path": f"/uploads/{sequence}.png", "width": 640})
    elif choice == 2:
        task_id = charge_card.delay(args=(sequence, 1999))
    else:
        task_id = sync_inventory.delay(args=(f"SKU-{sequence}",))
    log_event(logger, logging.INFO, "example.enqueued", task_id=task_id, n=sequence)


def produce(rate: float) -> None:
    """Enqueue until interrupted, or until the process that started this one is gone
    (`procqueue demo` killed with SIGKILL cannot stop its producer itself)."""
    parent = os.getppid()
    sequence = 0
    while os.getppid() == parent:
        enqueue_one(sequence)
        sequence += 1
        time.sleep(1 / rate)


def _stop_once(signum, frame) -> None:
    """Ctrl-C reaches the producer and the demo; the demo then sends SIGTERM too. Whichever
    comes first stops it; later ones are ignored, or one landing during interpreter
    shutdown would print a traceback there."""
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, signal.SIG_IGN)
    raise KeyboardInterrupt


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Enqueue example tasks at a steady rate.")
    parser.add_argument("--rate", type=float, default=4.0, help="tasks per second (default 4)")
    options = parser.parse_args(argv)
    setup_logging("info")
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop_once)
    try:
        produce(options.rate)
    except KeyboardInterrupt:
        return 0
    except ProcqueueError as exc:
        print(f"procqueue: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
