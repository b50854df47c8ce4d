"""`python -m services.gateway [-h]`: serve the API with uvicorn (and, by default, a worker).

Every setting comes from the environment (`MS_GATEWAY_*`); `--help` prints them, generated
from `GatewaySettings`, and exits before anything is migrated, created or bound.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence


def parse_cli(argv: Sequence[str] | None = None) -> None:
    """`-h` prints usage and the settings and exits 0; any argument exits 2."""
    from services.gateway.config import GatewaySettings
    from services.runtime.cli import settings_help

    argparse.ArgumentParser(
        prog="python -m services.gateway",
        description="The MarrowScope gateway: REST API, job store and (unless "
        "MS_GATEWAY_EMBEDDED_WORKER=false) an analysis worker in one process.",
        epilog="settings (environment variables only):\n" + settings_help(GatewaySettings),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    ).parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    parse_cli(argv)

    import uvicorn

    from services.gateway.app import create_app
    from services.gateway.config import GatewaySettings
    from services.gateway.protocol import json_error_protocol

    settings = GatewaySettings()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    # access logs carry URLs with analysis ids only, never accession ids (those are in
    # query strings of list calls): keep uvicorn's access log off.
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        http=json_error_protocol(),
        access_log=False,
        # X-Forwarded-For only from the listed proxies; none listed: the peer is the client
        proxy_headers=bool(settings.trusted_proxies.strip()),
        forwarded_allow_ips=[p.strip() for p in settings.trusted_proxies.split(",") if p.strip()],
        log_level=settings.log_level.lower(),
    )


if __name__ == "__main__":
    main()
