"""procqueue for Django projects: add "procqueue.contrib.django" to INSTALLED_APPS.

Then procqueue's settings come from Django settings (Flagsmith's names: TASK_RUN_METHOD,
TASK_DELETE_RETENTION_DAYS, ...; procqueue's own PROCQUEUE_* too), the queue lives in the
database of DATABASES["default"] (or the alias PROCQUEUE_DATABASE names, or Flagsmith's
"task_processor" when TASK_PROCESSOR_DATABASES lists it), each installed app's `tasks`
module is imported, `.delay()` writes on Django's connection (inside
`transaction.atomic()` the task commits or rolls back with it), and `manage.py
runprocessor`, `manage.py checktaskprocessorthreadhealth` and `manage.py migrate` work.
"""
