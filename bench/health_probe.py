"""How fast the liveness probe answers, next to the interpreter's own start-up.

A Kubernetes exec probe runs `procqueue-health` every few seconds with a timeout (1 s by
default): its cost is process start-up, imports and one small file. This starts a real
processor, lets it write its status file, and then times, N times each:

    baseline: python -c pass                 the interpreter starting, nothing imported
    procqueue-health                         the probe (the console script, as a pod runs it)
    procqueue health                         the same verdict through the click CLI
    GET /healthz, GET /metrics               the same over HTTP, from a warm client

    .venv/bin/python bench/health_probe.py [--runs N]
"""

from __future__ import annotations

import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import List, Tuple

import common

BIN = Path(sys.executable).parent


def time_command(argv: List[str], runs: int) -> Tuple[List[float], float, int]:
    """Wall seconds of each run, CPU seconds per run, and the largest peak RSS (KiB)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    walls = []
    for _ in range(runs):
        started = time.perf_counter()
        result = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        walls.append(time.perf_counter() - started)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.decode()}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) / runs
    return walls, cpu, after.ru_maxrss


def time_request(url: str, runs: int) -> List[float]:
    walls = []
    for _ in range(runs):
        started = time.perf_counter()
        with urllib.request.urlopen(url, timeout=10) as response:
            response.read()
        walls.append(time.perf_counter() - started)
    return walls


def row(label: str, walls: List[float], baseline: float, cpu: str = "", rss: str = "") -> list:
    p50 = common.percentile(walls, 50)
    return [label, f"{p50 * 1000:.1f}", f"{common.percentile(walls, 90) * 1000:.1f}",
            f"{max(walls) * 1000:.1f}", f"{p50 / baseline:.2f}", cpu, rss]


def main() -> None:
    parser = common.argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40, help="runs of each command (default 40)")
    options = parser.parse_args()
    print(common.machine())
    with common.bench_database(options.fast_disk) as url, tempfile.TemporaryDirectory() as scratch:
        status = Path(scratch) / "status.json"
        processor = common.Processor(url, ["--numthreads", "2", "--metrics-port", "0", "--status-file", str(status),
                                           "--import", "bench_tasks", "--log-level", "warning"])
        try:
            port = wait_for_metrics_port(status, processor)
            rows = measure(status, port, options.runs)
        finally:
            processor.stop()
    common.print_table(["command", "p50 ms", "p90 ms", "max ms", "x baseline", "CPU ms/run", "peak RSS MB"], rows)


def wait_for_metrics_port(status: Path, processor: "common.Processor") -> int:
    import json

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        processor.check_alive()
        try:
            document = json.loads(status.read_text())
        except (OSError, ValueError):
            document = {}
        if document.get("state") == "running" and document.get("metrics_url"):
            return int(document["metrics_url"].rsplit(":", 1)[1])
        time.sleep(0.05)
    raise RuntimeError("the processor did not report a metrics endpoint within 60 s")


def measure(status: Path, port: int, runs: int) -> list:
    commands: List[Tuple[str, List[str]]] = [
        ("baseline: python -c pass", [sys.executable, "-c", "pass"]),
        ("procqueue-health", [str(BIN / "procqueue-health"), "--status-file", str(status)]),
        ("procqueue health", [str(BIN / "procqueue"), "health", "--status-file", str(status)]),
    ]
    rows, baseline = [], None
    for label, argv in commands:
        common.progress(label)
        time_command(argv, 3)  # warm the page cache
        walls, cpu, rss = time_command(argv, runs)
        baseline = baseline or common.percentile(walls, 50)
        rows.append(row(label, walls, baseline, f"{cpu * 1000:.1f}", f"{rss / 1024:.1f}"))
    for path in ("/healthz", "/metrics"):
        common.progress(f"GET {path}")
        url = f"http://127.0.0.1:{port}{path}"
        time_request(url, 3)
        rows.append(row(f"GET {path} (HTTP, warm client)", time_request(url, runs), baseline))
    return rows


if __name__ == "__main__":
    common.run_main(main)
