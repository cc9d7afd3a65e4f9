"""Another local user can neither make `procqueue-health` lie nor make procqueue write where
it points: each attack is made by a real second OS user (`nobody`), against real files.

The tests need root (to act as two users); CI runs as root.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from procqueue.errors import ConfigError
from procqueue.status import StatusFile

from helpers import REPO

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="acting as a second OS user needs root (CI runs as root)")

OTHER = "nobody"


@pytest.fixture
def other_user():
    try:
        return pwd.getpwnam(OTHER)
    except KeyError:
        pytest.skip(f"no {OTHER!r} user on this host")


@pytest.fixture
def shared_tmp():
    """A directory like /tmp: everyone may create entries, only the owner remove them."""
    path = Path(tempfile.mkdtemp(prefix="procqueue-shared-"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def as_user(user, script: str) -> None:
    """Run a shell script as `user`, as that user would from their own login."""
    subprocess.run(["sh", "-ec", script], check=True, timeout=30, user=user.pw_uid, group=user.pw_gid,
                   env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, cwd="/")


def healthy_document() -> str:
    """What a supervisor writes while all is well (no hostname: no pid to check)."""
    return json.dumps({"version": 1, "pid": 1, "state": "running", "updated_at": "now",
                       "updated_at_unix": time.time() + 3600, "config": {"graceperiodms": 20000},
                       "workers": [{"slot": 0, "pid": 2, "state": "idle", "heartbeat_age_seconds": 0.1,
                                    "task": None, "tasks_done": 0, "tasks_failed": 0, "restarts": 0,
                                    "rss_bytes": None, "stuck": None}]})


def run_command(entry: str, *args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", entry, *args], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(REPO), **env))


def health(*args: str, env: dict) -> subprocess.CompletedProcess:
    return run_command("from procqueue.health_probe import main; main()", *args, env=env)


def start_processor(*args: str, env: dict) -> subprocess.CompletedProcess:
    """The processor, expected to refuse to start: it must exit at once."""
    return subprocess.run([sys.executable, str(REPO / "bin" / "run-task-processor"), "--numthreads", "1", *args],
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(REPO), **env))


def test_a_status_directory_another_user_made_first_is_refused_by_processor_and_probe(other_user, shared_tmp):
    # Before: the processor wrote into the other user's directory, and while that user
    # kept a fresh document there, procqueue-health said healthy after the processor died.
    planted = shared_tmp / f"procqueue-{os.getuid()}"
    as_user(other_user, f"mkdir -m 777 {planted} && cat > {planted}/status.json <<'EOF'\n{healthy_document()}\nEOF")
    env = {"TMPDIR": str(shared_tmp)}
    probe = health(env=dict(env, PROCQUEUE_STATUS_FILE=""))
    assert probe.returncode == 1
    assert probe.stderr.strip() == (
        f"procqueue-health: unhealthy: status file not trusted: directory {planted} belongs to uid "
        f"{other_user.pw_uid}, not to uid 0 (this user): that user could rewrite what is in it "
        "(if another user runs the processor, name it with --owner)")
    started = start_processor(env=dict(env, PROCQUEUE_STATUS_FILE=""))
    assert started.returncode == 2, started.stderr
    [line] = started.stderr.strip().splitlines()
    assert line.endswith(f"unsafe --status-file {planted}/status.json: directory {planted} belongs to uid "
                         f"{other_user.pw_uid}, not to uid 0 (this user): that user could rewrite what is in it; "
                         "remove it or choose another path"), line
    assert json.loads((planted / "status.json").read_text())["pid"] == 1  # not written by us


def test_a_status_file_another_user_wrote_is_not_trusted_unless_that_user_is_named(other_user, shared_tmp):
    theirs = shared_tmp / "theirs"
    as_user(other_user, f"mkdir -m 755 {theirs} && cat > {theirs}/status.json <<'EOF'\n{healthy_document()}\nEOF")
    env = {"PROCQUEUE_STATUS_FILE": str(theirs / "status.json")}
    refused = health(env=env)
    assert refused.returncode == 1 and "not trusted" in refused.stderr
    # A probe run as root for a processor run as nobody says whose file it expects.
    assert health("--owner", OTHER, env=env).returncode == 0
    assert health("--owner", str(other_user.pw_uid), env=env).returncode == 0
    wrong = health("--owner", "no-such-user-here", env=env)
    assert wrong.returncode == 2 and "invalid value 'no-such-user-here' (expected a user name of this host, or a uid)" in wrong.stderr
    status = run_command("from procqueue.entry_points import procqueue_main; procqueue_main()", "status", env=env)
    assert status.returncode != 0 and "not trusted" in status.stderr and "Traceback" not in status.stderr
    bad_owner = run_command("from procqueue.entry_points import procqueue_main; procqueue_main()", "status",
                            "--owner", "no-such-user-here", env=env)
    assert bad_owner.returncode == 2 and bad_owner.stderr.strip().endswith(
        "invalid value for --owner: 'no-such-user-here' (expected a user name of this host, or a uid)")


def test_the_probe_for_another_users_processor_reads_that_users_default_file(other_user, shared_tmp):
    theirs = shared_tmp / f"procqueue-{other_user.pw_uid}"
    as_user(other_user, f"mkdir -m 700 {theirs} && cat > {theirs}/status.json <<'EOF'\n{healthy_document()}\nEOF")
    env = {"TMPDIR": str(shared_tmp), "PROCQUEUE_STATUS_FILE": ""}
    result = health("--owner", OTHER, "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["status_file"] == f"{theirs}/status.json"


def test_a_directory_link_another_user_planted_is_refused_and_its_target_untouched(other_user, shared_tmp, tmp_path):
    # Before: the processor followed the link and wrote its files where it pointed; run as
    # root, it overwrote a root-owned 0600 file there.
    target = tmp_path / "root-only"
    target.mkdir(mode=0o700)
    victim = target / "status.json"
    victim.write_text("precious")
    victim.chmod(0o600)
    planted = shared_tmp / f"procqueue-{os.getuid()}"
    as_user(other_user, f"ln -s {target} {planted}")
    started = start_processor(env={"TMPDIR": str(shared_tmp), "PROCQUEUE_STATUS_FILE": ""})
    assert started.returncode == 2
    assert f"unsafe --status-file {planted}/status.json: directory {planted} is a symbolic link" in started.stderr
    assert victim.read_text() == "precious" and sorted(p.name for p in target.iterdir()) == ["status.json"]
    probe = health(env={"TMPDIR": str(shared_tmp), "PROCQUEUE_STATUS_FILE": ""})
    assert probe.returncode == 1 and f"directory {planted} is a symbolic link" in probe.stderr


def test_a_directory_others_can_write_to_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ConfigError, match=rf"^unsafe --status-file {shared}/status.json: directory {shared} can be "
                                          r"written by its group and others \(mode 0777\)"):
        StatusFile(shared / "status.json").prepare()


def test_links_at_the_file_or_its_temporary_are_replaced_never_written_through(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    directory = tmp_path / "status"
    status = StatusFile(directory / "status.json")
    status.prepare()
    (directory / "status.json").unlink()
    (directory / "status.json").symlink_to(victim)
    (directory / status.temporary).symlink_to(victim)  # as a leftover of a pid reused
    status.write({"version": 1, "state": "running"})
    assert victim.read_text() == "precious"
    assert stat.S_ISREG(os.lstat(directory / "status.json").st_mode)
    assert json.loads((directory / "status.json").read_text())["state"] == "running"
    assert not (directory / status.temporary).exists()
    status.close()


def test_a_status_directory_swapped_for_a_link_after_start_is_not_written_through(tmp_path):
    # Once checked, the directory is held open: renaming it away and putting a link in its
    # place (as a user with rights on the parent could) changes nothing about where we write.
    parent = tmp_path / "parent"
    parent.mkdir()
    status = StatusFile(parent / "procqueue" / "status.json")
    status.prepare()
    (parent / "procqueue").rename(parent / "moved")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (parent / "procqueue").symlink_to(elsewhere)
    status.write({"version": 1, "state": "running"})
    assert list(elsewhere.iterdir()) == []
    assert json.loads((parent / "moved" / "status.json").read_text())["state"] == "running"
    status.close()
