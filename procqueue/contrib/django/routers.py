"""The router for a project whose queue has a database of its own (Flagsmith's
TASK_PROCESSOR_DATABASES = ["task_processor"], or PROCQUEUE_DATABASE): in
DATABASE_ROUTERS where Flagsmith's TaskProcessorRouter was.

procqueue has no models, so there is nothing to route for reading or writing; what is
left of Flagsmith's router is keeping the project's own apps out of the queue's database
when `manage.py migrate --database task_processor` applies procqueue's schema there.
"""

from __future__ import annotations

from typing import Any, Optional

from django.db import DEFAULT_DB_ALIAS

from . import wiring


class TaskDatabaseRouter:
    def allow_migrate(self, db: str, app_label: str, **hints: Any) -> Optional[bool]:
        queue = wiring.queue_alias()
        if queue is None or queue == DEFAULT_DB_ALIAS or db != queue:
            return None  # not the queue's own database: the other routers', or Django's, to say
        return app_label == wiring.APP_LABEL
