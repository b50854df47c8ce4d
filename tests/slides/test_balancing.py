"""Per-request load balancing over replicas of one model service (issue 12 §3).

Real grpc.aio OIP servers on loopback ports play three replicas of `ensemble`; each answers
ModelMetadata with its own replica id as the version, so the gateway's real
`OipModelClients` (tritonclient over gRPC) shows which replica served each call. One service
name resolves to the replicas' addresses through an injected resolver (the stand-in for the
headless Service's DNS record, which a test cannot change on this machine).
"""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc
import pytest

from services.gateway.balancing import split_address, static_target
from services.gateway.oip import OipModelClients


async def _replica(replica_id: str, addr: str = "127.0.0.1:0") -> tuple[grpc.aio.Server, int]:
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    class Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):
        async def ServerReady(self, request, context):  # noqa: N802 - generated API
            return service_pb2.ServerReadyResponse(ready=True)

        async def ModelReady(self, request, context):  # noqa: N802
            return service_pb2.ModelReadyResponse(ready=True)

        async def ModelMetadata(self, request, context):  # noqa: N802
            return service_pb2.ModelMetadataResponse(
                name=request.name, versions=[replica_id], platform="marrowscope"
            )

    server = grpc.aio.server()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port(addr)
    await server.start()
    return server, port


class _Dns:
    """The headless Service's record: name -> pod IPs (127.0.0.x, one per replica)."""

    def __init__(self) -> None:
        self.ips: list[str] = []

    def __call__(self, host: str, port: int) -> list[str]:
        assert host == "ensemble-headless"
        return list(self.ips)


async def _spread(clients: OipModelClients, n: int) -> Counter:
    infos = await asyncio.gather(*(clients.metadata("ensemble", timeout=5) for _ in range(n)))
    return Counter(i.version for i in infos)


def test_static_list_spreads_every_request() -> None:
    """ipv4:a,b,c with round_robin: 60 calls on one client reach all three replicas evenly."""

    async def run() -> Counter:
        servers = [await _replica(f"r{k}") for k in range(3)]
        target = "ipv4:" + ",".join(f"127.0.0.1:{p}" for _, p in servers)
        clients = OipModelClients({"ensemble": target}, lb_policy="round_robin")
        try:
            await clients.metadata("ensemble", timeout=5)  # connect
            await asyncio.sleep(0.3)  # let every subchannel become READY
            return await _spread(clients, 60)
        finally:
            await clients.close()
            for s, _ in servers:
                await s.stop(None)

    seen = asyncio.run(run())
    assert set(seen) == {"r0", "r1", "r2"}, seen
    assert min(seen.values()) >= 10, seen


def test_without_balancing_one_connection_sticks_to_one_replica() -> None:
    """The problem being fixed: a plain channel (pick_first) sends everything to one pod."""

    async def run() -> Counter:
        servers = [await _replica(f"r{k}") for k in range(3)]
        target = "ipv4:" + ",".join(f"127.0.0.1:{p}" for _, p in servers)
        clients = OipModelClients({"ensemble": target})
        try:
            return await _spread(clients, 30)
        finally:
            await clients.close()
            for s, _ in servers:
                await s.stop(None)

    assert len(asyncio.run(run())) == 1


def test_replica_added_during_a_run_gets_traffic() -> None:
    """A name resolving to 2 replicas, calls running, a 3rd replica appears in DNS: after the
    refresh interval the new replica serves a share of the calls, with no call failing."""

    async def run() -> tuple[Counter, Counter]:
        # Pods share a port on distinct IPs, as in a cluster: 127.0.0.1-3 are all loopback.
        first, port = await _replica("r0")
        servers = [(first, port)] + [
            await _replica(f"r{k}", f"127.0.0.{k + 1}:{port}") for k in (1, 2)
        ]
        dns = _Dns()
        dns.ips = ["127.0.0.1", "127.0.0.2"]
        clients = OipModelClients(
            {"ensemble": f"dns:///ensemble-headless:{port}"},
            lb_policy="round_robin",
            lb_refresh_s=0.2,
            resolver=dns,
        )
        try:
            await clients.metadata("ensemble", timeout=5)
            await asyncio.sleep(0.3)
            before = await _spread(clients, 40)
            dns.ips.append("127.0.0.3")  # the autoscaler adds a pod mid-run
            after: Counter = Counter()
            deadline = asyncio.get_running_loop().time() + 10
            while after["r2"] < 5 and asyncio.get_running_loop().time() < deadline:
                after += await _spread(clients, 10)
                await asyncio.sleep(0.05)
            return before, after
        finally:
            await clients.close()
            for s, _ in servers:
                await s.stop(None)

    before, after = asyncio.run(run())
    assert set(before) == {"r0", "r1"}, before
    assert after["r2"] >= 5, after
    assert {"r0", "r1"} <= set(after), after


@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        ("dns:///ms-ensemble:8001", ("ms-ensemble", 8001)),
        ("ms-ensemble:8001", ("ms-ensemble", 8001)),
        ("ipv4:10.0.0.1:8001,10.0.0.2:8001", None),
    ],
)
def test_split_address(addr: str, expected) -> None:
    assert split_address(addr) == expected


def test_split_address_rejects_no_port() -> None:
    with pytest.raises(ValueError, match="host:port"):
        split_address("dns:///ms-ensemble")


def test_static_target_families() -> None:
    assert static_target(["10.0.0.2", "10.0.0.1"], 8001) == "ipv4:10.0.0.2:8001,10.0.0.1:8001"
    assert static_target(["fd00::1"], 8001) == "ipv6:[fd00::1]:8001"
