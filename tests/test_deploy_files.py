"""The dashboard, alert rules, Kubernetes manifest and README name only metrics that a
real processor exports: a renamed metric must not silently blind an operator's alerts."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import yaml

from procqueue.http import ENDPOINTS
from prometheus_client import REGISTRY, generate_latest

import procqueue

from helpers import REPO, http_get, wait_until

import sample_tasks

DEPLOY = REPO / "deploy"
METRIC_NAME = re.compile(r"\bprocqueue_[a-z_]+[a-z]\b")
# Exported by the application that enqueues (its own /metrics), not by the processor.
APPLICATION_SIDE = {"procqueue_enqueued_tasks_total"}


@pytest.fixture(scope="module")
def exported_names(database_url, tmp_path_factory):
    """Every metric name a processor exports once it has run tasks of each outcome."""
    from helpers import ProcessorProcess

    scratch = tmp_path_factory.mktemp("deploy")  # module-scoped: pytest's retention policy does not cover it
    processor = ProcessorProcess(database_url, ["--import", "sample_tasks", "--numthreads", "1",
                                                "--metrics-port", "0"], scratch / "processor.log")
    try:
        procqueue.configure(database_url=database_url, schema="procqueue")
        task_ids = [sample_tasks.noop.delay(), sample_tasks.fail.delay(args=("x",))]
        wait_until(lambda: all(procqueue.get_task(i).finished_at for i in task_ids), timeout=30, message="tasks done")
        port = processor.metrics_port()
        wait_until(lambda: b"procqueue_queue_tasks" in http_get(port, "/metrics")[2], timeout=15, message="stats")
        text = http_get(port, "/metrics")[2].decode() + generate_latest(REGISTRY).decode()
        assert processor.stop() == 0
    finally:
        processor.kill()
        shutil.rmtree(scratch, ignore_errors=True)
    return {match for match in METRIC_NAME.findall(text) if not match.endswith("_created")}


def names_in(text: str) -> set:
    return set(METRIC_NAME.findall(text))


def test_alert_rules_are_valid_and_use_exported_metrics(exported_names):
    rules = yaml.safe_load((DEPLOY / "prometheus" / "procqueue-alerts.yml").read_text())["groups"][0]["rules"]
    assert len(rules) >= 4
    for rule in rules:
        assert rule["alert"].startswith("Procqueue") and rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
        assert names_in(rule["expr"]) <= exported_names, rule["alert"]


def test_dashboard_is_valid_json_and_uses_exported_metrics(exported_names):
    dashboard = json.loads((DEPLOY / "grafana" / "procqueue-dashboard.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(expressions) >= 10
    for expr in expressions:
        assert names_in(expr) <= exported_names, expr


def test_kubernetes_probe_runs_the_health_command():
    [deployment] = yaml.safe_load_all((DEPLOY / "kubernetes" / "processor.yaml").read_text())
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert container["livenessProbe"]["exec"]["command"] == ["procqueue-health"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz" and "/readyz" in ENDPOINTS
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["PROCQUEUE_METRICS_PORT"] == str(container["ports"][0]["containerPort"])


def test_readme_names_only_exported_metrics(exported_names):
    readme = (REPO / "README.md").read_text()
    mentioned = {name for name in names_in(readme) if not name.startswith("procqueue_demo")}
    assert mentioned, "the README documents the metrics"
    assert mentioned <= exported_names | APPLICATION_SIDE | family_names(exported_names)


def family_names(names: set) -> set:
    """Histogram families are documented by their base name."""
    return {re.sub(r"_(bucket|count|sum)$", "", name) for name in names}
