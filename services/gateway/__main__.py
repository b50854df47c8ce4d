"""`python -m services.gateway [-h]`: serve the API with uvicorn (and, by default, a worker).

Every setting comes from the environment (`MS_GATEWAY_*`); `--help` prints them, generated
from `GatewaySettings`, and exits before anything is migrated, created or bound. `python -m services.gateway users ...`
manages the review app's reviewer accounts (`services.gateway.users`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from services.gateway.cli import parse_cli


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["users"]:
        from services.gateway.users import main as users

        sys.exit(users(args[1:]))
    parse_cli(
        "python -m services.gateway",
        "The MarrowScope gateway: REST API, job store and (unless "
        "MS_GATEWAY_EMBEDDED_WORKER=false) an analysis worker in one process.",
        argv,
    )

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
