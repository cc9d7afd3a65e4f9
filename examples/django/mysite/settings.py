"""A Django project that used Flagsmith's task processor, moved to procqueue.

What changed is marked `# procqueue:`; everything else is as it was.
"""

import os

from psycopg2.extensions import parse_dsn

from procqueue import TaskRunMethod  # procqueue: was `from task_processor.task_run_method import TaskRunMethod`

SECRET_KEY = os.environ.get("SECRET_KEY", "example-only")
DEBUG = True
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "mysite.urls"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "procqueue.contrib.django",  # procqueue: was "task_processor"
    "signups",
]

# One database: the tasks live beside the data, so .delay() commits with it. (A separate
# task database: add DATABASES["task_processor"] and TASK_PROCESSOR_DATABASES =
# ["task_processor"], as with Flagsmith, and in DATABASE_ROUTERS replace
# "task_processor.routers.TaskProcessorRouter" with
# "procqueue.contrib.django.routers.TaskDatabaseRouter".)
_url = parse_dsn(os.environ.get("DATABASE_URL", "postgresql:///mysite"))
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": _url.get("dbname"),
        "USER": _url.get("user", ""),
        "PASSWORD": _url.get("password", ""),
        "HOST": _url.get("host", ""),
        "PORT": _url.get("port", ""),
    }
}

# Flagsmith's settings, by Flagsmith's names: procqueue reads them from here.
TASK_RUN_METHOD = os.environ.get("TASK_RUN_METHOD", TaskRunMethod.TASK_PROCESSOR.value)  # a string is fine too
TASK_DELETE_RETENTION_DAYS = 15
RECURRING_TASK_RUN_RETENTION_DAYS = 15
TASK_DELETE_BATCH_SIZE = 2000
# procqueue's own settings go here too (or in the environment): PROCQUEUE_SCHEMA,
# PROCQUEUE_METRICS_PORT, PROCQUEUE_STATUS_FILE, ...
PROCQUEUE_METRICS_PORT = os.environ.get("PROCQUEUE_METRICS_PORT", "9464")  # procqueue checks the value
