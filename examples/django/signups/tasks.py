"""Imported by procqueue's app at start-up, in the web process and the processor alike."""

import logging
from datetime import time, timedelta

from django.utils import timezone

# procqueue: was `from task_processor.decorators import register_recurring_task, register_task_handler`
from procqueue import TaskPriority, register_recurring_task, register_task_handler

from .models import Signup

logger = logging.getLogger(__name__)


@register_task_handler(priority=TaskPriority.HIGH)
def send_welcome_email(signup_id: int) -> None:
    signup = Signup.objects.get(id=signup_id)
    logger.info("welcome, %s", signup.email)  # a real project sends the email here
    Signup.objects.filter(id=signup_id).update(welcomed_at=timezone.now())


@register_recurring_task(run_every=timedelta(days=1), first_run_time=time(3, 0))
def report_unwelcomed() -> None:
    logger.info("%d sign-ups still unwelcomed", Signup.objects.filter(welcomed_at=None).count())
