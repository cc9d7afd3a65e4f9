"""The app a Django project adds to INSTALLED_APPS: "procqueue.contrib.django"."""

from __future__ import annotations

from django.apps import AppConfig
from django.utils.module_loading import autodiscover_modules


class ProcqueueConfig(AppConfig):
    name = "procqueue.contrib.django"
    label = "procqueue"  # wiring.APP_LABEL
    verbose_name = "procqueue"

    def ready(self) -> None:
        from . import wiring

        wiring.connect(self)
        # Each installed app's `tasks` module registers its tasks (as Flagsmith's apps
        # import theirs): the processor runs what they register, the web process
        # enqueues it.
        autodiscover_modules("tasks")
