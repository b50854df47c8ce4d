"""The order listener on loopback for the tests: the real asyncio MLLP server and handler
in a thread of the test process (sharing the gateway fixture's job store), an independent
MLLP client written from the framing rules, and order messages."""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path

import pytest

from tests.gateway.conftest import gateway, make_settings, png  # noqa: F401 - fixtures

START, END = b"\x0b", b"\x1c\x0d"


def order(
    placer: str = "PO-1",
    accession: str = "ACC-1",
    *,
    control: str = "CTRL-1",
    kind: str = "OML",
    service: str = "marrowscope-analysis",
    version: str = "2.5.1",
    facility: str = "HEMLAB",
    pid3: str = "12345^^^HOSP^MR",
    control_code: str = "NW",
    extra: tuple[str, ...] = (),
) -> str:
    """An OML^O33 (or ORM^O01) order for `accession` (SPM-2, or OBR-18 in an ORM)."""
    mtype = "OML^O33^OML_O33" if kind == "OML" else "ORM^O01^ORM_O01"
    segs = [
        f"MSH|^~\\&|LIS|{facility}|MARROWSCOPE|MS|20260101120000||{mtype}|{control}|P|{version}",
        f"PID|1||{pid3}||DOE^JANE||19700101|F",
    ]
    obr18 = ""
    if kind == "OML":
        segs.append(f"SPM|1|{accession}||BMA^Bone marrow aspirate^99MSC")
    else:
        obr18 = "|" * 14 + accession
    segs += [
        f"ORC|{control_code}|{placer}",
        f"OBR|1|{placer}||{service}^AI analysis^99MSC{obr18}",
        *extra,
    ]
    return "\r".join(segs)


def inputs(root: Path, accession: str, n: int = 1, seed: int = 0) -> Path:
    folder = root / accession
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        (folder / f"field{k}.png").write_bytes(png(seed=seed + k))
    return folder


class Client:
    """A minimal MLLP sender: one framed message, then its framed ACK."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def send(self, message: str | bytes) -> str:
        self.write(START + (message.encode() if isinstance(message, str) else message) + END)
        return self.read_ack()

    def write(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_ack(self) -> str:
        while END not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed before an ACK")
            self.buf += data
        frame, self.buf = self.buf.split(END, 1)
        return frame[frame.index(START) + 1 :].decode()

    def closed_within(self, seconds: float) -> bool:
        """Whether the server closes the connection within `seconds` (reading anything)."""
        self.sock.settimeout(seconds)
        try:
            while self.sock.recv(65536):
                pass
            return True
        except TimeoutError:
            return False
        except ConnectionError:
            return True

    def close(self) -> None:
        self.sock.close()


def msa(ack: str) -> list[str]:
    line = next(s for s in ack.split("\r") if s.startswith("MSA|"))
    return line.split("|")


def err(ack: str) -> list[str]:
    line = next(s for s in ack.split("\r") if s.startswith("ERR|"))
    return line.split("|")


class Listener:
    """`services.hl7.__main__.serve` in a thread with its own event loop."""

    def __init__(self, settings, gateway_settings) -> None:
        self.settings = settings
        self.gateway_settings = gateway_settings
        self.ports: dict[int, str | None] = {}
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from services.hl7.__main__ import serve

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()

            def ready(ports):
                self.ports = ports
                self._ready.set()

            await serve(self.settings, self.gateway_settings, self._stop, ready)

        try:
            asyncio.run(main())
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    @property
    def port(self) -> int:
        return next(p for p, t in self.ports.items() if t is None)

    def start(self) -> Listener:
        self._thread.start()
        assert self._ready.wait(60), "listener did not start"
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


@pytest.fixture
def listen():
    """Start listeners: `listen(gateway_settings, **MS_HL7 settings)`; stopped after the test."""
    from services.hl7.config import Hl7ListenerSettings

    started: list[Listener] = []

    def start(gateway_settings, **overrides) -> Listener:
        settings = Hl7ListenerSettings(port=0, **overrides)
        listener = Listener(settings, gateway_settings).start()
        started.append(listener)
        return listener

    yield start
    for listener in started:
        listener.stop()
