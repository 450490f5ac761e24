"""`pbxctl`: one command-line entry for the control plane."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import dataclasses
import functools
import json
import logging
import os
import signal
import sys
from typing import Any

from controlplane.eventloop import check as check_loop
from controlplane.eventloop import run_loop
from controlplane.settings import Settings

log = logging.getLogger("pbxctl")


async def _open(settings: Settings, warm: Any = None) -> Any:
    from controlplane.db.pool import create_pool, migrate, resolve_dsn, warm_pool

    dsn = await asyncio.get_running_loop().run_in_executor(None, resolve_dsn, settings)
    pool = await create_pool(dsn, settings, warm=warm)
    async with pool.acquire() as conn:
        applied = await migrate(conn)
    if applied:
        log.info("migrations applied: %s", ", ".join(applied))
        if warm is not None:
            await warm_pool(pool, warm)
    return pool


async def _serve(settings: Settings, demo: bool, sandbox: bool = False) -> None:
    from aiohttp import web

    from controlplane import bootstrap
    from controlplane.api.app import build_app
    from controlplane.calls.node_control import report_failure

    pool = await _open(settings)
    stop = asyncio.Event()
    background: list[asyncio.Task[Any]] = []
    node_id = None
    if sandbox:
        sandbox_node, agent = await _sandbox_with_agent(settings, pool, "node1", "127.0.0.2")
        node_id = agent.node.id
        background.append(asyncio.create_task(agent.run(stop), name="node1 agent"))
    creds_file = settings.data_dir / "credentials.json"
    async with pool.acquire() as conn:
        first: dict[str, Any] = {}
        operator = await bootstrap.ensure_operator(conn)
        if operator:
            first["operator"] = operator
        if demo:
            first.update(await bootstrap.ensure_demo(conn, node_id=node_id))
    if first:
        saved = json.loads(creds_file.read_text()) if creds_file.exists() else {}
        saved.update(first)
        bootstrap.save_credentials(creds_file, saved)
        print(f"First-start credentials written to {creds_file} (mode 0600).", flush=True)
    if demo and creds_file.exists():
        # Development only (`pbxctl up`): show the demo's logins and the phones' SIP accounts.
        print(f"Credentials ({creds_file}):")
        print(creds_file.read_text(), flush=True)
    from controlplane.calls.housekeeping import housekeeping

    background.append(asyncio.create_task(housekeeping(pool, settings, stop),
                                          name="call housekeeping"))
    for task in background:
        task.add_done_callback(report_failure)
    runner = web.AppRunner(build_app(settings, pool), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.http_host, settings.http_port)
    await site.start()
    print(f"API on http://{settings.http_host}:{settings.http_port}/ "
          f"(docs: /api/documentation)", flush=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    await asyncio.gather(*background, return_exceptions=True)
    if sandbox:
        await loop.run_in_executor(None, sandbox_node.stop)
    await pool.close()


async def _sandbox_with_agent(settings: Settings, pool: Any, name: str, address: str) -> Any:
    from controlplane.db.pool import resolve_dsn
    from controlplane.provisioning.agent import NodeAgent
    from controlplane.provisioning.sandbox_nodes import start_sandbox_node

    node, record = await start_sandbox_node(pool, name, address, settings.data_dir / "nodes")
    print(f"Asterisk node {name} on {address} (SIP 5060, AMI 5038, ARI 8088)", flush=True)
    dsn = settings.dsn or resolve_dsn(settings)
    calls = call_control_config(settings, cdr_file=str(node.cdr_file), agi_port=0)
    agent = NodeAgent(pool, record, node.tenant_config_dir, dsn=dsn, manage_interface="lo",
                      calls=calls)
    return node, agent


def call_control_config(settings: Settings, **overrides: Any) -> Any:
    from pathlib import Path

    from controlplane.calls.node_control import CallControlConfig

    values: dict[str, Any] = {
        "agi_host": settings.agi_host, "agi_port": settings.agi_port,
        "agi_advertise": settings.agi_advertise or None, "cdr_file": settings.cdr_file,
        "fail_policy": settings.admission_fail_policy, "cdr_import": settings.cdr_import,
        "cdr_import_nice": settings.cdr_import_nice}
    values.update(overrides)
    if values["fail_policy"] not in ("open", "closed"):
        sys.exit("PBX_ADMISSION_FAIL_POLICY must be open or closed")
    if values["cdr_import"] not in ("process", "inline"):
        sys.exit("PBX_CDR_IMPORT must be process or inline")
    if not 0 <= values["cdr_import_nice"] <= 19:
        sys.exit("PBX_CDR_IMPORT_NICE must be 0 to 19")
    values["cdr_file"] = Path(values["cdr_file"]) if values["cdr_file"] else None
    return CallControlConfig(**values)


PR_SET_PDEATHSIG = 1


def follow_parent() -> None:
    """This process ends (SIGTERM) when the agent that started it does, even killed outright:
    a CDR import left behind would go on beside the one its agent starts again. Linux only;
    elsewhere a warning."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
            raise OSError(ctypes.get_errno(), "prctl")
    except (OSError, AttributeError) as exc:
        log.warning("this process will not end with the agent that started it: %s", exc)
    parent = os.environ.get("PBX_AGENT_PID", "")
    if parent.isdigit() and os.getppid() != int(parent):  # it ended before prctl took
        sys.exit("the agent that started this CDR import has ended")


async def _agent(settings: Settings, node_name: str, tenant_dir: str | None,
                 interface: str | None, role: str = "all") -> None:
    from pathlib import Path

    from controlplane.db.pool import resolve_dsn
    from controlplane.provisioning.agent import NodeAgent
    from controlplane.provisioning.desired import load_node
    from controlplane.store.calls import warm

    if role == "cdrs":  # the CDR import of a calls agent, started by it (see CallControl)
        if not settings.cdr_file:
            sys.exit("an agent with --role cdrs needs the node's CDR file (PBX_CDR_FILE)")
        follow_parent()
        os.nice(settings.cdr_import_nice)
        pool = await _open(dataclasses.replace(settings, db_pool_min=1, db_pool_max=2))
    else:
        # Every connection opened and warmed at start, and kept: a burst of calls must not
        # wait for new ones to be opened (connect, authenticate: tens of ms) or used a first
        # time (type introspection, functions compiled: 10-20 ms).
        pool = await _open(dataclasses.replace(settings, db_pool_min=settings.db_pool_max),
                           warm)
    async with pool.acquire() as conn:
        record = await load_node(conn, node_name)
    if record is None:
        sys.exit(f"no node named {node_name!r}: create it with POST /api/v1/nodes")
    folder = Path(tenant_dir) if tenant_dir else settings.data_dir / "nodes" / node_name / "etc" \
        / "tenants"
    calls = call_control_config(settings, **({"cdr_import": "inline"} if role == "cdrs"
                                             else {}))
    agent = NodeAgent(pool, record, folder, dsn=settings.dsn or resolve_dsn(settings),
                      manage_interface=interface, calls=calls, role=role)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await agent.run(stop)
    await pool.close()


async def _render(settings: Settings, tenant_id: int) -> None:
    from controlplane.provisioning.preview import render_tenant

    pool = await _open(settings)
    async with pool.acquire() as conn:
        text = await render_tenant(conn, tenant_id)
    await pool.close()
    if text is None:
        sys.exit(f"no tenant {tenant_id}")
    print(text)


def _sandbox(settings: Settings, args: argparse.Namespace) -> None:
    from controlplane import sandbox

    base = settings.data_dir / "nodes"
    if args.action == "build":
        print(sandbox.ensure_root(sandbox.default_cache_dir()))
    elif args.action == "start":
        async def start() -> None:
            from controlplane.provisioning.sandbox_nodes import start_sandbox_node

            pool = await _open(settings)
            node, _ = await start_sandbox_node(pool, args.name, args.address, base)
            await pool.close()
            print(f"node {args.name} running on {args.address} (pid {node.pid})")
        asyncio.run(start())
    elif args.action == "stop":
        print("stopped" if sandbox.stop_node(args.name, base) else "was not running")
    elif args.action == "status":
        print(json.dumps(sandbox.list_nodes(base), indent=2, default=str))


async def _migrate(settings: Settings) -> None:
    pool = await _open(settings)
    await pool.close()
    print("database is up to date")


def _db(settings: Settings, action: str) -> None:
    from controlplane.db.embedded import EmbeddedPostgres

    if settings.dsn:
        sys.exit("PBX_DSN is set: the embedded PostgreSQL is not used")
    pg = EmbeddedPostgres(settings.postgres_dir)
    if action == "start":
        print(pg.start())
    elif action == "stop":
        pg.stop()
        print("stopped")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pbxctl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the API (applies migrations first)")
    serve.add_argument("--demo", action="store_true",
                       help="create a demo distributor, reseller, tenant and phones")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    agent = sub.add_parser("agent", help="drive one Asterisk node from the database")
    agent.add_argument("--node", required=True, help="node name, as created in /api/v1/nodes")
    agent.add_argument("--tenant-dir", help="where the node reads generated tenant files")
    agent.add_argument("--interface", help="add registration addresses to this interface")
    agent.add_argument("--role", choices=("all", "nodes", "calls", "cdrs"), default="all",
                       help="all (default); or nodes (provisioning, registrations) and calls "
                            "(admission, grants, leases, CDRs), to run call control in a "
                            "process of its own beside a nodes agent; cdrs: the CDR import "
                            "alone, as a calls agent starts it (PBX_CDR_IMPORT)")
    render = sub.add_parser("render", help="show what a tenant looks like on its node")
    render.add_argument("--tenant", type=int, required=True)
    sb = sub.add_parser("sandbox", help="Docker-less Asterisk nodes for development")
    sb.add_argument("action", choices=("build", "start", "stop", "status"))
    sb.add_argument("--name", default="node1")
    sb.add_argument("--address", default="127.0.0.2")
    up = sub.add_parser("up", help="serve --demo, with a sandboxed Asterisk node")
    up.add_argument("--host")
    up.add_argument("--port", type=int)
    sub.add_parser("migrate", help="apply database migrations and exit")
    db = sub.add_parser("db", help="the embedded PostgreSQL")
    db.add_argument("action", choices=("start", "stop"))
    sub.add_parser("openapi", help="print the OpenAPI document")
    args = parser.parse_args(argv)

    overrides: dict[str, Any] = {}
    if getattr(args, "host", None):
        overrides["http_host"] = args.host
    if getattr(args, "port", None):
        overrides["http_port"] = args.port
    settings = Settings.from_env(**overrides)
    logging.basicConfig(level=settings.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # panoramisk logs the actions pending when an AMI link drops, with their values (a
    # login's secret, the FastAGI token in PBX_AGI): only its warnings and errors are kept
    logging.getLogger("panoramisk").setLevel(max(logging.WARNING,
                                                 logging.getLogger().getEffectiveLevel()))
    try:
        check_loop(settings.event_loop)
    except ValueError as exc:
        sys.exit(str(exc))
    run = functools.partial(run_loop, settings.event_loop)
    if args.command == "serve":
        run(_serve(settings, args.demo))
    elif args.command == "up":
        run(_serve(settings, True, sandbox=True))
    elif args.command == "agent":
        run(_agent(settings, args.node, args.tenant_dir, args.interface, args.role))
    elif args.command == "render":
        run(_render(settings, args.tenant))
    elif args.command == "sandbox":
        _sandbox(settings, args)
    elif args.command == "migrate":
        run(_migrate(settings))
    elif args.command == "db":
        _db(settings, args.action)
    elif args.command == "openapi":
        from controlplane.api.app import RESOURCES, build_routes, resource_schema
        from controlplane.api.openapi import build_spec

        spec = build_spec(build_routes(), {r.entity: resource_schema(r) for r in RESOURCES})
        print(json.dumps(spec, indent=2))


if __name__ == "__main__":
    main()
