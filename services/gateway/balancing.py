"""Per-request load balancing of the gateway's gRPC calls over every replica of a service.

Why: gRPC keeps one HTTP/2 connection per channel, so behind a plain ClusterIP Service every
gateway worker sticks to the one pod its connection reached, and GPU pods added by the
autoscaler sit idle. The chart therefore gives each model service a headless Service (its DNS
name lists every ready pod) and the gateway balances each call with gRPC's `round_robin`
policy over all of them.

Why re-resolve here instead of relying on gRPC's own `dns:///` resolver: grpc-core's DNS
resolver re-resolves only when a connection breaks (`grpc.dns_min_time_between_resolutions_ms`
merely rate-limits that), so a pod added while the existing ones stay healthy would get no
traffic until something disconnects. `BalancedClients` resolves each address every
`refresh_s` itself and, when the set of addresses changed, opens a new channel to the static
list (`ipv4:a:p,b:p`, round_robin) and retires the old one after in-flight calls had time to
finish. Calls never wait on DNS, and no xDS control plane is needed.

Addresses: `dns:///name:port` or `name:port`; `ipv4:`/`ipv6:` lists are taken as given.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

log = logging.getLogger(__name__)

Resolver = Callable[[str, int], list[str]]
"""(host, port) -> IP addresses (any order)."""

ROUND_ROBIN_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
RETIRE_AFTER_S = 60.0


def dns_resolver(host: str, port: int) -> list[str]:
    """Every address the system resolver returns for host (a headless Service: every pod)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


def split_address(addr: str) -> tuple[str, int] | None:
    """(host, port) of `dns:///host:port` or `host:port`; None for a static `ipv4:`/`ipv6:`
    list (nothing to resolve)."""
    if addr.startswith(("ipv4:", "ipv6:")):
        return None
    rest = addr.removeprefix("dns:///").removeprefix("dns:")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {addr!r} must read [dns:///]host:port")
    return host.strip("[]"), int(port)


def static_target(ips: list[str], port: int) -> str:
    """The gRPC target naming exactly these addresses (one address family per target)."""
    if all(":" in ip for ip in ips):
        return "ipv6:" + ",".join(f"[{ip}]:{port}" for ip in ips)
    return "ipv4:" + ",".join(f"{ip}:{port}" for ip in ips if ":" not in ip)


def round_robin_args(args: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Channel arguments plus the round_robin service config."""
    return [*args, ("grpc.service_config", ROUND_ROBIN_CONFIG)]


class BalancedClients(Mapping[str, Any]):
    """service -> client, re-resolved every `refresh_s` on access.

    `make_client(target, channel_args)` builds one client (a tritonclient aio client in the
    gateway). Retired clients are closed `RETIRE_AFTER_S` later, so calls in flight on them
    finish; `close()` closes everything.
    """

    def __init__(
        self,
        addrs: dict[str, str],
        make_client: Callable[[str, list[tuple[str, Any]]], Any],
        channel_args: list[tuple[str, Any]],
        *,
        refresh_s: float = 30.0,
        resolver: Resolver = dns_resolver,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._addrs = addrs
        self._make = make_client
        self._args = round_robin_args(channel_args)
        self._refresh_s = refresh_s
        self._resolver = resolver
        self._clock = clock
        self._state: dict[str, tuple[str, Any, float]] = {}  # service -> (target, client, at)
        self._retired: list[tuple[Any, float]] = []
        for service in addrs:
            self._connect(service)

    def _target(self, service: str) -> str:
        addr = self._addrs[service]
        hp = split_address(addr)
        if hp is None:
            return addr
        host, port = hp
        try:
            ips = self._resolver(host, port)
        except OSError as exc:
            log.warning("resolving %s for %s failed: %s", host, service, exc)
            ips = []
        if not ips:
            old = self._state.get(service)
            # Keep the last good set; without one, let gRPC resolve (and report) it itself.
            return old[0] if old else f"dns:///{host}:{port}"
        return static_target(ips, port)

    def _connect(self, service: str) -> None:
        target = self._target(service)
        old = self._state.get(service)
        now = self._clock()
        if old is not None and old[0] == target:
            self._state[service] = (target, old[1], now)
            return
        self._state[service] = (target, self._make(target, self._args), now)
        if old is not None:
            log.info("%s replicas changed: %s -> %s", service, old[0], target)
            self._retired.append((old[1], now))

    def refresh(self) -> None:
        """Re-resolve every service now (tests and an operator's nudge)."""
        for service in self._addrs:
            self._connect(service)

    def target(self, service: str) -> str:
        return self._state[service][0]

    def __getitem__(self, service: str) -> Any:
        target, client, at = self._state[service]
        if self._clock() - at >= self._refresh_s:
            self._connect(service)
            self._reap()
        return self._state[service][1]

    def __iter__(self) -> Iterator[str]:
        return iter(self._addrs)

    def __len__(self) -> int:
        return len(self._addrs)

    def _reap(self) -> None:
        now = self._clock()
        due = [c for c, at in self._retired if now - at >= RETIRE_AFTER_S]
        self._retired = [(c, at) for c, at in self._retired if now - at < RETIRE_AFTER_S]
        for client in due:
            asyncio.ensure_future(client.close())

    async def close(self) -> None:
        clients = [c for _, c, _ in self._state.values()] + [c for c, _ in self._retired]
        self._retired = []
        await asyncio.gather(*(c.close() for c in clients))
