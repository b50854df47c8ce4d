"""Locust scenario: direct Open Inference Protocol gRPC calls to the model services.

Each simulated user holds one `tritonclient.grpc` client per service and calls ModelInfer
with the benchmark inputs (`bench.workloads.oip_request`: an encoded smear image for
segmentation, 32 cell crops for celltype, a case feature vector for ensemble, one image at
the npm1 input size). Every call fires a locust request event of type `grpc` named after
the model; a gRPC error counts as a failure.

Environment (set by `python -m loadtests.run`):
    MS_LOADTEST_OIP_TARGETS  JSON {"segmentation": "127.0.0.1:port", ...}; a model absent
                             from it is not called
    MS_LOADTEST_INPUTS       .npz written by `bench.workloads.Inputs.save`
    MS_LOADTEST_OIP_WEIGHTS  optional JSON {"npm1": 3, ...} (default 1 each)
    MS_LOADTEST_SUMMARY      where the final statistics go (`loadtests.summary`; this
                             process ends right after writing them)
"""

from __future__ import annotations

# gRPC's blocking calls must yield to gevent, or one locust user would block the others.
import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402

from locust import User, constant, events, task  # noqa: E402

from bench.workloads import Inputs, oip_request  # noqa: E402
from loadtests import summary  # noqa: E402

_STATE: dict = {}


@events.test_start.add_listener
def _load(environment, **_kwargs) -> None:
    targets = json.loads(os.environ["MS_LOADTEST_OIP_TARGETS"])
    if not targets:
        raise RuntimeError("MS_LOADTEST_OIP_TARGETS names no model service")
    weights = json.loads(os.environ.get("MS_LOADTEST_OIP_WEIGHTS") or "{}")
    _STATE.update(
        targets=targets,
        inputs=Inputs.load(os.environ["MS_LOADTEST_INPUTS"]),
        models=list(targets),
        weights=[float(weights.get(m, 1)) for m in targets],
    )


# Summary at `quit`, then os._exit: gRPC under gevent can stall interpreter finalisation.
summary.install(events, hard_exit=True)


class OipUser(User):
    """Calls a randomly chosen model service (weighted) back to back."""

    wait_time = constant(0)

    def on_start(self) -> None:
        import tritonclient.grpc as tc

        self.clients = {m: tc.InferenceServerClient(a) for m, a in _STATE["targets"].items()}

    def on_stop(self) -> None:
        for client in self.clients.values():
            client.close()

    @task
    def infer(self) -> None:
        model = random.choices(_STATE["models"], weights=_STATE["weights"])[0]
        request = oip_request(model, _STATE["inputs"])
        with self.environment.events.request.measure("grpc", model) as meta:
            result = self.clients[model].infer(model, request, client_timeout=120)
            meta["response_length"] = result.get_response().ByteSize()
