"""A task module that kills workers right after fork while a marker file exists (named by
SAMPLE_BREAK_WORKERS_FILE): a slot whose workers ran fine, then cannot start any more."""

import os


def _die_while_marked() -> None:
    marker = os.environ.get("SAMPLE_BREAK_WORKERS_FILE")
    if marker and os.path.exists(marker):
        os._exit(1)


os.register_at_fork(after_in_child=_die_while_marked)
