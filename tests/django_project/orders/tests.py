"""Run by Django's test runner (`manage.py test orders`) from tests/test_django.py: a
project's own tests see procqueue in their test database, inside their transaction."""

from django.test import TestCase

import procqueue

from .tasks import confirm_order


class EnqueueInTheTestDatabase(TestCase):
    def test_a_delayed_task_is_seen_and_cancelled_in_the_tests_transaction(self):
        task_id = confirm_order.delay(args=(7,))
        task = procqueue.get_task(task_id)
        self.assertEqual((task.task_name, task.args, task.state.value), ("tasks.confirm_order", [7], "queued"))
        self.assertTrue(procqueue.cancel(task_id))
        self.assertEqual(procqueue.get_task(task_id).state.value, "cancelled")
        self.assertEqual([run.outcome.value for run in procqueue.get_task_runs(task_id)], ["cancelled"])

    def test_asking_whether_a_processor_is_healthy_leaves_no_connection_behind(self):
        # No processor runs during these tests: False, and Django can still drop its
        # test database afterwards.
        self.assertFalse(procqueue.is_processor_healthy(max_tries=1))
