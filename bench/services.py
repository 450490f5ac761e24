"""What the benchmarks that run the whole service share: the `pbxctl` command, its
environment, an embedded PostgreSQL and the API as a subprocess, each started with a
timeout. `stack` is the benchmark's own record of what it started: it has `workdir`,
`pg`, `postmaster`, `api`, `api_log` and `tail(path)`."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import BenchError, log

ROOT = Path(__file__).resolve().parent.parent


def pbxctl(*args: str) -> list[str]:
    script = Path(sys.executable).parent / "pbxctl"
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-m", "controlplane.cli", *args]


def service_env(stack: Any, dsn: str, **extra: str) -> dict[str, str]:
    return {**os.environ, "PBX_DSN": dsn, "PBX_DATA_DIR": str(stack.workdir / "data"),
            **extra}


async def start_postgres(stack: Any) -> str:
    from controlplane.db.embedded import EmbeddedPostgres

    stack.pg = EmbeddedPostgres(stack.workdir / "pg")
    log("starting embedded PostgreSQL")
    loop = asyncio.get_running_loop()
    try:
        dsn = await asyncio.wait_for(loop.run_in_executor(None, stack.pg.start), timeout=180)
    except TimeoutError:
        raise BenchError("embedded PostgreSQL did not start within 180s") from None
    pid_file = stack.pg.pgdata / "postmaster.pid"
    stack.postmaster = int(pid_file.read_text().split()[0]) if pid_file.exists() else None
    return str(dsn)


def spawn_api(stack: Any, dsn: str, port: int) -> None:
    # A long run outlives the default token (a 50,000-extension provisioning run takes hours).
    env = service_env(stack, dsn, PBX_HTTP_HOST="127.0.0.1", PBX_HTTP_PORT=str(port),
                      PBX_LOG_LEVEL="WARNING", PBX_ACCESS_TOKEN_TTL="86400")
    with stack.api_log.open("wb") as out:
        stack.api = subprocess.Popen(pbxctl("serve"), env=env, cwd=ROOT, stdout=out,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


async def start_api(stack: Any, dsn: str, port: int) -> str:
    """Spawn `pbxctl serve` and wait for /readyz; the API's base URL."""
    spawn_api(stack, dsn, port)
    assert stack.api is not None
    return await wait_ready(f"http://127.0.0.1:{port}", stack.api,
                            lambda: stack.tail(stack.api_log), "the API")


async def wait_ready(base: str, proc: Any, tail: Any, what: str, within: float = 60) -> str:
    """Poll `base`/readyz until 200; `base`. Fails when `proc` exits first or time is up,
    with `tail()` (the end of its log)."""
    import aiohttp

    deadline = time.monotonic() + within
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise BenchError(f"{what} exited ({proc.returncode}):\n" + tail())
            try:
                async with http.get(base + "/readyz") as r:
                    if r.status == 200:
                        return base
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.2)
    raise BenchError(f"{what} was not ready within {within:g}s:\n" + tail())


def stop_services(stack: Any) -> None:
    """Stop the API, the sandboxed node (making sure no Asterisk process of it is left) and
    PostgreSQL; each failure is reported and the rest still stopped."""
    import signal

    from bench.common import stop_process

    stop_process(stack.api, "the API")
    if stack.node is not None:
        try:
            pid = stack.node.pid
            stack.node.stop()
            from controlplane.sandbox import namespace

            if pid is not None and namespace.is_node_process(pid, stack.node.root):
                log(f"Asterisk pid {pid} still runs after stop: SIGKILL to its group")
                namespace.signal_group(pid, signal.SIGKILL)
            else:
                log("node stopped: no Asterisk process left")
        except Exception as exc:  # noqa: BLE001 - report and go on cleaning up
            log(f"stopping the node failed: {exc}")
    if stack.pg is not None:
        try:
            stack.pg.stop()
        except Exception as exc:  # noqa: BLE001
            log(f"stopping PostgreSQL failed: {exc}")
