"""`python -m services.gateway`: serve the API with uvicorn (and, by default, a worker).

`python -m services.gateway users ...` manages the review app's reviewer accounts
(`services.gateway.users`)."""

from __future__ import annotations

import logging
import sys


def main() -> None:
    if sys.argv[1:2] == ["users"]:
        from services.gateway.users import main as users

        sys.exit(users(sys.argv[2:]))
    import uvicorn

    from services.gateway.app import create_app
    from services.gateway.config import GatewaySettings

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
        access_log=False,
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        log_level=settings.log_level.lower(),
    )


if __name__ == "__main__":
    main()
