"""Locust scenario: the LIS flow through the gateway's REST API.

Each simulated user submits a case (`POST /v1/analyses`, multipart `images` + `metadata`)
and polls `GET /v1/analyses/{id}` until it is finished, then starts the next case. The
mix of case types (weights): one image (3), two images (2), one image with explanations
(1). Besides the HTTP requests, every case fires a request event of type `case` named
after its type, with the time from submit to finished; a case that does not end
`succeeded` (or takes longer than MS_LOADTEST_CASE_TIMEOUT_S) is a failure.

Environment (set by `python -m loadtests.run`):
    MS_LOADTEST_API_KEY      key with the submit and read scopes
    MS_LOADTEST_INPUTS       .npz written by `bench.workloads.Inputs.save` (PNG images)
    MS_LOADTEST_CASE_TIMEOUT_S  optional, default 300
    MS_LOADTEST_SUMMARY      where the final statistics go (`loadtests.summary`)
"""

from __future__ import annotations

import itertools
import json
import os
import time
import uuid

from locust import HttpUser, constant, events, task

from bench.workloads import Inputs
from loadtests import summary

POLL_S = 0.1
FINISHED = ("succeeded", "failed", "abstained", "cancelled")
_STATE: dict = {}
summary.install(events, hard_exit=False)


class CaseFailed(RuntimeError):
    """A case ended in another state than `succeeded`, or not in time."""


@events.test_start.add_listener
def _load(environment, **_kwargs) -> None:
    _STATE["inputs"] = Inputs.load(os.environ["MS_LOADTEST_INPUTS"])
    _STATE["timeout_s"] = float(os.environ.get("MS_LOADTEST_CASE_TIMEOUT_S", "300"))


class LisUser(HttpUser):
    wait_time = constant(0)

    def on_start(self) -> None:
        self.client.headers["X-API-Key"] = os.environ["MS_LOADTEST_API_KEY"]
        self.counter = itertools.count()

    def _case(self, kind: str, n_images: int, explain: bool = False) -> None:
        pngs = _STATE["inputs"].pngs
        meta = {
            "accession_id": f"LT-{uuid.uuid4().hex[:12]}-{next(self.counter)}",
            "options": {"explain": explain},
        }
        files = [
            ("images", (f"{k}.png", pngs[k % len(pngs)], "image/png")) for k in range(n_images)
        ]
        with self.environment.events.request.measure("case", kind) as case:
            r = self.client.post(
                "/v1/analyses",
                files=files,
                data={"metadata": json.dumps(meta)},
                name="/v1/analyses",
            )
            if r.status_code != 202:
                raise CaseFailed(f"submit answered {r.status_code}")
            location = r.json()["location"]
            deadline = time.monotonic() + _STATE["timeout_s"]
            while True:
                body = self.client.get(location, name="/v1/analyses/{id}").json()
                if body["status"] in FINISHED:
                    break
                if time.monotonic() > deadline:
                    raise CaseFailed(f"not finished after {_STATE['timeout_s']} s")
                time.sleep(POLL_S)
            if body["status"] != "succeeded":
                raise CaseFailed(f"analysis {body['status']}: {body.get('reason')}")
            case["response_length"] = len(r.content)

    @task(3)
    def one_image(self) -> None:
        self._case("case: 1 image", 1)

    @task(2)
    def two_images(self) -> None:
        self._case("case: 2 images", 2)

    @task(1)
    def explained(self) -> None:
        self._case("case: 1 image + explain", 1, explain=True)
