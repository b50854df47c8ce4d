"""`services.stack.free_port`: never the same port twice in one process."""

from __future__ import annotations

import pytest

from services import stack


class _Probe:
    """A socket whose bind(0) gets the next port of a fixed sequence (the kernel's choice)."""

    ports: list[int] = []

    def __enter__(self) -> _Probe:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def bind(self, address: tuple[str, int]) -> None:
        self.port = _Probe.ports.pop(0)

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)


def test_a_port_the_kernel_offers_again_is_not_handed_out_twice(monkeypatch):
    """The CI failure: a service's gRPC and metrics ports were both 49475."""
    monkeypatch.setattr(stack, "_HANDED_OUT", set())
    monkeypatch.setattr(stack.socket, "socket", lambda *a, **k: _Probe())
    _Probe.ports = [49475, 49475, 49475, 49476]
    assert [stack.free_port(), stack.free_port()] == [49475, 49476]


def test_it_gives_up_with_a_clear_error(monkeypatch):
    monkeypatch.setattr(stack, "_HANDED_OUT", {49475})
    monkeypatch.setattr(stack, "FREE_PORT_TRIES", 3)
    monkeypatch.setattr(stack.socket, "socket", lambda *a, **k: _Probe())
    _Probe.ports = [49475] * 3
    with pytest.raises(RuntimeError, match="3 tries"):
        stack.free_port()


def test_real_ports_are_distinct_and_bindable():
    import socket

    ports = [stack.free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))
