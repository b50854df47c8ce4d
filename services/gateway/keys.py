"""API-key management CLI.

    python -m services.gateway.keys create --name lis --scopes submit,read   # prints the key once
    python -m services.gateway.keys create --name site-b --scopes submit,read --tenant site-b
    python -m services.gateway.keys list
    python -m services.gateway.keys revoke <key-id>

Uses the same settings (`MS_GATEWAY_DATABASE_URL`, ...) as the gateway.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime

from services.gateway.auth import check_tenant, create_key, list_keys, parse_scopes, revoke_key
from services.gateway.config import GatewaySettings


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m services.gateway.keys",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("create", help="create a key and print it (shown once)")
    c.add_argument("--name", required=True)
    c.add_argument("--scopes", required=True, help="comma list of submit, read, admin")
    c.add_argument(
        "--tenant",
        default="default",
        help="the site / LIS the key belongs to; it sees only its tenant's analyses "
        "(admin keys see all). Default: default (single-tenant deployments)",
    )
    sub.add_parser("list", help="list keys (never the secrets)")
    r = sub.add_parser("revoke", help="revoke a key by id")
    r.add_argument("key_id")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.command == "create":
        try:
            scopes = parse_scopes(args.scopes)
            tenant = check_tenant(args.tenant)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    from services.gateway.db import make_engine, make_sessionmaker
    from services.gateway.migrations import upgrade_head

    settings = GatewaySettings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.database_url)
    upgrade_head(engine)
    sessions = make_sessionmaker(engine)
    with sessions.begin() as session:
        if args.command == "create":
            key, row = create_key(session, name=args.name, scopes=scopes, tenant=tenant)
            print(key)
            print(
                f"id {row.id}, tenant {row.tenant}, scopes {row.scopes}; "
                "store the key now, it is not shown again",
                file=sys.stderr,
            )
        elif args.command == "list":
            for row in list_keys(session):
                made = datetime.fromtimestamp(row.created_at, UTC).isoformat(timespec="seconds")
                state = "revoked" if row.revoked_at else "active"
                print(f"{row.id}\t{row.name}\t{row.tenant}\t{row.scopes}\t{made}\t{state}")
        elif not revoke_key(session, key_id=args.key_id):
            print(f"error: no active key {args.key_id}", file=sys.stderr)
            return 1
        else:
            print(f"revoked {args.key_id}")
    engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
