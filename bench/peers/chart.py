"""Draw bench/peers.py's figures as one PNG for the README (run in .bench-venv, which has
matplotlib): one panel per figure, one bar per configuration, the headline row first."""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = (  # (test, figure, title, higher is better)
    ("enqueue", "single_per_s", ".delay() one at a time, tasks/s", True),
    ("enqueue", "bulk_per_s", "bulk enqueue, tasks/s", True),
    ("drain", "tasks_per_s", "drain, no-op tasks/s", True),
    ("drain_10ms", "tasks_per_s", "drain, 10 ms of waiting per task, tasks/s", True),
    ("drain", "cpu_us_per_task", "worker CPU per no-op task, us", False),
    ("drain", "total_cpu_us_per_task", "CPU per no-op task, workers and their store, us", False),
    ("pickup", "p99_ms", "pickup latency when idle, p99 ms", False),
    ("idle", "xacts_per_s", "idle: transactions (Celery: Redis commands)/s", False),
    ("memory", "worker_pss_mb", "largest worker's PSS after a long drain, MB", False),
)


def main(source: str, target: str) -> None:
    document = json.loads(open(source).read())
    summary, labels = document["summary"], document["configs"]
    panels = [p for p in PANELS if any(p[1] in figures for figures in summary.get(p[0], {}).values())]
    columns = 2
    rows = (len(panels) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(12, 2.6 * rows), squeeze=False)
    for axis, (test, name, title, higher) in zip(axes.flat, panels):
        shown = [(label, summary[test][label][name]["median"]) for label in labels
                 if label in summary[test] and summary[test][label].get(name, {}).get("median") is not None]
        names = [label for label, _ in shown][::-1]
        values = [value for _, value in shown][::-1]
        colours = ["#2b6cb0" if n.startswith("procqueue") else "#a0aec0" for n in names]
        axis.barh(names, values, color=colours)
        axis.set_title(f"{title} ({'more' if higher else 'less'} is better)", fontsize=9)
        axis.tick_params(labelsize=8)
        for position, value in enumerate(values):
            axis.text(value, position, f" {value:,.0f}" if value >= 10 else f" {value:.2f}", va="center", fontsize=7)
    for axis in list(axes.flat)[len(panels):]:
        axis.axis("off")
    figure.suptitle(f"procqueue and its peers, medians of {document['rounds']} round(s): {document['machine']}",
                    fontsize=10)
    figure.tight_layout()
    figure.savefig(target, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
