"""Run the whole serving stack as local processes: five model services and the gateway.

Used by `make demo`, the end-to-end tests, the load tests and the benchmarks, so that all of
them start the stack the same way an operator would (one process per service, settings only
from the environment, readiness from gRPC health and `/readyz`).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from marrowscope.paths import PROJECT_ROOT
from marrowscope.stages import SERVED, Stage

log = logging.getLogger(__name__)

MODEL_SERVICES: tuple[str, ...] = SERVED


_HANDED_OUT: set[int] = set()
_PORTS_LOCK = threading.Lock()
FREE_PORT_TRIES = 100


def free_port() -> int:
    """A loopback TCP port that is free now and that this process has not handed out before.

    Why the memory: the port is only bound later, by the child process, and the kernel may
    give two `bind(0)` calls the same ephemeral port once the first probe socket is closed. A
    stack asks for a service's gRPC and metrics ports back to back, so both could be the same
    port and the service dies on its second bind (seen in CI: both 49475)."""
    with _PORTS_LOCK:
        for _ in range(FREE_PORT_TRIES):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = int(s.getsockname()[1])
            if port not in _HANDED_OUT:
                _HANDED_OUT.add(port)
                return port
    raise RuntimeError(f"no loopback port not handed out before in {FREE_PORT_TRIES} tries")


def gateway_url_of(proc: Proc) -> str:
    return f"http://127.0.0.1:{proc.ports['http']}"


class StackError(RuntimeError):
    """A process of the stack failed to start or become ready; the message names it."""


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path
    ports: dict[str, int] = field(default_factory=dict)
    service: str = ""
    """The model service this process runs (empty for the gateway); replicas share it."""

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class LocalStack:
    """Starts the services with `models:/marrowscope-<kind>@<alias>` (or explicit URIs).

    Args:
        workdir: logs and the gateway's data folder go here.
        tracking_uri: MLflow tracking URI the services resolve models from.
        model_uris: optional per-service MODEL_URI overrides (e.g. a local directory).
        alias: registry alias the services follow (default `champion`).
        env: extra environment for every process (e.g. `MS_GATEWAY_MIN_CELLS`).
        replicas: processes per model service (default 1), e.g. `{"segmentation": 2}`: the
            first is named after the service, the others `<service>-<k>`, each on its own
            ports; the gateway gets the static list `ipv4:a:p,b:p` and balances every call
            over it (`MS_GATEWAY_LB_POLICY=round_robin`, `services.gateway.balancing`).
    """

    workdir: Path
    tracking_uri: str
    model_uris: Mapping[str, str] = field(default_factory=dict)
    alias: str = "champion"
    env: Mapping[str, str] = field(default_factory=dict)
    services: tuple[str, ...] = MODEL_SERVICES
    with_gateway: bool = True
    replicas: Mapping[str, int] = field(default_factory=dict)
    gateway_port: int | None = None
    """The gateway's HTTP port (default: a free loopback port; `make serve` asks for 8080)."""
    hl7_env: Mapping[str, str] | None = None
    """When set, the HL7 order listener (`python -m services.hl7`) is started after the
    gateway with the gateway's settings plus these `MS_HL7_*` ones (its MLLP port: a free
    one unless `MS_HL7_PORT` is given; `procs["hl7"].ports["mllp"]`)."""
    procs: dict[str, Proc] = field(default_factory=dict)
    gateway_url: str = ""

    def _base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "MLFLOW_TRACKING_URI": self.tracking_uri,
                "PYTHONPATH": str(PROJECT_ROOT),
                "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"),
            }
        )
        env.update(self.env)
        return env

    def _spawn(
        self, name: str, module: str, env: dict[str, str], ports: dict[str, int], service: str = ""
    ) -> Proc:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log_path = self.workdir / f"{name}.log"
        fh = log_path.open("ab")
        popen = subprocess.Popen(
            [sys.executable, "-m", module],
            env=env,
            cwd=PROJECT_ROOT,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        fh.close()
        proc = Proc(name, popen, log_path, ports, service)
        self.procs[name] = proc
        log.info("started %s (pid %d, ports %s)", name, popen.pid, ports)
        return proc

    def _spawn_service(self, name: str, ports: dict[str, int], proc_name: str = "") -> Proc:
        stage = Stage(name)
        prefix = stage.env_prefix
        env = self._base_env()
        env.update(
            {
                prefix + "GRPC_PORT": str(ports["grpc"]),
                prefix + "METRICS_PORT": str(ports["metrics"]),
                prefix + "MODEL_URI": self.model_uris.get(
                    name, f"models:/{stage.registered_name}@{self.alias}"
                ),
            }
        )
        env.update({k: v for k, v in self.env.items() if k.startswith(prefix)})
        return self._spawn(proc_name or name, f"services.{name}", env, ports, name)

    def replica_names(self, name: str) -> list[str]:
        """Process names of a model service's replicas: `name`, `name-1`, ..."""
        n = self.replicas.get(name, 1)
        if n < 1:
            raise ValueError(f"replicas of {name} must be >= 1, got {n}")
        return [name] + [f"{name}-{k}" for k in range(1, n)]

    def start(self, timeout_s: float = 180.0) -> LocalStack:
        if self.procs:  # a second start would orphan the first set of processes
            raise StackError(f"stack already started ({', '.join(sorted(self.procs))})")
        unknown = set(self.replicas) - set(self.services)
        if unknown:
            raise ValueError(f"replicas for services not started: {', '.join(sorted(unknown))}")
        for name in self.services:
            for proc_name in self.replica_names(name):
                self._spawn_service(name, {"grpc": free_port(), "metrics": free_port()}, proc_name)
        for name in self.services:
            for proc_name in self.replica_names(name):
                self.wait_grpc_ready(proc_name, timeout_s)
        if self.with_gateway:
            self.start_gateway(timeout_s)
            if self.hl7_env is not None:
                self.start_hl7(timeout_s)
        return self

    def start_hl7(self, timeout_s: float = 60.0) -> Proc:
        """Start the HL7 order listener on the gateway's job store and wait for its port."""
        env = {**self.gateway_env(), **(self.hl7_env or {})}
        port = int(env.get("MS_HL7_PORT") or free_port())
        env.update({"MS_HL7_PORT": str(port), "MS_HL7_METRICS_PORT": str(free_port())})
        proc = self._spawn("hl7", "services.hl7", env, {"mllp": port})
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._check_alive(proc)
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                    return proc
            except OSError:
                time.sleep(0.3)
        raise StackError(
            f"hl7 not listening on {port} after {timeout_s:.0f} s; log:\n{proc.tail()}"
        )

    def kill(self, name: str) -> None:
        """SIGKILL one model service (an outage drill); `restart` brings it back."""
        proc = self.procs[name]
        if proc.popen.poll() is None:
            os.killpg(proc.popen.pid, signal.SIGKILL)
        proc.popen.wait()

    def restart(self, name: str, timeout_s: float = 180.0) -> Proc:
        """Start a killed model service again on the same ports and wait until SERVING."""
        old = self.procs[name]
        if old.popen.poll() is None:
            raise StackError(f"{name} is still running")
        proc = self._spawn_service(old.service or name, old.ports, name)
        self.wait_grpc_ready(name, timeout_s)
        return proc

    def grpc_addr(self, name: str) -> str:
        """host:port of one process (a service's first replica, or `<service>-<k>`)."""
        return f"127.0.0.1:{self.procs[name].ports['grpc']}"

    def service_target(self, name: str) -> str:
        """The gateway's address for a service: host:port, or with several replicas the
        static gRPC list `ipv4:127.0.0.1:a,127.0.0.1:b` (balanced per call)."""
        addrs = [self.grpc_addr(p) for p in self.replica_names(name)]
        return addrs[0] if len(addrs) == 1 else "ipv4:" + ",".join(addrs)

    def gateway_env(self) -> dict[str, str]:
        env = self._base_env()
        env.update({f"MS_GATEWAY_{n.upper()}_ADDR": self.service_target(n) for n in self.services})
        if any(len(self.replica_names(n)) > 1 for n in self.services):
            # without it gRPC's pick_first would send every call to the first replica
            env.setdefault("MS_GATEWAY_LB_POLICY", "round_robin")
        env.setdefault("MS_GATEWAY_DATA_DIR", str(self.workdir / "gateway"))
        # a local stack on loopback: readiness detail and metrics without an ops key
        env.setdefault("MS_GATEWAY_OPS_PUBLIC", "true")
        return env

    def start_gateway(
        self,
        timeout_s: float = 120.0,
        *,
        name: str = "gateway",
        env: Mapping[str, str] | None = None,
    ) -> Proc:
        """Start a gateway and wait for `/readyz`. `name` other than `gateway` starts another
        one beside it (its URL is `gateway_url_of(proc)`; give it its own
        `MS_GATEWAY_DATA_DIR` in `env`, which overrides `gateway_env()`)."""
        port = self.gateway_port if name == "gateway" and self.gateway_port else free_port()
        full = {**self.gateway_env(), **(env or {}), "MS_GATEWAY_PORT": str(port)}
        proc = self._spawn(name, "services.gateway", full, {"http": port})
        url = gateway_url_of(proc)
        if name == "gateway":
            self.gateway_url = url
        self.wait_http_ready(proc, f"{url}/readyz", timeout_s)
        return proc

    def _check_alive(self, proc: Proc) -> None:
        if proc.popen.poll() is not None:
            raise StackError(
                f"{proc.name} exited with code {proc.popen.returncode}; "
                f"last log lines ({proc.log_path}):\n{proc.tail()}"
            )

    def wait_grpc_ready(self, name: str, timeout_s: float) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        proc = self.procs[name]
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.grpc_addr(name)) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                self._check_alive(proc)
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if status.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.3)
        raise StackError(f"{name} not SERVING after {timeout_s:.0f} s; log:\n{proc.tail()}")

    def wait_http_ready(self, proc: Proc, url: str, timeout_s: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            self._check_alive(proc)
            try:
                response = httpx.get(url, timeout=2.0)
                if response.status_code == 200:
                    return
                last = response.text[:300]
            except httpx.HTTPError as exc:
                last = str(exc)
            time.sleep(0.5)
        raise StackError(
            f"{proc.name} not ready at {url} after {timeout_s:.0f} s ({last}); log:\n{proc.tail()}"
        )

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM every process (gateways first), then SIGKILL what outlives the grace."""
        order = sorted(self.procs.values(), key=lambda p: bool(p.service))
        for proc in order:
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in order:
            try:
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s: killing", proc.name, grace_s)
                os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait()
        self.procs.clear()

    def __enter__(self) -> LocalStack:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
