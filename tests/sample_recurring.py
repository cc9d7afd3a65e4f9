"""A recurring task for the once-per-interval tests (imported only by them)."""

from __future__ import annotations

from datetime import timedelta

from procqueue import register_recurring_task
from sample_tasks import record


@register_recurring_task(run_every=timedelta(seconds=1), task_name="sample.every_second",
                         kwargs={"key": "every_second"})
def every_second(key: str) -> None:
    record(key)  # the schedule's fixed arguments arrive with every run
