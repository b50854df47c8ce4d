"""The MLLP server: asyncio, one task per connection, one message at a time per connection
(the sender waits for each ACK: original acknowledgement mode).

Framing: 0x0B, the message, 0x1C 0x0D. Between messages only CR / LF may appear. What a
hostile or broken peer gets:

- more than `max_connections` at once: the new connection is closed at once;
- nothing for `idle_timeout_s` between messages (a half-open connection): closed;
- a message not whole within `read_timeout_s` of its start byte (slow-loris): closed;
- a message over `max_message_bytes`: an AR naming the limit, then closed (the rest of the
  stream cannot be trusted to be framed);
- bytes outside a frame, or a start byte inside a message: closed (nothing in such a
  stream can be answered reliably: a NACK needs a message to name);
- anything the order itself gets wrong: an AE / AR from the handler; the connection stays.

Nothing is created until a whole message is in and checked, and an analysis is created in
one transaction, so a connection dropped at any point leaves nothing half-made; a sender
resends what was not ACKed, and the placer order number makes that safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from typing import Protocol

from services.hl7.config import Hl7ListenerSettings
from services.hl7.metrics import Hl7Metrics

log = logging.getLogger(__name__)
START, END = b"\x0b", b"\x1c\x0d"
BETWEEN = frozenset(b"\r\n")


class Handler(Protocol):
    """Answers messages (`handler.OrderHandler`); called in a thread."""

    def handle(self, raw: bytes, fixed_tenant: str | None, peer: str) -> str: ...

    def oversized(self, head: bytes, fixed_tenant: str | None, peer: str) -> str: ...


class _Close(Exception):
    """End this connection, counted under `reason`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class MllpServer:
    """Listens on every configured port (`Hl7ListenerSettings.listeners`)."""

    def __init__(
        self, settings: Hl7ListenerSettings, handler: Handler, metrics: Hl7Metrics
    ) -> None:
        self.settings = settings
        self.handler = handler
        self.metrics = metrics
        self.servers: list[asyncio.Server] = []
        self.ports: dict[int, str | None] = {}
        """The bound port (the configured one, or the one the system chose for 0) -> its
        fixed tenant."""
        self._open = 0
        self._connections: set[asyncio.Task[None]] = set()
        self._busy: set[asyncio.Task[None]] = set()
        """Connections with a message started and not yet answered."""
        self._slots = asyncio.Semaphore(settings.handler_threads)

    async def start(self) -> None:
        for port, tenant in self.settings.listeners().items():
            server = await asyncio.start_server(
                functools.partial(self._connection, tenant=tenant),
                self.settings.host,
                port,
                # readuntil() raises LimitOverrunError past this: the size limit, enforced
                # by the reader itself (plus the two end bytes)
                limit=self.settings.max_message_bytes + len(END),
            )
            bound = int(server.sockets[0].getsockname()[1])
            self.ports[bound] = tenant
            self.servers.append(server)
            log.info("MLLP on %s:%d (tenant %s)", self.settings.host, bound, tenant or "by MSH-4")

    async def stop(self, grace_s: float) -> None:
        """Stop accepting; connections answering a message get `grace_s` to finish."""
        for server in self.servers:
            server.close()
        for task in self._connections - self._busy:  # between messages: nothing to lose
            task.cancel()
        tasks = list(self._connections)
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for server in self.servers:
            await server.wait_closed()

    async def _connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, tenant: str | None
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer_info = writer.get_extra_info("peername")
        peer = f"{peer_info[0]}:{peer_info[1]}" if peer_info else "?"
        if self._open >= self.settings.max_connections:
            log.warning("MLLP connection from %s refused: %d open", peer, self._open)
            self.metrics.closed.labels("connection_cap").inc()
            writer.close()
            return
        self._open += 1
        self._connections.add(task)
        self.metrics.open_connections.inc()
        reason = "peer"
        try:
            while True:
                await self._wait_for_start(reader)
                self._busy.add(task)
                raw = await self._read_message(reader)
                async with self._slots:
                    ack = await asyncio.to_thread(self.handler.handle, raw, tenant, peer)
                writer.write(START + ack.encode("utf-8") + END)
                async with asyncio.timeout(self.settings.read_timeout_s):
                    await writer.drain()
                self._busy.discard(task)
        except _Close as exc:
            reason = exc.reason
            if reason == "oversized":
                await self._answer_oversized(reader, writer, tenant, peer)
        except asyncio.CancelledError:
            reason = "shutdown"
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            reason = "peer"
        finally:
            self._open -= 1
            self._connections.discard(task)
            self._busy.discard(task)
            self.metrics.open_connections.dec()
            self.metrics.closed.labels(reason).inc()
            if reason != "peer":
                log.info("MLLP connection from %s closed: %s", peer, reason)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _wait_for_start(self, reader: asyncio.StreamReader) -> None:
        """The next start byte, within the idle timeout (CR / LF between frames), or _Close."""
        while True:
            try:
                async with asyncio.timeout(self.settings.idle_timeout_s):
                    byte = await reader.readexactly(1)
            except TimeoutError:
                raise _Close("idle") from None
            except asyncio.IncompleteReadError:
                raise _Close("peer") from None
            if byte == START:
                return
            if byte[0] not in BETWEEN:
                raise _Close("framing")

    async def _read_message(self, reader: asyncio.StreamReader) -> bytes:
        """The message after its start byte, up to its end bytes, or _Close."""
        try:
            async with asyncio.timeout(self.settings.read_timeout_s):
                data = await reader.readuntil(END)
        except TimeoutError:
            raise _Close("read_timeout") from None
        except asyncio.LimitOverrunError:
            raise _Close("oversized") from None
        except asyncio.IncompleteReadError:
            raise _Close("peer") from None
        body = data[: -len(END)]
        if START in body:  # a new frame began before this one ended
            raise _Close("framing")
        return body

    async def _answer_oversized(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        tenant: str | None,
        peer: str,
    ) -> None:
        """AR for a message over the size limit, naming its MSH-10 when its start shows it."""
        head = b""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                head = await reader.read(4096)  # already buffered: the message's start
        ack = await asyncio.to_thread(self.handler.oversized, head, tenant, peer)
        with contextlib.suppress(ConnectionError, TimeoutError):
            writer.write(START + ack.encode("utf-8") + END)
            async with asyncio.timeout(self.settings.read_timeout_s):
                await writer.drain()
