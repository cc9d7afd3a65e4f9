"""The deployment files, checked as their own tools check them and against what procqueue
really does.

The dashboard, alert rules, Kubernetes manifest and README name only metrics that a real
processor exports: a renamed metric must not silently blind an operator's alerts. The
Kubernetes manifests pass `kubernetes-validate --strict` and the restricted Pod Security
Standard; docker-compose.yml passes the Compose Specification's schema; the Dockerfile is
clean under hadolint. Those programs come with the test extra: missing, their tests skip
(naming the install command), or fail under CI=true. The structural checks need only YAML.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Tuple

import pytest
import yaml

from procqueue import cli, config
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


# -- the checking programs ----------------------------------------------------------

def checker(name: str) -> str:
    """A program the test extra installs, from this Python's environment first. Missing,
    the test skips naming the install command, but fails under CI, which installs it."""
    found = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if found is None:
        message = f"{name} is not installed: pip install -e '.[test]' installs it"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


def run_checker(command: List[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)


KUBERNETES = DEPLOY / "kubernetes"
MANIFEST_FILES = sorted(KUBERNETES.glob("*.yaml"))


def manifests() -> List[dict]:
    return [document for path in MANIFEST_FILES for document in yaml.safe_load_all(path.read_text()) if document]


def manifest(kind: str) -> dict:
    [found] = [document for document in manifests() if document["kind"] == kind]
    return found


def pod_templates() -> List[Tuple[str, dict]]:
    """Every pod a manifest makes, as (kind/name, pod template with metadata and spec)."""
    templates = []
    for document in manifests():
        name = f"{document['kind']}/{document['metadata']['name']}"
        if document["kind"] == "Pod":
            templates.append((name, document))
        elif document["kind"] == "CronJob":
            templates.append((name, document["spec"]["jobTemplate"]["spec"]["template"]))
        elif "template" in document.get("spec", {}):
            templates.append((name, document["spec"]["template"]))
    return templates


def test_kubernetes_manifests_pass_kubernetes_validate_strict():
    assert {"Deployment", "Job", "PodDisruptionBudget"} <= {document["kind"] for document in manifests()}
    result = run_checker([checker("kubernetes-validate"), "--strict", *map(str, MANIFEST_FILES)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" passed ") == len(manifests()), result.stdout


# -- the restricted Pod Security Standard -------------------------------------------
# As https://kubernetes.io/docs/concepts/security/pod-security-standards/ defines the
# "restricted" profile: every baseline control, in its restricted form where restricted
# tightens it. A field is a path in the pod template: `[*]` is every item of a list (or
# map keys matching a glob), and `{container}` every container, init container and
# ephemeral container.

CONTAINER_KINDS = ("containers", "initContainers", "ephemeralContainers")
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}
RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                           "projected", "secret"}
SELINUX_TYPES = {"container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
SECCOMP_TYPES = {"RuntimeDefault", "Localhost"}


@dataclass(frozen=True)
class Control:
    name: str  # the control, as the Pod Security Standards page titles it
    field: str
    allowed: Callable[[Any], bool]  # given the field's value, None when unset
    expected: str
    inherits: Optional[str] = None  # the pod-level field a container's unset one falls back to


def unset_or(*values: Any) -> Callable[[Any], bool]:
    return lambda value: value is None or value in values


RESTRICTED = [
    Control("HostProcess", "spec.securityContext.windowsOptions.hostProcess", unset_or(False), "unset or false"),
    Control("HostProcess", "spec.{container}.securityContext.windowsOptions.hostProcess", unset_or(False),
            "unset or false"),
    Control("Host Namespaces", "spec.hostNetwork", unset_or(False), "unset or false"),
    Control("Host Namespaces", "spec.hostPID", unset_or(False), "unset or false"),
    Control("Host Namespaces", "spec.hostIPC", unset_or(False), "unset or false"),
    Control("Privileged Containers", "spec.{container}.securityContext.privileged", unset_or(False), "unset or false"),
    Control("HostPath Volumes", "spec.volumes[*].hostPath", unset_or(), "unset"),
    Control("Host Ports", "spec.{container}.ports[*].hostPort", unset_or(0), "unset or 0"),
    Control("AppArmor", "spec.securityContext.appArmorProfile.type", unset_or("RuntimeDefault", "Localhost"),
            "unset, RuntimeDefault or Localhost"),
    Control("AppArmor", "spec.{container}.securityContext.appArmorProfile.type",
            unset_or("RuntimeDefault", "Localhost"), "unset, RuntimeDefault or Localhost"),
    Control("AppArmor", "metadata.annotations[container.apparmor.security.beta.kubernetes.io/*]",
            lambda value: value is None or value == "runtime/default" or value.startswith("localhost/"),
            "runtime/default or localhost/*"),
    Control("SELinux", "spec.securityContext.seLinuxOptions.type", unset_or("", *SELINUX_TYPES),
            f"unset or one of {sorted(SELINUX_TYPES)}"),
    Control("SELinux", "spec.{container}.securityContext.seLinuxOptions.type", unset_or("", *SELINUX_TYPES),
            f"unset or one of {sorted(SELINUX_TYPES)}"),
    Control("SELinux", "spec.securityContext.seLinuxOptions.user", unset_or(""), "unset"),
    Control("SELinux", "spec.{container}.securityContext.seLinuxOptions.user", unset_or(""), "unset"),
    Control("SELinux", "spec.securityContext.seLinuxOptions.role", unset_or(""), "unset"),
    Control("SELinux", "spec.{container}.securityContext.seLinuxOptions.role", unset_or(""), "unset"),
    Control("/proc Mount Type", "spec.{container}.securityContext.procMount", unset_or("Default"), "unset or Default"),
    Control("Sysctls", "spec.securityContext.sysctls[*].name", unset_or(*SAFE_SYSCTLS), "a safe sysctl"),
    # The restricted profile's own controls.
    Control("Volume Types", "spec.volumes[*]", lambda volume: set(volume) - {"name"} <= RESTRICTED_VOLUME_TYPES,
            f"a volume of a type in {sorted(RESTRICTED_VOLUME_TYPES)}"),
    Control("Privilege Escalation", "spec.{container}.securityContext.allowPrivilegeEscalation",
            lambda value: value is False, "false"),
    Control("Running as Non-root", "spec.{container}.securityContext.runAsNonRoot", lambda value: value is True,
            "true", inherits="spec.securityContext.runAsNonRoot"),
    Control("Running as Non-root user", "spec.securityContext.runAsUser", lambda value: value != 0, "unset or not 0"),
    Control("Running as Non-root user", "spec.{container}.securityContext.runAsUser", lambda value: value != 0,
            "unset or not 0"),
    Control("Seccomp", "spec.securityContext.seccompProfile.type", unset_or(*SECCOMP_TYPES),
            "unset (set on every container) or RuntimeDefault or Localhost"),
    Control("Seccomp", "spec.{container}.securityContext.seccompProfile.type", lambda value: value in SECCOMP_TYPES,
            "RuntimeDefault or Localhost", inherits="spec.securityContext.seccompProfile.type"),
    Control("Capabilities", "spec.{container}.securityContext.capabilities.drop",
            lambda value: value is not None and "ALL" in value, "a list that includes ALL"),
    Control("Capabilities", "spec.{container}.securityContext.capabilities.add[*]", unset_or("NET_BIND_SERVICE"),
            "only NET_BIND_SERVICE"),
]
SEGMENT = re.compile(r"([^.\[\]]+)|\[([^\]]+)\]")


def field_values(document: dict, field: str) -> Iterator[Tuple[str, Any]]:
    """(concrete path, value or None) for every place `field` names in the document; a
    list wildcard over a missing list names none."""
    kinds = [kind + "[*]" for kind in CONTAINER_KINDS] if "{container}" in field else [""]
    for kind in kinds:
        segments = [(name, pattern) for name, pattern in SEGMENT.findall(field.replace("{container}", kind))]
        yield from _walk(document, segments, "")


def _walk(node: Any, segments: list, path: str) -> Iterator[Tuple[str, Any]]:
    if not segments:
        yield path, node
        return
    (name, pattern), rest = segments[0], segments[1:]
    if name:
        yield from _walk(node.get(name) if isinstance(node, dict) else None, rest, f"{path}.{name}".lstrip("."))
    elif isinstance(node, list):  # items named by their `name` where they have one (containers, volumes)
        for index, item in enumerate(node):
            label = item.get("name", index) if isinstance(item, dict) else index
            yield from _walk(item, rest, f"{path}[{label}]")
    elif isinstance(node, dict):
        for key, value in node.items():
            if fnmatch.fnmatchcase(key, pattern):
                yield from _walk(value, rest, f"{path}[{key}]")


def restricted_violations(pod_template: dict) -> List[str]:
    """One line per field that breaks a control of the restricted profile."""
    violations = []
    for control in RESTRICTED:
        for path, value in field_values(pod_template, control.field):
            if value is None and control.inherits:
                [(_, value)] = field_values(pod_template, control.inherits)
                path = f"{path} (or {control.inherits})"
            if not control.allowed(value):
                violations.append(f"{control.name}: {path} is {value!r}, expected {control.expected}")
    return violations


@pytest.mark.parametrize("name, template", pod_templates(), ids=[name for name, _ in pod_templates()])
def test_pod_meets_the_restricted_pod_security_standard(name, template):
    assert restricted_violations(template) == []


def test_restricted_check_names_each_field_it_rejects():
    """The check itself: the Deployment as it was before it was hardened, plus a few
    classic mistakes, fails on exactly the fields at fault."""
    template = {
        "metadata": {"annotations": {"container.apparmor.security.beta.kubernetes.io/processor": "unconfined"}},
        "spec": {
            "hostPID": True,
            "securityContext": {"runAsUser": 0, "sysctls": [{"name": "kernel.msgmax", "value": "1"}]},
            "containers": [{"name": "processor", "ports": [{"containerPort": 9464, "hostPort": 9464}],
                            "securityContext": {"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
                                                "capabilities": {"add": ["SYS_ADMIN"]}}}],
            "initContainers": [{"name": "setup", "securityContext": {"privileged": True, "runAsNonRoot": True,
                                                                     "seccompProfile": {"type": "Unconfined"}}}],
            "volumes": [{"name": "tmp", "emptyDir": {}}, {"name": "host", "hostPath": {"path": "/"}}],
        },
    }
    fields = {violation.split(" is ")[0] for violation in restricted_violations(template)}
    assert fields == {
        "Host Namespaces: spec.hostPID",
        "Running as Non-root user: spec.securityContext.runAsUser",
        "Sysctls: spec.securityContext.sysctls[kernel.msgmax].name",
        "AppArmor: metadata.annotations[container.apparmor.security.beta.kubernetes.io/processor]",
        "Host Ports: spec.containers[processor].ports[0].hostPort",
        "Capabilities: spec.containers[processor].securityContext.capabilities.add[0]",
        "Capabilities: spec.containers[processor].securityContext.capabilities.drop",
        "Capabilities: spec.initContainers[setup].securityContext.capabilities.drop",
        "Running as Non-root: spec.containers[processor].securityContext.runAsNonRoot "
        "(or spec.securityContext.runAsNonRoot)",
        "Seccomp: spec.containers[processor].securityContext.seccompProfile.type "
        "(or spec.securityContext.seccompProfile.type)",
        "Seccomp: spec.initContainers[setup].securityContext.seccompProfile.type",
        "Privileged Containers: spec.initContainers[setup].securityContext.privileged",
        "Privilege Escalation: spec.initContainers[setup].securityContext.allowPrivilegeEscalation",
        "HostPath Volumes: spec.volumes[host].hostPath",
        "Volume Types: spec.volumes[host]",
    }


# -- what the manifests say about procqueue -----------------------------------------

def containers_of(template: dict) -> List[dict]:
    return [container for kind in CONTAINER_KINDS for container in template["spec"].get(kind, [])]


def environment_of(container: dict) -> dict:
    return {item["name"]: item for item in container.get("env", [])}


@pytest.mark.parametrize("name, template", pod_templates(), ids=[name for name, _ in pod_templates()])
def test_pods_write_only_to_memory_volumes_and_take_the_password_from_a_secret(name, template):
    volumes = {volume["name"]: volume for volume in template["spec"].get("volumes", [])}
    assert template["spec"]["securityContext"]["runAsUser"] == dockerfile_user()[0], "the image's USER"
    for container in containers_of(template):
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, container["name"]
        assert container["resources"]["requests"] and container["resources"]["limits"]["memory"], container["name"]
        mounts = {mount["mountPath"]: volumes[mount["name"]] for mount in container.get("volumeMounts", [])}
        assert "emptyDir" in mounts["/tmp"], "$TMPDIR: the metrics files, tasks' temporary files"
        environment = environment_of(container)
        status_file = environment.get("PROCQUEUE_STATUS_FILE", {}).get("value")
        if status_file:
            [holder] = [path for path in mounts if Path(status_file).is_relative_to(path)]
            assert "emptyDir" in mounts[holder] and Path(status_file).parent != Path(holder), \
                "the processor makes the status file's directory (0700) inside the volume"
        assert environment["DATABASE_URL"]["valueFrom"]["secretKeyRef"]["key"], "no URL (password) in the manifest"


def test_processor_drains_within_its_termination_grace_period():
    template = manifest("Deployment")["spec"]["template"]
    [container] = template["spec"]["containers"]
    shutdown_timeout = float(flag_value(container["args"], "--shutdown-timeout"))
    # After the timeout it still kills what runs and puts tasks back before SIGKILL comes.
    assert template["spec"]["terminationGracePeriodSeconds"] - shutdown_timeout >= 5


def test_migration_job_and_disruption_budget():
    job = manifest("Job")["spec"]["template"]
    [container] = job["spec"]["containers"]
    assert container["command"] == ["procqueue", "migrate"] and "migrate" in cli.main.commands
    assert container["image"] == manifest("Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert job["spec"]["restartPolicy"] in ("Never", "OnFailure")
    budget, deployment = manifest("PodDisruptionBudget"), manifest("Deployment")
    selector = budget["spec"]["selector"]["matchLabels"]
    assert selector == deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert not selector.items() <= job["metadata"]["labels"].items(), "the Job's pods are not the processor's"
    assert budget["spec"].get("maxUnavailable", 0) or budget["spec"]["minAvailable"] < deployment["spec"]["replicas"]


def test_processor_arguments_are_run_task_processor_flags():
    [container] = manifest("Deployment")["spec"]["template"]["spec"]["containers"]
    for args in (container["args"], compose()["services"]["processor"]["command"]):
        context = cli.run_task_processor.make_context("run-task-processor", list(args))
        assert context.params["imports"], args


def flag_value(args: List[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_kubernetes_probes_pass_for_a_processor_run_as_the_manifest_runs_it(database_url, tmp_path):
    """The manifest's liveness command and readiness path, against a real processor given
    the manifest's arguments and environment, with its volumes as emptyDirs are made
    (a directory anyone can write to)."""
    from helpers import ProcessorProcess

    [container] = manifest("Deployment")["spec"]["template"]["spec"]["containers"]
    mounts = {mount["mountPath"]: tmp_path / mount["name"] for mount in container["volumeMounts"]}
    for directory in mounts.values():
        directory.mkdir()
        directory.chmod(0o777)
    status_file = environment_of(container)["PROCQUEUE_STATUS_FILE"]["value"]
    [(holder, directory)] = [(path, local) for path, local in mounts.items() if status_file.startswith(path + "/")]
    environment = {"PROCQUEUE_STATUS_FILE": str(directory / Path(status_file).relative_to(holder)),
                   "TMPDIR": str(mounts["/tmp"])}
    args = [arg for arg in container["args"] if arg != "myapp.tasks"]
    args = [*args[:args.index("--import") + 1], "sample_tasks", *args[args.index("--import") + 1:]]
    processor = ProcessorProcess(database_url, [*args, "--metrics-port", "0"], tmp_path / "processor.log",
                                 extra_env=environment)
    try:
        # Its own status file, where the manifest puts it (ProcessorProcess looks elsewhere).
        port = int(wait_until(lambda: metrics_url_in(Path(environment["PROCQUEUE_STATUS_FILE"])), timeout=15,
                              message=processor.log).rsplit(":", 1)[1])
        probe = [checker(container["livenessProbe"]["exec"]["command"][0]),
                 *container["livenessProbe"]["exec"]["command"][1:]]
        wait_until(lambda: subprocess.run(probe, env=dict(os.environ, **environment), capture_output=True,
                                          timeout=10).returncode == 0, timeout=30, message="liveness probe passes")
        ready = container["readinessProbe"]["httpGet"]["path"]
        wait_until(lambda: http_get(port, ready)[0] == 200, timeout=30, message=f"{ready} answers 200")
        assert processor.stop() == 0
    finally:
        processor.kill()


def metrics_url_in(status_file: Path) -> Optional[str]:
    try:
        return json.loads(status_file.read_text()).get("metrics_url")
    except (OSError, ValueError):
        return None


# -- the Dockerfile -----------------------------------------------------------------

DOCKERFILE = REPO / "Dockerfile"


def dockerfile_instructions() -> List[Tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def dockerfile_user() -> Tuple[int, int]:
    [user] = [arguments for instruction, arguments in dockerfile_instructions() if instruction == "USER"]
    uid, gid = user.split(":")
    return int(uid), int(gid)


def test_dockerfile_is_clean_under_hadolint():
    result = run_checker([checker("hadolint"), "--no-color", str(DOCKERFILE)])
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def test_dockerfile_runs_as_a_numeric_user_from_a_pinned_base():
    instructions = dockerfile_instructions()
    assert dockerfile_user()[0] > 0, "a numeric, non-root USER: what runAsNonRoot can verify"
    for instruction, arguments in instructions:
        if instruction == "FROM":
            image = arguments.split()[0]
            assert re.search(r":\d+\.\d+\.\d+-", image) or "@sha256:" in image, f"{image}: pin a release"
    assert instructions[-1] == ("CMD", '["--help"]') and ("ENTRYPOINT", '["run-task-processor"]') in instructions


def test_docker_build_context_holds_what_the_dockerfile_copies():
    """.dockerignore leaves out everything (a .venv is hundreds of megabytes) but what is
    copied: each COPY source must exist and be let back in."""
    let_in = {line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
              if line.startswith("!")}
    for instruction, arguments in dockerfile_instructions():
        if instruction == "COPY" and not arguments.startswith("--from"):
            for source in arguments.split()[:-1]:
                assert (REPO / source).exists() and source.rstrip("/") in let_in, source


# -- docker-compose.yml -------------------------------------------------------------

COMPOSE_FILE = REPO / "docker-compose.yml"


def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def test_compose_file_matches_the_compose_specification():
    result = run_checker([checker("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_services_start_in_order():
    services = compose()["services"]
    assert set(services) == {"secrets", "postgres", "migrate", "app", "processor", "prometheus"}
    conditions = {name: {needed: spec["condition"] for needed, spec in service.get("depends_on", {}).items()}
                  for name, service in services.items()}
    assert conditions == {
        "secrets": {},
        "postgres": {"secrets": "service_completed_successfully"},
        "migrate": {"postgres": "service_healthy"},
        "app": {"migrate": "service_completed_successfully"},
        "processor": {"migrate": "service_completed_successfully"},
        "prometheus": {"processor": "service_started"},
    }
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    assert services["migrate"]["entrypoint"] == ["procqueue", "migrate"]
    assert services["app"]["entrypoint"][:3] == ["python", "-m", "procqueue.examples"]
    assert "entrypoint" not in services["processor"], "the image's: run-task-processor"
    assert flag_value(services["processor"]["command"], "--import") == "procqueue.examples"


def test_compose_gives_procqueue_its_database_without_a_password_in_sight():
    services = compose()["services"]
    for name in ("migrate", "app", "processor"):
        environment = services[name]["environment"]
        url = environment["DATABASE_URL"]
        assert url.startswith("postgresql://") and not config.has_password(url), name
        assert environment["PGPASSFILE"].startswith("/run/procqueue-secrets/"), name
        assert str(services[name]["user"]).split(":")[0] == str(dockerfile_user()[0]), name
        assert services[name]["read_only"] is True and "/tmp" in services[name]["tmpfs"], name
    # The application decides how .delay() runs; the value must be one procqueue accepts.
    assert config.task_run_method_from_env(services["app"]["environment"]).value == "TASK_PROCESSOR"
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"].startswith("/run/procqueue-secrets/")
    everything = COMPOSE_FILE.read_text()
    assert "POSTGRES_PASSWORD:" not in everything and "PGPASSWORD" not in everything


def test_compose_mounts_files_that_exist():
    for name, service in compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (REPO / source).is_file(), f"{name} mounts {source}"


def test_compose_prometheus_scrapes_the_processor_with_the_shipped_rules():
    services = compose()["services"]
    mounted = dict(volume.split(":")[:2] for volume in services["prometheus"]["volumes"])
    [configuration] = [source for source, target in mounted.items() if target == "/etc/prometheus/prometheus.yml"]
    prometheus = yaml.safe_load((REPO / configuration).read_text())
    [job] = prometheus["scrape_configs"]
    assert job["job_name"] == "procqueue", "ProcqueueProcessorDown selects up{job=\"procqueue\"}"
    port = services["processor"]["environment"]["PROCQUEUE_METRICS_PORT"]
    assert job["static_configs"][0]["targets"] == [f"processor:{port}"]
    rule_files = {target: source for source, target in mounted.items()}
    assert [rule_files[path] for path in prometheus["rule_files"]] == ["./deploy/prometheus/procqueue-alerts.yml"]


def test_compose_processor_drains_before_docker_kills_it():
    processor = compose()["services"]["processor"]
    grace = int(processor["stop_grace_period"].rstrip("s"))
    assert grace - float(flag_value(processor["command"], "--shutdown-timeout")) >= 5
