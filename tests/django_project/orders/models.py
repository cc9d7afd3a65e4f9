from django.db import models


class Order(models.Model):
    item = models.CharField(max_length=100)
    confirmed = models.BooleanField(default=False)
    confirmed_by_pid = models.IntegerField(null=True)


class Tick(models.Model):
    """One row per run of the recurring task."""

    at = models.DateTimeField(auto_now_add=True)
