"""`OipModelClients` over the wire: a real grpc.aio server on a loopback port speaking the
OIP v2 `inference.GRPCInferenceService` (tritonclient's generated stubs), answering with
the test models. Checks tensor encoding, pinned versions, lineage parameters, the optional
P_NPM1 output and npm1_threshold parameter, and that a dead address maps to UNAVAILABLE."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from marrowscope.targets import genetic_targets
from services.gateway.clients import ServiceCallError
from services.gateway.oip import OipModelClients
from tests.gateway.conftest import png
from tests.gateway.fakes import FakeModelClients


def _servicer(fake: FakeModelClients, seen: dict):
    from tritonclient.grpc import service_pb2, service_pb2_grpc
    from tritonclient.utils import (
        deserialize_bytes_tensor,
        serialize_byte_tensor,
        triton_to_np_dtype,
    )

    def tensors(request) -> dict[str, np.ndarray]:
        out = {}
        for spec, raw in zip(request.inputs, request.raw_input_contents, strict=True):
            if spec.datatype == "BYTES":
                arr = deserialize_bytes_tensor(raw)
            else:
                arr = np.frombuffer(raw, dtype=triton_to_np_dtype(spec.datatype))
            out[spec.name] = arr.reshape(tuple(spec.shape))
        return out

    def respond(
        request,
        version: str,
        outputs: dict[str, tuple[str, np.ndarray]],
        params: dict[str, str] | None = None,
    ):
        resp = service_pb2.ModelInferResponse(model_name=request.model_name, model_version=version)
        for name, (dtype, arr) in outputs.items():
            resp.outputs.add(name=name, datatype=dtype, shape=list(arr.shape))
            raw = (
                serialize_byte_tensor(arr).item()
                if dtype == "BYTES"
                else np.ascontiguousarray(arr).tobytes()
            )
            resp.raw_output_contents.append(raw)
        for k, v in (params or {}).items():
            resp.parameters[k].string_param = v
        resp.parameters["model_version"].string_param = version
        return resp

    def strings(items) -> np.ndarray:
        return np.array([s.encode() for s in items], dtype=np.object_)

    class Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):
        async def ServerReady(self, request, context):  # noqa: N802 - generated API
            return service_pb2.ServerReadyResponse(ready=True)

        async def ModelReady(self, request, context):  # noqa: N802
            return service_pb2.ModelReadyResponse(ready=True)

        async def ModelMetadata(self, request, context):  # noqa: N802
            info = await fake.metadata(request.name, timeout=1)
            resp = service_pb2.ModelMetadataResponse(
                name=info.name, versions=[info.version], platform="marrowscope"
            )
            for n, spec in info.inputs.items():
                resp.inputs.add(name=n, datatype=spec.datatype, shape=list(spec.shape))
            for n, spec in info.outputs.items():
                resp.outputs.add(name=n, datatype=spec.datatype, shape=list(spec.shape))
            return resp

        async def ModelInfer(self, request, context):  # noqa: N802
            name, v = request.model_name, request.model_version
            seen.setdefault(name, []).append(v)
            x = tensors(request)
            if name == "segmentation":
                um = float(x["UM_PER_PX"].reshape(-1)[0]) if "UM_PER_PX" in x else None
                s = await fake.segment(
                    bytes(x["IMAGE"].reshape(-1)[0]), version=v, timeout=5, um_per_px=um
                )
                return respond(
                    request,
                    v,
                    {
                        "BOXES": ("FP32", s.boxes),
                        "SCORES": ("FP32", s.scores),
                        "LABELS": ("BYTES", strings(s.labels)),
                        "FEATURES": ("FP32", s.features),
                        "FEATURE_NAMES": ("BYTES", strings(s.feature_names)),
                        "LENGTH_UNIT": ("BYTES", strings([s.length_unit])),
                    },
                )
            if name == "celltype":
                c = await fake.classify(x["CROPS"], version=v, timeout=5)
                return respond(
                    request, v, {"PROBS": ("FP32", c.probs), "NAMES": ("BYTES", strings(c.names))}
                )
            if name == "ensemble":
                names = [b.decode() for b in x["FEATURE_NAMES"].reshape(-1)]
                e = await fake.ensemble(x["FEATURES"].reshape(-1), names, version=v, timeout=5)
                u = e.feature_units
                outputs = {"P_AML": ("FP32", np.array([e.p_aml], np.float32))}
                params = {
                    **{f"lineage_{k}": val for k, val in e.lineage.items()},
                    "feature_length_unit": u.length,
                    "feature_um_per_px_min": str(u.um_per_px_min or ""),
                    "feature_um_per_px_max": str(u.um_per_px_max or ""),
                }
                for t in genetic_targets():  # as the ensemble service: only the heads it has
                    if e.p(t.code) is not None:
                        outputs[t.output] = ("FP32", np.array([e.p(t.code)], np.float32))
                    if e.threshold(t.code) is not None:
                        params[t.threshold_parameter] = str(e.threshold(t.code))
                return respond(request, v, outputs, params)
            if name == "npm1":
                p = await fake.npm1(x["IMAGE"][0], version=v, timeout=5)
                return respond(request, v, {"P_NPM1": ("FP32", np.array([p], np.float32))})
            params = {k: p.string_param for k, p in request.parameters.items()}
            seen["explain_params"] = params
            e = await fake.explain(
                x["IMAGE"][0],
                x["BOXES"],
                version=v,
                target_model=params["target_model"],
                target_version=params["target_version"],
                timeout=5,
            )
            return respond(
                request,
                v,
                {"HEATMAP": ("FP32", e.heatmap), "CELL_IMPORTANCE": ("FP32", e.cell_importance)},
            )

    return Servicer()


@pytest.mark.parametrize("targets", [("aml",), ("aml", "npm1"), ("aml", "npm1", "apl")])
def test_pipeline_over_the_wire(make_settings, port_factory, targets):
    from tritonclient.grpc import service_pb2_grpc

    from services.gateway.pipeline import CaseImage, Pipeline

    async def main():
        seen: dict = {}
        server = grpc.aio.server()
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            _servicer(
                FakeModelClients(
                    feature_units="um", targets=targets, npm1_threshold=0.3, apl_threshold=0.2
                ),
                seen,
            ),
            server,
        )
        port = server.add_insecure_port(f"127.0.0.1:{port_factory()}")
        await server.start()
        addr = f"127.0.0.1:{port}"
        clients = OipModelClients(
            {s: addr for s in ("segmentation", "celltype", "ensemble", "npm1", "explain")}
        )
        try:
            assert all((await clients.ready(timeout=2)).values())
            pipe = Pipeline(clients=clients, settings=make_settings())
            out = await pipe.run(
                analysis_id="a1",
                explain=True,
                images=[CaseImage(0, "0" * 64, png(320, 240, seed=7), um_per_px=0.27)],
            )
            bare = await Pipeline(clients=clients, settings=make_settings()).run(
                analysis_id="a2", images=[CaseImage(0, "0" * 64, png(seed=7))]
            )
        finally:
            await clients.close()
            await server.stop(0)
        return out, bare, seen

    out, bare, seen = asyncio.run(main())
    assert out.status == "succeeded", out.reason
    res = out.result
    # the units travel over the wire both ways: LENGTH_UNIT and the ensemble's parameters
    assert res["morphometrics_unit"] == "um" and 0 <= res["p_aml"] <= 1
    assert res["aml"]["model_length_unit"] == "um"
    assert bare.result["morphometrics_unit"] == "px" and bare.result["p_aml"] is None
    assert "0.25-0.3 um/px" in bare.result["aml"]["detail"]
    assert res["lineage"] == {"segmentation": "3", "celltype": "5"}
    assert seen["segmentation"] == ["3", "3"] and set(seen["celltype"]) == {"5"}
    assert seen["npm1"] == ["7", "7"] and seen["ensemble"] == ["2", "2"]
    assert seen["explain_params"] == {
        "target_model": "npm1",
        "target_version": "7",
        "mode": "cells",
    }
    assert res["images"][0]["n_detected"] == 40 and len(out.artifacts) == 1
    # P_NPM1 and its threshold cross the wire only from a two-target ensemble
    call, withheld = res["npm1_morphology"], bare.result["npm1_morphology"]
    if "npm1" in targets:
        assert call["status"] == "predicted" and 0 <= call["p"] <= 1
        assert (call["threshold"], call["threshold_source"]) == (0.3, "model")
        assert (withheld["status"], withheld["reason"]) == ("abstained", "pixel_size_required")
    else:
        assert call["status"] == withheld["status"] == "not_available"
        assert call["threshold_source"] == "deployment" and call["p"] is None
    # P_APL and apl_threshold likewise, only from an ensemble with the apl head
    call, withheld = res["apl_morphology"], bare.result["apl_morphology"]
    if "apl" in targets:
        assert call["status"] == "predicted" and 0 <= call["p"] <= 1
        assert call["p"] != pytest.approx(res["npm1_morphology"]["p"])
        assert (call["threshold"], call["threshold_source"]) == (0.2, "model")
        assert (withheld["status"], withheld["reason"]) == ("abstained", "pixel_size_required")
    else:
        assert (call["status"], call["reason"]) == ("not_available", "no_apl_output")


def test_dead_address_is_unavailable(port_factory):
    async def main():
        clients = OipModelClients({"segmentation": f"127.0.0.1:{port_factory()}"})
        try:
            with pytest.raises(ServiceCallError) as err:
                await clients.metadata("segmentation", timeout=2)
            assert (await clients.ready(timeout=1)) == {"segmentation": False}
        finally:
            await clients.close()
        return err.value

    exc = asyncio.run(main())
    assert exc.code == "UNAVAILABLE" and exc.transient
