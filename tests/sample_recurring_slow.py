"""A recurring task that outlasts its interval (imported only by the tests that need it)."""

from __future__ import annotations

import time
from datetime import timedelta

from procqueue import register_recurring_task
from sample_tasks import record


@register_recurring_task(run_every=timedelta(seconds=2), task_name="sample.slow_recurring",
                         timeout=timedelta(seconds=30))
def slow_recurring() -> None:
    """Runs 5 s, every 2 s: each run overlaps the next two slots."""
    record("slow_recurring:start")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # pure Python: an interrupt can reach it
        time.sleep(0.05)
    record("slow_recurring:end")
