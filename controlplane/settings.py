"""All configuration in one typed object, read from environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def _default_data_dir() -> Path:
    return Path(os.environ.get("PBX_DATA_DIR", Path.cwd() / "var")).resolve()


@dataclass(frozen=True)
class Settings:
    """Service configuration. Every field has an environment variable `PBX_<NAME>`."""

    data_dir: Path = field(default_factory=_default_data_dir)
    # Empty DSN: start the embedded PostgreSQL under data_dir/postgres.
    dsn: str = ""
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    access_token_ttl: int = 3600
    refresh_token_ttl: int = 30 * 24 * 3600
    db_pool_min: int = 2
    db_pool_max: int = 10
    db_timeout: float = 5.0
    # Reverse proxies whose X-Forwarded-For is trusted for the API client CIDR allowlist.
    trusted_proxies: tuple[str, ...] = ()
    log_level: str = "INFO"
    # "uvloop" (default, when installed): the event loop of libuv, about a third less CPU per
    # network exchange than the standard one; "asyncio": the standard loop.
    event_loop: str = "uvloop"
    # Call control (run by each node's agent): when admission cannot reach the database in
    # time, "closed" refuses calls (503), "open" lets internal calls through uncounted.
    admission_fail_policy: str = "closed"
    # The FastAGI server the node's dialplan asks; advertise: the address the node dials.
    agi_host: str = "127.0.0.1"
    agi_port: int = 4573
    agi_advertise: str = ""
    # The node's CDR file as the agent sees it (shared volume); empty: no CDR import.
    cdr_file: str = ""
    # Where the agent imports that file: "process" (default), a child process of its own at
    # a lower CPU priority (cdr_import_nice, added to the agent's), so that settling CDRs never
    # delays an admission waiting for the agent's event loop or a CPU; "inline", in the
    # agent's own event loop.
    cdr_import: str = "process"
    cdr_import_nice: int = 5
    # Periodic CDR export files for billing systems (serve): folder and "daily"/"monthly".
    cdr_export_dir: str = ""
    cdr_export_period: str = "monthly"

    @property
    def postgres_dir(self) -> Path:
        return self.data_dir / "postgres"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: object) -> Settings:
        env = dict(os.environ if environ is None else environ)
        values: dict[str, object] = {}
        for name, f in cls.__dataclass_fields__.items():
            raw = env.get(f"PBX_{name.upper()}")
            if raw is None:
                continue
            default = f.default if f.default is not f.default_factory else None  # type: ignore[misc]
            if name == "data_dir":
                values[name] = Path(raw).resolve()
            elif name == "trusted_proxies":
                values[name] = tuple(p.strip() for p in raw.split(",") if p.strip())
            elif isinstance(default, bool):
                values[name] = raw.lower() in ("1", "true", "yes")
            elif isinstance(default, int):
                values[name] = int(raw)
            elif isinstance(default, float):
                values[name] = float(raw)
            else:
                values[name] = raw
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]
