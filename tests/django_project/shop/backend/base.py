"""A project's own database backend, as django-prometheus or a pooling wrapper ships one:
Django's PostgreSQL backend, subclassed."""

from django.db.backends.postgresql import base


class DatabaseWrapper(base.DatabaseWrapper):
    pass
