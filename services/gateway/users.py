"""Reviewer accounts for the review app (people, distinct from the LIS's API keys).

    python -m services.gateway users add --username dr.meyer --name "Dr. A. Meyer" [--tenant site-b] [--roles review]
    python -m services.gateway users list
    python -m services.gateway users disable dr.meyer
    python -m services.gateway users password dr.meyer

The password is read from the terminal (asked twice) or, with `--password-stdin`, as one
line from standard input (for provisioning scripts); it is never a command-line argument,
which would land in shell histories and process listings. Uses the gateway's settings
(`MS_GATEWAY_DATABASE_URL`, ...).
"""

from __future__ import annotations

import argparse
import getpass
import sys
from datetime import UTC, datetime

from services.gateway.config import GatewaySettings


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m services.gateway users",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("add", help="add a local reviewer account")
    a.add_argument("--username", required=True)
    a.add_argument("--name", default="", help="the name shown on signed reports")
    a.add_argument("--tenant", default="default", help="the site whose cases the reviewer sees")
    a.add_argument("--roles", default="review", help="comma list of review, admin")
    a.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    sub.add_parser("list", help="list reviewers (never the password hashes)")
    d = sub.add_parser("disable", help="disable an account and end its sessions")
    d.add_argument("username")
    w = sub.add_parser("password", help="set a new password (ends the account's sessions)")
    w.add_argument("username")
    w.add_argument("--password-stdin", action="store_true")
    return p


def _password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise ValueError("the two passwords differ")
    return first


def main(argv: list[str] | None = None) -> int:
    from services.gateway.db import make_engine, make_sessionmaker
    from services.gateway.migrations import upgrade_head
    from services.gateway.review import accounts

    args = get_args_parser().parse_args(argv)
    try:
        password = _password(args.password_stdin) if args.command in ("add", "password") else ""
        if password:
            accounts.check_password(password)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    settings = GatewaySettings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.database_url)
    upgrade_head(engine)
    sessions = make_sessionmaker(engine)
    try:
        with sessions.begin() as session:
            if args.command == "add":
                row = accounts.add_reviewer(
                    session,
                    username=args.username,
                    password=password,
                    display_name=args.name,
                    tenant=args.tenant,
                    roles=args.roles,
                )
                print(f"added reviewer {row.username} (tenant {row.tenant}, roles {row.roles})")
            elif args.command == "list":
                for r in accounts.list_reviewers(session):
                    made = datetime.fromtimestamp(r.created_at, UTC).isoformat(timespec="seconds")
                    state = "disabled" if r.disabled_at else "active"
                    print(f"{r.username}\t{r.display_name}\t{r.tenant}\t{r.roles}\t{made}\t{state}")
            elif args.command == "disable":
                if not accounts.disable_reviewer(session, username=args.username):
                    print(f"error: no active reviewer {args.username}", file=sys.stderr)
                    return 1
                print(f"disabled {args.username}")
            else:
                accounts.set_password(session, username=args.username, password=password)
                print(f"new password set for {args.username}; its sessions ended")
    except accounts.AccountError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
