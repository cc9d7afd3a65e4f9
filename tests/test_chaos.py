"""The chaos suite, short: three processors on a PostgreSQL of its own, attacked at random
by every kind of kill and restart for a minute, then drained and checked (bench/chaos.py
says how, and runs the long version)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from helpers import REPO

ATTACK_KINDS = ("worker", "supervisor", "node", "sigterm", "backend", "restart_fast", "restart_immediate")


@pytest.mark.timeout(360)
def test_under_a_minute_of_attacks_every_promise_holds():
    result = subprocess.run([sys.executable, str(REPO / "bench" / "chaos.py"), "--duration", "60", "--rate", "15",
                             "--attacks-per-minute", "30"], capture_output=True, text=True, timeout=340)
    report = result.stdout + "\n" + result.stderr[-4000:]
    assert result.returncode == 0, report
    assert "no violations" in result.stdout, report
    attacks = dict(re.findall(r"(\w+) (\d+)", re.search(r"^attacks +(.*)$", result.stdout, re.M).group(1)))
    assert all(int(attacks.get(kind, 0)) >= 1 for kind in ATTACK_KINDS), attacks  # every kind was tried
    assert re.search(r"drained: yes", result.stdout), report
