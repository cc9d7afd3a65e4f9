"""`procqueue-health` (and `procqueue health`): the health verdict as a command, for
Kubernetes exec probes. It must answer in a few tens of milliseconds, so it imports only
the standard library, `procqueue.health`, `procqueue.config` and
`procqueue.private_files` (all stdlib-only); never psycopg2, click or prometheus-client.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Mapping, Optional, Sequence

from .config import default_status_file
from .health import (DEFAULT_MAX_AGE_SECONDS, DEFAULT_MIN_HEALTHY_WORKERS, EXIT_HEALTHY, EXIT_UNHEALTHY, EXIT_USAGE,
                     check_file, summary_line)
from .private_files import user_id


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors in one line and exit code 2, as every procqueue command."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"invalid value {raw!r} (expected seconds > 0)")
    return value


def _count(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid value {raw!r} (expected an integer >= 0)")
    return value


def _user(raw: str) -> int:
    try:
        return user_id(raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid value {exc}") from None


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog=prog,
        description="Exit 0 if the procqueue processor writing the status file is healthy, 1 if not "
                    "(with the reason on stderr), 2 on a usage error. For Kubernetes liveness probes.",
    )
    parser.add_argument("--status-file", type=Path, default=None, metavar="PATH",
                        help=f"the processor's status file [env: PROCQUEUE_STATUS_FILE; default: {default_status_file()}, "
                             "or that of the --owner user]")
    parser.add_argument("--max-age", type=_positive_seconds, default=DEFAULT_MAX_AGE_SECONDS, metavar="SECONDS",
                        help=f"unhealthy if the supervisor has not updated the file for this long "
                             f"[default: {DEFAULT_MAX_AGE_SECONDS:g}]")
    parser.add_argument("--min-healthy-workers", type=_count, default=DEFAULT_MIN_HEALTHY_WORKERS, metavar="N",
                        help="unhealthy if fewer workers are running and not stuck "
                             f"[default: {DEFAULT_MIN_HEALTHY_WORKERS}]")
    parser.add_argument("--ready", action="store_true",
                        help="ask the readiness question instead: is it running tasks now (not starting, "
                             "waiting for its database or stopping)? For readiness probes")
    parser.add_argument("--owner", type=_user, default=None, metavar="USER",
                        help="the user (name or uid) the processor runs as; a status file belonging to anyone "
                             "else is not trusted [default: the user running this command]")
    parser.add_argument("--json", action="store_true", help="print the verdict and its reasons as JSON")
    return parser


def run(argv: Optional[Sequence[str]] = None, prog: str = "procqueue-health",
        env: Optional[Mapping[str, str]] = None) -> int:
    """`env`: where PROCQUEUE_STATUS_FILE and TMPDIR are read (default: the environment;
    `manage.py checktaskprocessorthreadhealth`: Django settings over it)."""
    options = build_parser(prog).parse_args(argv)
    path = options.status_file or default_status_file(env, uid=options.owner)
    verdict = check_file(path, max_age=options.max_age, min_healthy_workers=options.min_healthy_workers,
                         ready=options.ready, owner=options.owner)
    if options.json:
        print(json.dumps(dict(asdict(verdict), status_file=str(path)), indent=2))
    elif verdict.healthy:
        print(summary_line(verdict, ready=options.ready))
    if not verdict.healthy:
        print(f"{prog}: {'not ready' if options.ready else 'unhealthy'}: {summary_line(verdict)}", file=sys.stderr)
        return EXIT_UNHEALTHY
    return EXIT_HEALTHY


def main() -> None:
    """Console entry point of `procqueue-health`."""
    sys.exit(run())
