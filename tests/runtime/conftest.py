"""An in-process toy model server on loopback ports, run on its own event-loop thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from services.runtime.server import ModelServer
from tests.runtime.toy_service import ToySettings, resolver_for


class ServerThread:
    """A ``ModelServer`` on a private asyncio loop, driven from synchronous tests."""

    def __init__(self, settings: ToySettings, wanted: dict[str, str]) -> None:
        self.settings = settings
        self.wanted = wanted
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: ModelServer | None = None

    def run(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> ServerThread:
        self.thread.start()

        async def boot() -> ModelServer:
            server = ModelServer(self.settings)
            await server.start()
            await server.load(resolver_for(self.wanted))
            return server

        self.server = self.run(boot())
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.server.metrics_port}/metrics"

    def stop(self) -> None:
        try:
            self.run(self.server.shutdown())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


def start_toy(port_factory, version: str = "1", **overrides) -> ServerThread:
    values = {
        "grpc_host": "127.0.0.1",
        "grpc_port": port_factory(),
        "metrics_host": "127.0.0.1",
        "metrics_port": port_factory(),
        "max_batch_size": 8,
        "max_queue_delay_ms": 20,
        "max_message_bytes": 1 << 20,
        "grace_period_s": 5,
        "version_grace_s": 30,
        "poll_interval_s": 0,
    }
    settings = ToySettings(**{**values, **overrides})
    return ServerThread(settings, {"version": version}).start()


@pytest.fixture(scope="module")
def toy_server() -> Iterator[ServerThread]:
    from tests.conftest import free_port

    server = start_toy(free_port)
    yield server
    server.stop()
