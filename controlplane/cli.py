"""`pbxctl`: one command-line entry for the control plane."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from typing import Any

from controlplane.settings import Settings

log = logging.getLogger("pbxctl")


async def _open(settings: Settings) -> Any:
    from controlplane.db.pool import create_pool, migrate, resolve_dsn

    dsn = await asyncio.get_running_loop().run_in_executor(None, resolve_dsn, settings)
    pool = await create_pool(dsn, settings)
    async with pool.acquire() as conn:
        applied = await migrate(conn)
    if applied:
        log.info("migrations applied: %s", ", ".join(applied))
    return pool


async def _serve(settings: Settings, demo: bool) -> None:
    from aiohttp import web

    from controlplane import bootstrap
    from controlplane.api.app import build_app

    pool = await _open(settings)
    creds_file = settings.data_dir / "credentials.json"
    async with pool.acquire() as conn:
        first: dict[str, Any] = {}
        operator = await bootstrap.ensure_operator(conn)
        if operator:
            first["operator"] = operator
        if demo:
            first.update(await bootstrap.ensure_demo(conn))
    if first:
        saved = json.loads(creds_file.read_text()) if creds_file.exists() else {}
        saved.update(first)
        bootstrap.save_credentials(creds_file, saved)
    if creds_file.exists():
        print(f"Credentials created at first start ({creds_file}):")
        print(creds_file.read_text())
    runner = web.AppRunner(build_app(settings, pool), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.http_host, settings.http_port)
    await site.start()
    print(f"API on http://{settings.http_host}:{settings.http_port}/ "
          f"(docs: /api/documentation)", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    await pool.close()


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
    if args.command == "serve":
        asyncio.run(_serve(settings, args.demo))
    elif args.command == "up":
        asyncio.run(_serve(settings, True))
    elif args.command == "migrate":
        asyncio.run(_migrate(settings))
    elif args.command == "db":
        _db(settings, args.action)
    elif args.command == "openapi":
        from controlplane.api.app import RESOURCES, build_routes, resource_schema
        from controlplane.api.openapi import build_spec

        spec = build_spec(build_routes(), {r.entity: resource_schema(r) for r in RESOURCES})
        print(json.dumps(spec, indent=2))


if __name__ == "__main__":
    main()
