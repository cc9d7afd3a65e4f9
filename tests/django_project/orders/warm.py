"""A module that queries the database when imported (a cache warmed at start-up, say):
imported by `runprocessor -i orders.warm`, in the supervisor, before it forks workers."""

from django.db import connection

with connection.cursor() as cursor:
    cursor.execute("SELECT 1")
