"""`ModelClients` over the Open Inference Protocol v2 (gRPC) with tritonclient.grpc.aio.

Tensor contract: docs/CONTRACTS.md. Every ModelInfer sends the pinned `model_version`; the
answered version is read from the response (`model_version`, else its parameter).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from marrowscope.provenance import WITHHELD_PREFIX
from marrowscope.stages import Stage
from marrowscope.targets import genetic_targets
from services.gateway.balancing import BalancedClients, Resolver, dns_resolver
from services.gateway.clients import (
    MIL_MODEL,
    PROVENANCE_PARAMETERS,
    Classification,
    EnsembleOutput,
    Explanation,
    FeatureUnits,
    MilOutput,
    ModelInfo,
    Segmentation,
    ServiceCallError,
    TensorSpec,
)
from services.gateway.config import SERVICES

if TYPE_CHECKING:
    from services.gateway.config import GatewaySettings

log = logging.getLogger(__name__)
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


def _code(exc: Exception) -> str:
    status = getattr(exc, "status", lambda: None)()
    if status:
        return str(status).removeprefix("StatusCode.")
    return "UNKNOWN"


def _strings(arr: np.ndarray | None) -> list[str]:
    if arr is None:
        return []
    return [x.decode() if isinstance(x, bytes) else str(x) for x in np.asarray(arr).reshape(-1)]


def _feature_units(params) -> FeatureUnits:
    """The ensemble's `feature_*` response parameters; unknown when absent or malformed."""

    def text(key: str) -> str:
        p = params.get(key)
        return p.string_param if p is not None else ""

    def number(key: str) -> float | None:
        try:
            return float(text(key))
        except ValueError:
            return None

    length = text("feature_length_unit")
    if length not in ("um", "px"):
        return FeatureUnits()
    return FeatureUnits(length, number("feature_um_per_px_min"), number("feature_um_per_px_max"))


def _optional_float(params, key: str) -> float | None:
    """A numeric string parameter; None when absent or empty, NaN when malformed (so the
    pipeline's range check refuses it instead of silently using a default)."""
    p = params.get(key)
    if p is None or not p.string_param:
        return None
    try:
        return float(p.string_param)
    except ValueError:
        return float("nan")


class OipModelClients:
    """One `tritonclient.grpc.aio.InferenceServerClient` per service address."""

    def __init__(
        self,
        addrs: dict[str, str],
        *,
        lb_policy: str = "",
        lb_refresh_s: float = 30.0,
        resolver: Resolver | None = None,
    ) -> None:
        """lb_policy `round_robin`: every call is balanced over all replicas behind each
        address, re-resolved every `lb_refresh_s` (`services.gateway.balancing`)."""
        from tritonclient.grpc import aio as grpcclient

        opts = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
        self._clients: Mapping[str, Any]
        if lb_policy == "round_robin":
            self._clients = BalancedClients(
                addrs,
                lambda target, args: grpcclient.InferenceServerClient(
                    url=target, channel_args=args
                ),
                opts,
                refresh_s=lb_refresh_s,
                resolver=resolver or dns_resolver,
            )
        elif lb_policy:
            raise ValueError(f"unknown lb_policy {lb_policy!r}; known: round_robin")
        else:
            self._clients = {
                s: grpcclient.InferenceServerClient(url=a, channel_args=opts)
                for s, a in addrs.items()
            }
        self.facts: dict[tuple[str, str], dict[str, str]] = {}
        """(model, version) -> its provenance parameters (`clients.model_facts`)."""

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> OipModelClients:
        return cls(
            {s: settings.service_addr(s) for s in SERVICES},
            lb_policy=settings.lb_policy,
            lb_refresh_s=settings.lb_refresh_s,
        )

    async def _call(self, service: str, coro) -> Any:
        from tritonclient.utils import InferenceServerException

        try:
            return await coro
        except InferenceServerException as exc:
            raise ServiceCallError(service, _code(exc), exc.message() or str(exc)) from exc

    def _client(self, model: str) -> Any:
        """The client of the service that serves `model` (the MIL model: the ensemble's)."""
        return self._clients[Stage.ENSEMBLE if model == MIL_MODEL else model]

    async def metadata(self, service: str, *, timeout: float) -> ModelInfo:
        md = await self._call(
            service, self._client(service).get_model_metadata(service, client_timeout=timeout)
        )
        if not md.versions:
            raise ServiceCallError(service, "FAILED_PRECONDITION", "model reports no version")

        def specs(tensors) -> dict[str, TensorSpec]:
            return {t.name: TensorSpec(t.datatype, tuple(int(d) for d in t.shape)) for t in tensors}

        # The runtime lists the version it serves now first (CONTRACTS: response version).
        return ModelInfo(md.name, md.versions[0], specs(md.inputs), specs(md.outputs))

    async def _infer(
        self,
        service: str,
        inputs: list,
        *,
        version: str,
        timeout: float,
        parameters: dict | None = None,
    ):
        result = await self._call(
            service,
            self._client(service).infer(
                service,
                inputs,
                model_version=version,
                client_timeout=timeout,
                parameters=parameters,
            ),
        )
        self._record_facts(service, result)
        return result

    def _record_facts(self, model: str, result) -> None:
        """Keep what the answering version says about itself (`clients.model_facts`): a
        registry version's training data and withheld outputs never change, so the last
        answer per (model, version) is the answer."""
        params = result.get_response().parameters
        facts = {
            k: v.string_param
            for k, v in params.items()
            if k in PROVENANCE_PARAMETERS or k.startswith(WITHHELD_PREFIX)
        }
        if facts:
            self.facts[(model, self._version(result))] = facts

    @staticmethod
    def _version(result) -> str:
        resp = result.get_response()
        if resp.model_version:
            return resp.model_version
        p = resp.parameters.get("model_version")
        return p.string_param if p is not None else ""

    @staticmethod
    def _input(name: str, array: np.ndarray, datatype: str):
        from tritonclient.grpc import InferInput

        inp = InferInput(name, list(array.shape), datatype)
        inp.set_data_from_numpy(array)
        return inp

    async def segment(
        self,
        image: bytes,
        *,
        version: str,
        timeout: float,
        um_per_px: float | None = None,
        boxes: np.ndarray | None = None,
    ) -> Segmentation:
        inputs = [self._input("IMAGE", np.array([image], dtype=np.object_), "BYTES")]
        if um_per_px is not None:
            inputs.append(self._input("UM_PER_PX", np.array([um_per_px], np.float32), "FP32"))
        if boxes is not None:
            b = np.ascontiguousarray(np.asarray(boxes, np.float32).reshape(-1, 4))
            inputs.append(self._input("BOXES_IN", b, "FP32"))
        r = await self._infer(Stage.SEGMENTATION, inputs, version=version, timeout=timeout)
        boxes = np.asarray(r.as_numpy("BOXES"), np.float32).reshape(-1, 4)
        names = _strings(r.as_numpy("FEATURE_NAMES"))
        feats = r.as_numpy("FEATURES")
        feats = (
            np.zeros((len(boxes), len(names)), np.float32)
            if feats is None
            else np.asarray(feats, np.float32).reshape(len(boxes), len(names))
        )
        unit = _strings(r.as_numpy("LENGTH_UNIT"))
        return Segmentation(
            boxes,
            np.asarray(r.as_numpy("SCORES"), np.float32).reshape(-1),
            _strings(r.as_numpy("LABELS")),
            feats,
            names,
            self._version(r),
            unit[0] if unit else None,
        )

    async def classify(
        self, crops: np.ndarray, *, version: str, timeout: float, embeddings: bool = False
    ) -> Classification:
        r = await self._infer(
            Stage.CELLTYPE,
            [self._input("CROPS", crops, "UINT8")],
            version=version,
            timeout=timeout,
            parameters={"embeddings": True} if embeddings else None,
        )
        names = _strings(r.as_numpy("NAMES"))
        probs = np.asarray(r.as_numpy("PROBS"), np.float32).reshape(len(crops), len(names))
        emb = None
        if embeddings:
            raw = r.as_numpy("EMBEDDINGS")
            if raw is None:
                raise ServiceCallError(
                    Stage.CELLTYPE, "INVALID_ARGUMENT", "celltype answered no EMBEDDINGS"
                )
            emb = np.asarray(raw, np.float32).reshape(len(crops), -1)
        domain, threshold = None, None
        if embeddings and (raw := r.as_numpy("DOMAIN")) is not None:
            domain = np.asarray(raw, np.float32).reshape(len(crops), 2)
            threshold = _optional_float(r.get_response().parameters, "domain_threshold")
        return Classification(probs, names, self._version(r), emb, domain, threshold)

    async def mil(self, embeddings: np.ndarray, *, version: str, timeout: float) -> MilOutput:
        r = await self._infer(
            MIL_MODEL,
            [self._input("CELL_EMBEDDINGS", np.asarray(embeddings, np.float32), "FP32")],
            version=version,
            timeout=timeout,
        )
        params = r.get_response().parameters

        def text(key: str) -> str:
            p = params.get(key)
            return p.string_param if p is not None else ""

        p = r.as_numpy("P_APL")
        attention = r.as_numpy("ATTENTION")
        if p is None or attention is None:
            raise ServiceCallError(MIL_MODEL, "INVALID_ARGUMENT", "mil answered no P_APL/ATTENTION")
        return MilOutput(
            float(np.asarray(p).reshape(-1)[0]),
            np.asarray(attention, np.float32).reshape(-1),
            self._version(r),
            text("lineage_celltype"),
            text("lineage_celltype_model"),
        )

    async def ensemble(
        self, features: np.ndarray, names: list[str], *, version: str, timeout: float
    ) -> EnsembleOutput:
        inputs = [
            self._input("FEATURES", features.reshape(1, -1).astype(np.float32), "FP32"),
            self._input(
                "FEATURE_NAMES", np.array([n.encode() for n in names], dtype=np.object_), "BYTES"
            ),
        ]
        r = await self._infer(Stage.ENSEMBLE, inputs, version=version, timeout=timeout)
        params = r.get_response().parameters
        lineage = {
            k.removeprefix("lineage_"): v.string_param
            for k, v in params.items()
            if k.startswith("lineage_")
        }
        p_targets, thresholds = {}, {}
        for target in genetic_targets():
            p = r.as_numpy(target.output)  # None: this version has no such head
            if p is not None:
                p_targets[target.code] = float(np.asarray(p).reshape(-1)[0])
            if (t := _optional_float(params, target.threshold_parameter)) is not None:
                thresholds[target.code] = t
        return EnsembleOutput(
            float(np.asarray(r.as_numpy("P_AML")).reshape(-1)[0]),
            lineage,
            self._version(r),
            _feature_units(params),
            p_targets=p_targets,
            thresholds=thresholds,
        )

    async def npm1(self, image: np.ndarray, *, version: str, timeout: float) -> float:
        r = await self._infer(
            Stage.NPM1,
            [self._input("IMAGE", image[None].astype(np.uint8), "UINT8")],
            version=version,
            timeout=timeout,
        )
        return float(np.asarray(r.as_numpy("P_NPM1")).reshape(-1)[0])

    async def explain(
        self,
        image: np.ndarray,
        boxes: np.ndarray,
        *,
        version: str,
        target_model: str,
        target_version: str,
        timeout: float,
    ) -> Explanation:
        inputs = [
            self._input("IMAGE", image[None].astype(np.uint8), "UINT8"),
            self._input("BOXES", boxes.reshape(-1, 4).astype(np.float32), "FP32"),
        ]
        params = {"target_model": target_model, "target_version": target_version, "mode": "cells"}
        r = await self._infer(
            Stage.EXPLAIN, inputs, version=version, timeout=timeout, parameters=params
        )
        return Explanation(
            np.asarray(r.as_numpy("HEATMAP"), np.float32),
            np.asarray(r.as_numpy("CELL_IMPORTANCE"), np.float32).reshape(-1),
            self._version(r),
        )

    async def ready(self, *, timeout: float) -> dict[str, bool]:
        async def one(service: str) -> bool:
            client = self._clients[service]
            try:
                return bool(
                    await client.is_server_ready(client_timeout=timeout)
                    and await client.is_model_ready(service, client_timeout=timeout)
                )
            except Exception as exc:  # any transport failure means "not ready", logged
                log.info("readiness of %s failed: %s", service, exc)
                return False

        names = list(self._clients)
        return dict(zip(names, await asyncio.gather(*(one(s) for s in names)), strict=True))

    async def close(self) -> None:
        if isinstance(self._clients, BalancedClients):
            await self._clients.close()
            return
        await asyncio.gather(*(c.close() for c in self._clients.values()))
