"""Scale: procqueue with a deep backlog, with a long history, and with several processors
on one database.

    .venv/bin/python bench/scale.py [--backlog 1000000] [--sample 10000] [--processors 1,2,4,8]

1. Backlog: the drain rate with --sample (10,000) tasks queued, then over the first
   --sample tasks with --backlog queued (a claim must not slow down as the queue deepens).
2. History: the whole backlog drained (finished rows stay for the retention period), then
   the table's and its indexes' sizes, what autovacuum did, and the drain rate of a fresh
   --sample tasks next to the first one (a claim must not slow down as finished rows pile up).
3. Scale-out: 1, 2, 4, 8 processors (--numthreads 2 each) draining --sample x 2 tasks at once.

A processor enqueues its retention clean-up task at start, which is why a drain "all of
it" counts one task more than the backlog.

Each drain reports tasks/s between the first claim and the last finish (from the run
records), the processors' CPU from the first finish to the last (start-up left out), and, where the server has pg_stat_statements (the embedded one here always does),
the mean time of the claim statement inside Postgres. Processors log at WARNING: a million
INFO lines would measure the log file.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

import psutil
import psycopg2

import bench_tasks
import common

TASK_NAME = bench_tasks.noop.task_name
PROCESSOR_ARGS = ["--numthreads", "2", "--log-level", "warning", "--import", "bench_tasks"]
POLL_SECONDS = 0.05


@dataclass
class Drain:
    label: str
    tasks: int
    seconds: float
    claim_ms: Optional[float]
    claims: Optional[int]
    cpu_seconds: float

    @property
    def rate(self) -> float:
        return self.tasks / self.seconds


def enqueue_in_sql(conn, count: int) -> None:
    """`count` no-op tasks in one INSERT ... SELECT: a million in seconds (the benchmark is
    of draining; enqueueing has bench/peers.py)."""
    with conn.cursor() as cur:
        cur.execute(f"INSERT INTO {common.SCHEMA}.tasks (task_name, args, kwargs) "
                    f"SELECT %s, '[]', '{{}}' FROM generate_series(1, %s)", (TASK_NAME, count))


def reset_statements(conn, stat_statements: bool) -> None:
    if stat_statements:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_stat_statements_reset()")


def claim_statistics(conn, stat_statements: bool):
    """(mean ms, calls) of the claim statement since the last reset (recorded under the
    text of its PREPARE, as workers prepare it)."""
    if not stat_statements:
        return None, None
    with conn.cursor() as cur:
        cur.execute("SELECT sum(total_exec_time) / nullif(sum(calls), 0), sum(calls)::bigint "
                    "FROM pg_stat_statements WHERE query LIKE '%%WITH picked AS%%FOR UPDATE SKIP LOCKED%%'")
        return cur.fetchone()


def runs_so_far(conn) -> int:
    with conn.cursor() as cur:
        cur.execute(f"SELECT coalesce(max(id), 0) FROM {common.SCHEMA}.task_runs")
        return cur.fetchone()[0]


def runs_since(conn, watermark: int) -> int:
    """Runs recorded since `watermark` (a range of the primary key: cheap to poll)."""
    with conn.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM {common.SCHEMA}.task_runs WHERE id > %s", (watermark,))
        return cur.fetchone()[0]


def seconds_for(conn, watermark: int, count: int) -> float:
    """From the first run's start since `watermark` to the `count`-th finish."""
    with conn.cursor() as cur:
        cur.execute(f"""
            WITH runs AS (SELECT started_at, finished_at FROM {common.SCHEMA}.task_runs WHERE id > %(mark)s)
            SELECT extract(epoch FROM (SELECT finished_at FROM runs ORDER BY finished_at OFFSET %(n)s - 1 LIMIT 1)
                                      - (SELECT min(started_at) FROM runs))::float8""",
                    {"mark": watermark, "n": count})
        return cur.fetchone()[0]


def drain(conn, url: str, label: str, *, sample: int, processors: int = 1, until_empty: bool = False,
          stat_statements: bool) -> List[Drain]:
    """Start `processors` processors and time the first `sample` tasks they finish (and,
    `until_empty`, the whole queue); they are stopped before anything is read back."""
    common.progress(label)
    reset_statements(conn, stat_statements)
    watermark = runs_so_far(conn)
    running = [common.Processor(url, PROCESSOR_ARGS) for _ in range(processors)]
    cpu: dict = {}
    # CPU from the first finished run (start-up is not the drain's), at the sample, at the end.
    cpu_at_first = cpu_at_sample = None
    claims_at_sample = (None, None)
    try:
        while True:
            for processor in running:
                processor.check_alive()
                sample_cpu(processor.pid, cpu)
            finished = runs_since(conn, watermark) if cpu_at_sample is None else sample
            if cpu_at_first is None and finished > 0:
                cpu_at_first = sum(cpu.values())
            if cpu_at_sample is None and finished >= sample:
                cpu_at_sample = sum(cpu.values())
                claims_at_sample = claim_statistics(conn, stat_statements)  # the sample's own
            if not until_empty and cpu_at_sample is not None or until_empty and not common.unfinished(conn):
                break
            time.sleep(POLL_SECONDS if cpu_at_sample is None else 1.0)
    finally:
        for processor in running:
            processor.stop()
    drains = [Drain(label, sample, seconds_for(conn, watermark, sample), *claims_at_sample,
                    cpu_at_sample - cpu_at_first)]
    if until_empty:
        total = runs_since(conn, watermark)
        drains.append(Drain(f"{label}: all of it", total, seconds_for(conn, watermark, total),
                            *claim_statistics(conn, stat_statements), sum(cpu.values()) - cpu_at_first))
    return drains


def sample_cpu(pid: int, cpu: dict) -> None:
    """CPU seconds so far of a processor and its workers, last seen per pid."""
    try:
        family = [psutil.Process(pid)] + psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return
    for process in family:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        cpu[process.pid] = times.user + times.system


def table_sizes(conn) -> List[tuple]:
    """Size of each table and index of the queue, with its dead rows and vacuums."""
    with conn.cursor() as cur:
        cur.execute("""
            SELECT c.relname, CASE c.relkind WHEN 'i' THEN 'index' ELSE 'table' END,
                   pg_relation_size(c.oid), s.n_live_tup, s.n_dead_tup, s.autovacuum_count, s.autoanalyze_count
            FROM pg_class AS c
            JOIN pg_namespace AS n ON n.oid = c.relnamespace
            LEFT JOIN pg_stat_user_tables AS s ON s.relid = c.oid
            WHERE n.nspname = %s AND c.relname IN (
                SELECT tablename FROM pg_tables WHERE schemaname = %s AND tablename IN ('tasks', 'task_runs')
                UNION ALL
                SELECT indexname FROM pg_indexes WHERE schemaname = %s AND tablename IN ('tasks', 'task_runs'))
            ORDER BY c.relkind DESC, pg_relation_size(c.oid) DESC""", (common.SCHEMA,) * 3)
        return cur.fetchall()


def has_stat_statements(conn) -> bool:
    with conn.cursor() as cur:
        try:
            cur.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            cur.execute("SELECT pg_stat_statements_reset()")
            return True
        except psycopg2.Error:
            return False


def print_drains(title: str, drains: Sequence[Drain], baseline: Drain) -> None:
    print(f"\n{title}")
    rows = [(d.label, f"{d.tasks:,}", f"{d.seconds:.2f}", f"{d.rate:,.0f}", f"{d.rate / baseline.rate:.2f}",
             "-" if d.claim_ms is None else f"{d.claim_ms:.3f}", "-" if d.claims is None else f"{d.claims:,}",
             f"{d.cpu_seconds / d.tasks * 1e6:.0f}")
            for d in drains]
    common.print_table(["drain", "tasks", "seconds", "tasks/s", "x first", "claim ms (mean)", "claims",
                        "processor CPU us/task"], rows)


def main() -> None:
    parser = common.argument_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--backlog", type=int, default=1_000_000, help="tasks queued for the deep drain")
    parser.add_argument("--sample", type=int, default=10_000, help="tasks timed per drain")
    parser.add_argument("--processors", default="1,2,4,8", help="comma-separated processor counts")
    args = parser.parse_args()
    counts = [int(n) for n in args.processors.split(",") if n.strip()]
    if args.sample < 1 or args.backlog < args.sample or not counts or min(counts) < 1:
        parser.error("need --sample >= 1, --backlog >= --sample, --processors of counts >= 1")
    print(f"procqueue scale: backlog {args.backlog:,}, {args.sample:,} tasks timed per drain; {common.machine()}")
    with common.bench_database(args.fast_disk, preload=("pg_stat_statements",)) as url:
        conn = common.connect(url)
        stats = has_stat_statements(conn)
        if not stats:
            print("(no pg_stat_statements on this server: claim times not shown)")

        common.reset_queue(conn)
        enqueue_in_sql(conn, args.sample)
        common.settle(conn)
        shallow = drain(conn, url, f"{args.sample:,} queued", sample=args.sample, stat_statements=stats)
        common.reset_queue(conn)
        enqueue_in_sql(conn, args.backlog)
        common.settle(conn)
        deep = drain(conn, url, f"{args.backlog:,} queued", sample=args.sample, until_empty=True,
                     stat_statements=stats)
        sizes = table_sizes(conn)
        enqueue_in_sql(conn, args.sample)
        after = drain(conn, url, f"{args.sample:,} queued, {args.backlog:,} finished rows kept", sample=args.sample,
                      stat_statements=stats)
        print_drains("Backlog and history (1 processor, --numthreads 2)", shallow + deep + after, shallow[0])
        print(f"\nAfter {args.backlog:,} tasks went through (finished rows are kept for the retention period):")
        common.print_table(["relation", "kind", "MB", "live rows", "dead rows", "autovacuums", "autoanalyzes"],
                           [(name, kind, f"{size / 2**20:.1f}", *(("-",) * 4 if live is None else
                                                                  (f"{live:,}", f"{dead:,}", vac, ana)))
                            for name, kind, size, live, dead, vac, ana in sizes])

        curve = []
        for count in counts:
            common.reset_queue(conn)
            enqueue_in_sql(conn, args.sample * 2)
            common.settle(conn)
            curve += drain(conn, url, f"{count} processor{'s' if count > 1 else ''} x 2 workers",
                           sample=args.sample * 2, processors=count, stat_statements=stats)
        print_drains("Scale-out: processors on one database", curve, curve[0])
        conn.close()


if __name__ == "__main__":
    common.run_main(main)
