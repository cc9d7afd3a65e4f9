"""procqueue's Django drop-in next to Flagsmith's own task processor, in one run.

    .venv/bin/python bench/django_peer.py            # 3 rounds, about 9 min

Installs `flagsmith-common` (which ships Flagsmith's `task_processor` app) and procqueue
into a benchmark-only virtualenv (.bench-venv-django/, made once); starts a throwaway
PostgreSQL (durable) with one database per system; generates two small Django projects in
a temp dir from one template (the same settings, Django and psycopg 3, apart from
INSTALLED_APPS and the imports). Then, interleaved over rounds, for each: N `.delay()`
calls, one per `transaction.atomic()` as a view makes them; those N no-op tasks drained by
the system's own processor command (tasks/s, its process tree's CPU and memory); the
pickup latency of an idle processor (`.delay()` called -> the task's first statement).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import psycopg2

import common
from databases import run_sql, with_database

BENCH_VENV = common.REPO / ".bench-venv-django"
# What Flagsmith is measured at; change a version here and the virtualenv is remade.
REQUIREMENTS = ("flagsmith-common[common-core,task-processor]==3.16.0", "psycopg[binary]==3.3.9",
                "django-health-check==3.24.0")  # 4.x moved health_check.plugins, which task_processor imports
FLAGS = ("--numthreads", "5", "--sleepintervalms", "2000")  # one command line for both processors
SYSTEMS = {
    "procqueue": {
        "apps": '"procqueue.contrib.django"', "settings_import": "from procqueue import TaskRunMethod",
        "tasks_import": "from procqueue import register_task_handler", "processor": ["manage.py", "runprocessor"],
        "reset": "TRUNCATE procqueue.tasks, procqueue.task_runs, procqueue.recurring_tasks, procqueue.processors",
        "left": "SELECT count(*) FROM procqueue.tasks WHERE state IN ('queued', 'running')",
        "done": "SELECT count(*) FROM procqueue.tasks WHERE state = 'succeeded'",
        "span": "SELECT extract(epoch FROM max(finished_at) - min(started_at)) FROM procqueue.tasks"},
    "flagsmith": {  # `flagsmith start task-processor`, as Flagsmith's image runs it once migrated: the
        # processor's threads in the process of a gunicorn serving its health checks
        "apps": '"task_processor", "common.core"',
        "settings_import": "from task_processor.task_run_method import TaskRunMethod",
        "tasks_import": "from task_processor.decorators import register_task_handler",
        "processor": [str(BENCH_VENV / "bin" / "flagsmith"), "start", "task-processor"],
        "reset": "TRUNCATE task_processor_task, task_processor_taskrun, task_processor_recurringtask, "
                 "task_processor_recurringtaskrun CASCADE",
        "left": "SELECT count(*) FROM task_processor_task WHERE NOT completed",
        "done": "SELECT count(*) FROM task_processor_task WHERE completed AND num_failures = 0",
        "span": "SELECT extract(epoch FROM max(finished_at) - min(started_at)) FROM task_processor_taskrun"},
}

SETTINGS = '''import os
from datetime import time, timedelta
from psycopg2.extensions import parse_dsn
{settings_import}
SECRET_KEY, USE_TZ, ROOT_URLCONF = "bench", True, "benchsite.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", {apps}, "benchapp"]
_url = parse_dsn(os.environ["DATABASE_URL"])
DATABASES = {{"default": {{"ENGINE": "django.db.backends.postgresql", "NAME": _url["dbname"], "USER": _url.get("user", ""),
                         "PASSWORD": _url.get("password", ""), "HOST": _url.get("host", ""), "PORT": _url.get("port", "")}}}}
# Flagsmith's settings, by Flagsmith's names; procqueue reads the same.
TASK_RUN_METHOD = TaskRunMethod.TASK_PROCESSOR
TASK_PROCESSOR_MODE = os.environ.get("RUN_BY_PROCESSOR") == "true"  # set by `flagsmith start task-processor`
TASK_PROCESSOR_DATABASES = ["default"]
ENABLE_TASK_PROCESSOR_HEALTH_CHECK, ENABLE_CLEAN_UP_OLD_TASKS, TASK_DELETE_INCLUDE_FAILED_TASKS = False, True, False
TASK_DELETE_RETENTION_DAYS = RECURRING_TASK_RUN_RETENTION_DAYS = 15
TASK_DELETE_BATCH_SIZE, TASK_BACKOFF_DEFAULT_DELAY_SECONDS = 2000, 5
TASK_DELETE_RUN_TIME, TASK_DELETE_RUN_EVERY = time(1, 0), timedelta(days=1)
DOCGEN_MODE = PROMETHEUS_ENABLED = False
'''
TASKS = '''import os, time
{tasks_import}

@register_task_handler()
def noop():
    pass

@register_task_handler()
def record_start(enqueued_at):
    started = time.time()
    with open(os.environ["BENCH_PICKUP_FILE"], "a") as out:
        out.write(f"{{started - enqueued_at}}\\n")
'''
COMMAND = '''import json, os, random, sys, time
from pathlib import Path
import django
from django.core.management.base import BaseCommand
from django.db import connection, transaction
from benchapp.tasks import noop, record_start

class Command(BaseCommand):
    def add_arguments(self, parser):
        parser.add_argument("mode", choices=["noop", "pickup"])
        parser.add_argument("count", type=int)

    def handle(self, mode, count, **options):
        with transaction.atomic():  # warm up (connection, first-call work), leaving no task behind
            noop.delay()
            transaction.set_rollback(True)
        if mode == "noop":  # what a view does: one task per transaction
            latencies, started = [], time.perf_counter()
            for _ in range(count):
                before = time.perf_counter()
                with transaction.atomic():
                    noop.delay()
                latencies.append((time.perf_counter() - before) * 1000)
            driver = f"{connection.Database.__name__} {connection.Database.__version__}"
            print(json.dumps({"seconds": time.perf_counter() - started, "latencies_ms": latencies,
                              "driver": f"Django {django.get_version()}, {driver}"}))
            return
        pickups = Path(os.environ["BENCH_PICKUP_FILE"])
        for n in range(count):  # one at a time, after a random pause: each waits for the one before to start
            time.sleep(random.uniform(0.05, 0.2))
            enqueued_at = time.time()
            with transaction.atomic():
                record_start.delay(args=(enqueued_at,))
            deadline = time.monotonic() + 15
            while not pickups.exists() or len(pickups.read_text().split()) <= n:
                if time.monotonic() > deadline:
                    sys.exit(f"task {n} did not start within 15 s")
                time.sleep(0.005)
'''
MANAGE = ('import os, sys\nos.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchsite.settings")\n'
          'from django.core.management import execute_from_command_line\nexecute_from_command_line(sys.argv)\n')


class Site:
    """One system's Django project, generated from the shared template, on its own database."""

    def __init__(self, name: str, url: str, scratch: Path, python: Path) -> None:
        self.name, self.spec, self.python, self.dir = name, SYSTEMS[name], python, scratch / name
        files = {"manage.py": MANAGE, "benchsite/__init__.py": "", "benchsite/urls.py": "urlpatterns = []\n",
                 "benchsite/settings.py": SETTINGS.format(**self.spec), "benchapp/__init__.py": "",
                 "benchapp/tasks.py": TASKS.format(**self.spec), "benchapp/management/__init__.py": "",
                 "benchapp/management/commands/__init__.py": "", "benchapp/management/commands/benchdelay.py": COMMAND}
        for path, text in files.items():
            (self.dir / path).parent.mkdir(parents=True, exist_ok=True)
            (self.dir / path).write_text(text)
        (self.dir / "prometheus").mkdir()
        self.pickup_file = self.dir / "pickup"
        # Nothing of the processors' outside the temp dir: procqueue's status file, Flagsmith's
        # metrics files; Flagsmith's health server on any free port.
        self.env = dict(os.environ, DATABASE_URL=url, DJANGO_SETTINGS_MODULE="benchsite.settings", TMPDIR=str(self.dir),
                        BENCH_PICKUP_FILE=str(self.pickup_file), PROMETHEUS_MULTIPROC_DIR=str(self.dir / "prometheus"),
                        PROCQUEUE_STATUS_FILE=str(self.dir / "status.json"), GUNICORN_CMD_ARGS="--bind 127.0.0.1:0")
        self.conn = common.connect(url)
        self.manage("migrate", "-v", "0")

    def manage(self, *args: str) -> str:
        result = subprocess.run([str(self.python), "manage.py", *args], cwd=self.dir, env=self.env,
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{self.name}: manage.py {' '.join(args)} failed:\n{result.stderr[-3000:]}")
        return result.stdout

    def sql(self, what: str) -> float:
        with self.conn.cursor() as cur:
            cur.execute(self.spec.get(what, what))
            return cur.fetchone()[0] if cur.description else 0

    def reset(self) -> None:
        for statement in ("reset", "VACUUM ANALYZE"):
            self.sql(statement)
        with contextlib.suppress(psycopg2.errors.InsufficientPrivilege):
            self.sql("CHECKPOINT")  # none falls due in the middle of a measurement
        self.pickup_file.unlink(missing_ok=True)

    @contextlib.contextmanager
    def processor(self):
        argv = self.spec["processor"] + list(FLAGS)
        with tempfile.TemporaryFile(dir=self.dir) as log:
            proc = subprocess.Popen([str(self.python), *argv] if argv[0] == "manage.py" else argv, cwd=self.dir,
                                    env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                yield proc
            finally:
                with common.deferred_interrupts():
                    family = tree(proc)
                    proc.send_signal(signal.SIGTERM)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(20)
                    for process in family:  # psutil checks pid and start time: never a stranger
                        with contextlib.suppress(psutil.NoSuchProcess):
                            process.kill()
                    if proc.wait() not in (0, -signal.SIGTERM):
                        log.seek(0)
                        print(f"{self.name}'s processor exited with {proc.returncode}:\n{log.read().decode()[-3000:]}")


def tree(proc: subprocess.Popen) -> list:
    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(proc.pid)
        return [root] + root.children(recursive=True)
    return []


def enqueue_and_drain(site: Site, tasks: int) -> dict:
    site.reset()
    figures = json.loads(site.manage("benchdelay", "noop", str(tasks)).strip().splitlines()[-1])
    if site.sql("left") != tasks:
        raise RuntimeError(f"{site.name}: {site.sql('left')} tasks queued, expected {tasks}")
    site.sql("VACUUM ANALYZE")
    with site.processor() as proc:
        launched, peak_rss, deadline = time.monotonic(), 0, time.monotonic() + 900
        while True:
            left, now, family = site.sql("left"), time.monotonic(), tree(proc)
            with contextlib.suppress(psutil.Error):
                peak_rss = max(peak_rss, sum(p.memory_info().rss for p in family))
            if left == 0 or now > deadline or proc.poll() is not None:
                break
            time.sleep(0.1)
        if left:
            raise RuntimeError(f"{site.name}: {left} of {tasks} tasks left (processor exit code {proc.poll()})")
        cpu = sum(t.user + t.system for t in (p.cpu_times() for p in family))
        uss = sum(p.memory_full_info().uss for p in family)
    if site.sql("done") != tasks:
        raise RuntimeError(f"{site.name}: {site.sql('done')} of {tasks} tasks succeeded")
    return {**figures, "delay_per_s": tasks / figures["seconds"], "drain_per_s": tasks / float(site.sql("span")),
            "launch_to_drained_s": now - launched, "cpu_s": cpu, "rss_mb": peak_rss / 2**20, "uss_mb": uss / 2**20,
            "processes": len(family)}


def pickup(site: Site, samples: int) -> list:
    site.reset()
    with site.processor():
        time.sleep(5)  # started (Django, forks, gunicorn) and quiet
        site.manage("benchdelay", "pickup", str(samples))
    return [float(line) * 1000 for line in site.pickup_file.read_text().split()]


def main() -> None:
    parser = common.argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=2000, help=".delay() calls, then tasks drained, per round")
    parser.add_argument("--samples", type=int, default=30, help="pickup latency samples per round")
    args = parser.parse_args()
    python = common.ensure_venv(BENCH_VENV, REQUIREMENTS, "Flagsmith's task processor")
    with tempfile.TemporaryDirectory(prefix="procqueue-bench-django-") as scratch, \
            common.bench_database(args.fast_disk) as url:
        admin, conn = with_database(url, "postgres"), common.connect(url)
        flagsmith_db = f"{conn.info.dbname}_flagsmith"  # beside procqueue's, on the same server
        conn.close()
        sites = {}
        try:
            run_sql(admin, f'CREATE DATABASE "{flagsmith_db}"')
            if args.fast_disk:
                run_sql(admin, f'ALTER DATABASE "{flagsmith_db}" SET synchronous_commit = off')
            sites["procqueue"] = Site("procqueue", url, Path(scratch), python)
            sites["flagsmith"] = Site("flagsmith", with_database(url, flagsmith_db), Path(scratch), python)
            report(sites, args)
        finally:
            with common.deferred_interrupts():
                for site in sites.values():
                    site.conn.close()
                run_sql(admin, f'DROP DATABASE IF EXISTS "{flagsmith_db}" WITH (FORCE)')


def report(sites: dict, args) -> None:
    results = {name: {"drain": [], "pickup": []} for name in sites}
    for number in range(1, args.rounds + 1):  # interleaved, in a new order each time
        for test in ("drain", "pickup"):
            for name in random.sample(list(sites), len(sites)):
                common.progress(f"round {number}/{args.rounds}: {test}, {name}")
                results[name][test].append(enqueue_and_drain(sites[name], args.tasks) if test == "drain"
                                           else pickup(sites[name], args.samples))
    print(f"{common.machine()}; {args.rounds} rounds of {args.tasks} calls and tasks and {args.samples} pickups; "
          f"{REQUIREMENTS[0].replace('[common-core,task-processor]', '')}; {results['procqueue']['drain'][0]['driver']}")

    def median(key):
        return lambda name: statistics.median(r[key] for r in results[name]["drain"])

    def pooled(test, pct):
        return lambda name: common.percentile([v for r in results[name][test]
                                               for v in (r["latencies_ms"] if test == "drain" else r)], pct)

    rows = [(".delay() in atomic(): calls/s", median("delay_per_s"), 0),
            (".delay() in atomic(): p50 ms", pooled("drain", 50), 2),
            (".delay() in atomic(): p99 ms", pooled("drain", 99), 2),
            ("drain: tasks/s, first start to last finish", median("drain_per_s"), 0),
            ("drain: launch to drained, s", median("launch_to_drained_s"), 1),
            ("drain: CPU s of the process tree, launch to drained", median("cpu_s"), 2),
            ("drain: peak RSS MB, summed over the tree", median("rss_mb"), 1),
            ("drain: USS MB at the end, summed over the tree", median("uss_mb"), 1),
            ("drain: processes", median("processes"), 0),
            ("pickup when idle: p50 ms", pooled("pickup", 50), 1),
            ("pickup when idle: p99 ms", pooled("pickup", 99), 1)]
    table = []
    for label, figure, digits in rows:
        ours, theirs = figure("procqueue"), figure("flagsmith")
        table.append([label, f"{ours:,.{digits}f}", f"{theirs:,.{digits}f}", f"{ours / theirs:.3g}" if theirs else "-"])
    common.print_table(["figure", "procqueue", "Flagsmith", "ratio"], table)
    print("ratio: procqueue's figure / Flagsmith's (rates: >1 procqueue faster; ms, s, MB: <1 procqueue less). "
          "Rates, CPU and memory: the median of the rounds; percentiles: every round's samples pooled.")


if __name__ == "__main__":
    common.run_main(main)
