"""Flagsmith's task-processor test suite, behaviour by behaviour, on procqueue.

Each test names the test of `Flagsmith/flagsmith-common` (tests/unit/task_processor/)
whose behaviour it holds procqueue to. Where procqueue differs on purpose, README.md's
"Porting a Django project" table says how and why, and no test here pretends otherwise.
"""
