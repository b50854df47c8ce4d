"""A tiny real HTTP server that answers the apps/v1 Deployment GET and PATCH endpoints.

It stores Deployments as JSON (seeded from the chart's rendered manifests), records every
request, applies strategic-merge patches of container env and pod annotations the way the
API server does (lists merged by `name`), bumps `metadata.generation`, and lets the status
catch up after `lag` reads so that waiting on a rollout can be tested.
"""

from __future__ import annotations

import copy
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

PATH = re.compile(r"^/apis/apps/v1/namespaces/([^/]+)/deployments/([^/]+)$")


class FakeApiServer:
    def __init__(
        self, deployments: list[dict], *, lag: int = 1, fail_patch: set[str] | None = None
    ):
        self.deployments = {
            (d["metadata"]["namespace"], d["metadata"]["name"]): self._with_status(copy.deepcopy(d))
            for d in deployments
        }
        self.lag = lag
        self.fail_patch = fail_patch or set()
        self.requests: list[dict] = []
        self._pending: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeApiServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def patches(self) -> list[dict]:
        return [r for r in self.requests if r["method"] == "PATCH"]

    @staticmethod
    def _with_status(dep: dict) -> dict:
        dep["metadata"].setdefault("generation", 1)
        n = dep["spec"].get("replicas", 1)
        dep["status"] = {
            "observedGeneration": dep["metadata"]["generation"],
            "replicas": n,
            "updatedReplicas": n,
            "readyReplicas": n,
            "availableReplicas": n,
        }
        return dep

    def _get(self, key):
        dep = self.deployments[key]
        if key in self._pending:
            self._pending[key] -= 1
            if self._pending[key] < 0:
                del self._pending[key]
                self._with_status(dep)
        return dep

    def _patch(self, key, body: dict, dry_run: bool) -> dict:
        dep = copy.deepcopy(self.deployments[key])
        tmpl = body.get("spec", {}).get("template", {})
        ann = dep["spec"]["template"]["metadata"].setdefault("annotations", {})
        ann.update(tmpl.get("metadata", {}).get("annotations", {}))
        containers = {c["name"]: c for c in dep["spec"]["template"]["spec"]["containers"]}
        for pc in tmpl.get("spec", {}).get("containers", []):
            target = containers[pc["name"]]
            env = {e["name"]: e for e in target.setdefault("env", [])}
            for e in pc.get("env", []):
                if e["name"] in env:
                    env[e["name"]].update(e)
                else:
                    target["env"].append(e)
        if dep["spec"]["template"] != self.deployments[key]["spec"]["template"]:
            dep["metadata"]["generation"] += 1
        if not dry_run:
            self.deployments[key] = dep
            if dep["metadata"]["generation"] != dep["status"]["observedGeneration"]:
                self._pending[key] = self.lag
        return dep

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _reply(self, code: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                url = urlparse(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                query = parse_qs(url.query)
                with server._lock:
                    server.requests.append(
                        {
                            "method": method,
                            "path": url.path,
                            "query": query,
                            "body": body,
                            "content_type": self.headers.get("Content-Type"),
                        }
                    )
                    m = PATH.match(url.path)
                    key = (m.group(1), m.group(2)) if m else None
                    if key not in server.deployments:
                        self._reply(
                            404,
                            {
                                "kind": "Status",
                                "apiVersion": "v1",
                                "status": "Failure",
                                "reason": "NotFound",
                                "code": 404,
                                "message": f"deployments.apps {url.path} not found",
                            },
                        )
                        return
                    if method == "GET":
                        self._reply(200, server._get(key))
                    elif key[1] in server.fail_patch:
                        self._reply(
                            422,
                            {
                                "kind": "Status",
                                "apiVersion": "v1",
                                "status": "Failure",
                                "reason": "Invalid",
                                "code": 422,
                                "message": "refused",
                            },
                        )
                    else:
                        self._reply(200, server._patch(key, body, "All" in query.get("dryRun", [])))

            def do_GET(self):
                self._handle("GET")

            def do_PATCH(self):
                self._handle("PATCH")

        return Handler
