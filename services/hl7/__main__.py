"""`python -m services.hl7 [-h]`: the HL7 v2 order listener (MLLP), until SIGTERM / SIGINT.

Every setting comes from the environment: `MS_HL7_*` (the listener) and `MS_GATEWAY_*` (the
job store, image store and image limits it shares with the gateway). `--help` prints both
and exits before anything is migrated, created or bound.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Callable, Sequence


def parse_cli(argv: Sequence[str] | None = None) -> None:
    from services.gateway.config import GatewaySettings
    from services.hl7.config import Hl7ListenerSettings
    from services.runtime.cli import settings_help

    argparse.ArgumentParser(
        prog="python -m services.hl7",
        description="The MarrowScope HL7 v2 order listener: OML^O33 / ORM^O01 over MLLP "
        "create analyses (idempotent on the placer order number) and are answered "
        "AA / AE / AR (docs/HL7.md).",
        epilog="listener settings (environment variables only):\n"
        + settings_help(Hl7ListenerSettings)
        + "\n\nshared with the gateway (job store, images, limits):\n"
        + settings_help(GatewaySettings),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    ).parse_args(argv)


async def serve(
    settings: object,
    gateway: object,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[dict[int, str | None]], None] | None = None,
) -> None:
    """Run the listener until `stop` is set (None: until SIGTERM / SIGINT); `on_ready` gets
    the bound ports (port -> fixed tenant) once it listens."""
    from services.gateway.app import serve_metrics
    from services.gateway.config import GatewaySettings
    from services.gateway.container import build_services
    from services.hl7.config import Hl7ListenerSettings
    from services.hl7.handler import OrderHandler
    from services.hl7.metrics import Hl7Metrics
    from services.hl7.server import MllpServer

    assert isinstance(settings, Hl7ListenerSettings) and isinstance(gateway, GatewaySettings)
    services = await asyncio.to_thread(build_services, gateway)  # migrations, folders
    metrics = Hl7Metrics()
    handler = OrderHandler(
        settings=settings,
        gateway=gateway,
        sessions=services.sessions,
        blobs=services.blobs,
        metrics=metrics,
    )
    server = MllpServer(settings, handler, metrics)
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    await server.start()
    metrics_server = serve_metrics(settings.metrics_port, metrics.registry)
    if on_ready is not None:
        on_ready(dict(server.ports))
    try:
        await stop.wait()
    finally:
        logging.getLogger(__name__).info("stopping: answering messages in flight")
        await server.stop(settings.shutdown_grace_s)
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()
        services.engine.dispose()


def main(argv: Sequence[str] | None = None) -> None:
    parse_cli(argv)
    from services.gateway.config import GatewaySettings
    from services.hl7.config import Hl7ListenerSettings

    settings = Hl7ListenerSettings()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    asyncio.run(serve(settings, GatewaySettings()))


if __name__ == "__main__":
    main()
