"""A small shop, as a Flagsmith-era project would configure it, on procqueue.

The test gives the database as SHOP_DATABASE_URL (a libpq URL), and picks the driver
with SHOP_DRIVER: `psycopg` (psycopg 3, what Django prefers when installed) or
`psycopg2`.
"""

import os
import sys

from psycopg2.extensions import parse_dsn

from procqueue import TaskRunMethod

if os.environ.get("SHOP_DRIVER") == "psycopg2":
    sys.modules["psycopg"] = None  # Django then loads its backend on psycopg2

SECRET_KEY = "tests-only"
DEBUG = False
ALLOWED_HOSTS = ["testserver", "127.0.0.1", "localhost"]
ROOT_URLCONF = "shop.urls"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "procqueue.contrib.django",
    "orders",
]
MIDDLEWARE = []


def _database(url):
    parts = parse_dsn(url)
    return {
        "ENGINE": os.environ.get("SHOP_ENGINE", "django.db.backends.postgresql"),
        "NAME": parts.get("dbname"),
        "USER": parts.get("user", ""),
        "PASSWORD": parts.get("password", ""),
        "HOST": parts.get("host", ""),
        "PORT": parts.get("port", ""),
        "TEST": {"NAME": os.environ.get("SHOP_TEST_DATABASE_NAME")},
    }


DATABASES = {"default": _database(os.environ["SHOP_DATABASE_URL"])}
if os.environ.get("SHOP_PERSISTENT_CONNECTIONS"):
    DATABASES["default"]["CONN_MAX_AGE"] = None
if os.environ.get("SHOP_TASK_DATABASE_URL"):  # Flagsmith's separate task database
    DATABASES["task_processor"] = _database(os.environ["SHOP_TASK_DATABASE_URL"])
    TASK_PROCESSOR_DATABASES = ["task_processor"]
    DATABASE_ROUTERS = ["procqueue.contrib.django.routers.TaskDatabaseRouter"]

# Flagsmith's settings, by Flagsmith's names.
TASK_RUN_METHOD = TaskRunMethod[os.environ.get("SHOP_TASK_RUN_METHOD", "TASK_PROCESSOR")]
TASK_DELETE_RETENTION_DAYS = 15
if os.environ.get("SHOP_BAD_SETTING"):
    TASK_PROCESSOR_NUM_THREADS = "lots"
if os.environ.get("SHOP_QUEUE_ALIAS"):
    PROCQUEUE_DATABASE = os.environ["SHOP_QUEUE_ALIAS"]

LOGGING = {"version": 1, "disable_existing_loggers": False}
