"""Wiring of one model service: grpc.aio server, OIP servicer, health, reflection, metrics,
signals. A service's ``__main__`` is (``services/npm1/__main__.py``; the example is run by
``tests/tools/test_docgen.py``, so it stays callable)::

    from services.npm1.config import Npm1Settings
    from services.npm1.model import Npm1Handler
    from services.runtime.server import run_service

    settings = Npm1Settings()

    def build(resolved) -> Npm1Handler:  # resolved: marrowscope.registry.ResolvedModel
        return Npm1Handler(resolved.local_dir, settings)

    raise SystemExit(run_service(build, settings))
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2

from services.runtime.batching import busy_threads
from services.runtime.errors import ErrorInterceptor
from services.runtime.handler import ModelHandler
from services.runtime.logging import configure_logging
from services.runtime.metrics import RuntimeMetrics
from services.runtime.protocol import SERVICE_NAME, pb, pb_grpc
from services.runtime.repository import ModelRepository, ResolvedVersion, Resolver
from services.runtime.servicer import InferenceServicer
from services.runtime.settings import ServiceSettings

log = logging.getLogger(__name__)

HandlerFactory = Callable[[Any], ModelHandler]
_STOP_RESERVE_S = 1.0
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def registry_resolver(model_uri: str, handler_factory: HandlerFactory) -> Resolver:
    """Resolver over ``marrowscope.registry.resolve(model_uri)`` (alias, version or folder).

    ``handler_factory`` receives the registry's ``ResolvedModel`` (``name``, ``version``,
    ``local_dir``, ``tags``) and returns an unloaded handler.
    """

    from marrowscope.registry import parse_alias_uri

    last: ResolvedVersion | None = None
    alias = parse_alias_uri(model_uri)

    def resolve_now() -> ResolvedVersion:
        nonlocal last
        from marrowscope.registry import alias_version, resolve

        # Polling an alias costs one registry call; the full resolve (download, digest
        # check of the weights) runs only when the alias moved.
        if last is not None:
            if not alias:
                return last
            if alias_version(*alias) == last.version:
                return last
        resolved = resolve(model_uri)
        last = ResolvedVersion(resolved.version, lambda: handler_factory(resolved))
        return last

    return resolve_now


def _reflection_pool() -> DescriptorPool:
    """Our private descriptor pool (see codegen) plus the health and reflection protos, so
    that reflection can describe every service this server offers."""
    pool = pb.DESCRIPTOR.pool
    for module in (health_pb2, reflection_pb2):
        try:
            pool.FindFileByName(module.DESCRIPTOR.name)
        except KeyError:
            pool.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    return pool


class ModelServer:
    """One model name served over OIP gRPC; ``start()``, load, then ``shutdown()``.

    ``extra_models``: further model names served by the same process, each its own
    repository (versions, polling, health entry), e.g. the ensemble service's ``mil``. The
    overall health ("" service) is SERVING once every model is loaded.
    """

    def __init__(
        self,
        settings: ServiceSettings,
        *,
        metrics: RuntimeMetrics | None = None,
        extra_models: tuple[str, ...] = (),
    ) -> None:
        self.settings = settings
        self.metrics = metrics or RuntimeMetrics()
        self.health = HealthServicer()
        self.repository = self._repository(settings.model_name)
        self.extra = {name: self._repository(name) for name in extra_models}
        self.servicer = InferenceServicer(
            {settings.model_name: self.repository, **self.extra},
            metrics=self.metrics,
            max_message_bytes=settings.max_message_bytes,
        )
        self.grpc_port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None

    def _repository(self, name: str) -> ModelRepository:
        s = self.settings
        return ModelRepository(
            name,
            metrics=self.metrics,
            max_batch_size=s.max_batch_size,
            max_queue_delay_s=s.max_queue_delay_ms / 1000,
            version_grace_s=s.version_grace_s,
            on_change=self._update_health,
        )

    async def start(self) -> None:
        """Listen (gRPC + metrics); health stays NOT_SERVING until a version is loaded."""
        s = self.settings
        server = grpc.aio.server(
            interceptors=[ErrorInterceptor(self.metrics)],
            options=[
                ("grpc.max_send_message_length", s.max_message_bytes),
                ("grpc.max_receive_message_length", s.max_message_bytes),
            ],
        )
        # protoc's grpc plugin writes no annotations (and no .pyi) for the *_pb2_grpc module
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            self.servicer, server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
            server,
            pool=_reflection_pool(),
        )
        address = f"{s.grpc_host}:{s.grpc_port}"
        self.grpc_port = server.add_insecure_port(address)
        if self.grpc_port == 0:
            raise OSError(f"cannot bind gRPC to {address}")
        await self._update_health()
        await server.start()
        self._server = server
        self.metrics_port = self.metrics.serve(s.metrics_host, s.metrics_port)
        log.info(
            "listening",
            extra={
                "grpc_port": self.grpc_port,
                "metrics_port": self.metrics_port,
                "model": s.model_name,
            },
        )

    async def _update_health(self) -> None:
        status = _SERVING if self.repository.ready else _NOT_SERVING
        every = self.repository.ready and all(r.ready for r in self.extra.values())
        await self.health.set("", _SERVING if every else _NOT_SERVING)
        await self.health.set(self.settings.model_name, status)
        for name, repo in self.extra.items():
            await self.health.set(name, _SERVING if repo.ready else _NOT_SERVING)

    async def load(self, resolver: Resolver, extra: dict[str, Resolver] | None = None) -> None:
        """Load the resolver's version (and each extra model's from ``extra``: name ->
        resolver), and keep polling (``poll_interval_s``)."""
        await self.repository.start(resolver, self.settings.poll_interval_s)
        for name, extra_resolver in (extra or {}).items():
            await self.extra[name].start(extra_resolver, self.settings.poll_interval_s)

    async def load_local(self, handler: ModelHandler, version: str) -> None:
        """Serve a fixed handler (no registry, no polling)."""
        await self.repository.load_local(handler, version)

    async def shutdown(self) -> None:
        """Graceful stop, all of it within ``grace_period_s``: NOT_SERVING, refuse new RPCs,
        let in-flight ones finish, then cancel the rest (their handlers see it at their next
        ``cancellation.check()``), end the model threads and the metrics endpoint. Handlers
        are not ``stop()``-ped: the process is about to exit (``ModelRepository.close``).

        A forward pass still running when the time is up is not waited for: its thread is
        a daemon thread and the process exits without it (``run_service``).
        """
        grace = self.settings.grace_period_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        # kept from draining RPCs for stopping the handlers; half of it for the exit
        reserve = min(_STOP_RESERVE_S, grace / 4)
        self.servicer.draining = True
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(max(0.0, grace - reserve))
        for repo in (self.repository, *self.extra.values()):
            await repo.close(timeout_s=max(0.0, deadline - reserve / 2 - loop.time()), exiting=True)
        self.metrics.close()
        log.info("stopped")


async def serve(
    settings: ServiceSettings, resolver: Resolver, extra: dict[str, Resolver] | None = None
) -> int:
    """Run until SIGTERM/SIGINT; 0 after a graceful stop, 1 when the first load failed."""
    server = ModelServer(settings, extra_models=tuple(extra or {}))
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    code = 0
    try:
        loading = asyncio.create_task(server.load(resolver, extra))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if loading.done() and loading.exception() is not None:
            log.error("loading %s failed", settings.model_name, exc_info=loading.exception())
            code = 1
        else:
            await stopping
            log.info("signal received, draining", extra={"grace_period_s": settings.grace_period_s})
        for task in (loading, stopping):
            task.cancel()
        await asyncio.gather(loading, stopping, return_exceptions=True)
    finally:
        await server.shutdown()
    return code


def run_service(
    handler_factory: HandlerFactory,
    settings: ServiceSettings,
    *,
    resolver: Resolver | None = None,
    extra: dict[str, Resolver] | None = None,
) -> NoReturn | int:
    """Entry point of a model service: serves until SIGTERM/SIGINT, then ends the process
    with its exit code (returns only the code 2 of a missing model URI).

    Without ``resolver`` the model comes from ``settings.model_uri`` through
    ``marrowscope.registry.resolve`` and ``handler_factory(resolved_model)``. ``extra``:
    further models of the process (name -> resolver, ``ModelServer.extra_models``).

    Model and registry work runs in daemon threads (``batching.ModelThread``) and the
    process ends with ``os._exit`` after the graceful shutdown, so that a forward pass still
    running cannot keep a pod alive past its grace period.
    """
    configure_logging(settings.log_level)
    if resolver is None:
        if not settings.model_uri:
            log.error("no model URI: set MODEL_URI in the service's env prefix")
            return 2
        resolver = registry_resolver(settings.model_uri, handler_factory)
    loop = asyncio.new_event_loop()
    try:
        code = loop.run_until_complete(serve(settings, resolver, extra))
    finally:
        _cancel_leftover_tasks(loop)
        loop.close()
    busy = busy_threads()
    if busy:
        log.warning("exiting with busy threads %s", busy, extra={"exit_code": code})
    # End here rather than through interpreter finalization: that would wait for or tear
    # down busy threads mid-call, and gRPC's exit hooks alone take a second or more on a
    # loaded machine; nothing that must run at exit is left (logs are flushed below).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _cancel_leftover_tasks(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
