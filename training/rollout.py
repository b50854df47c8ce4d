"""Roll promoted model versions out to the model-service Deployments on Kubernetes.

Promotion (training/promote.py) moves the registry alias; services also poll the alias, but
a rollout makes the change explicit, auditable and fast: each Deployment's container env
`MS_<SERVICE>_MODEL_URI` is pinned to the exact version `models:/marrowscope-<kind>/<V>` and
the pod template gets the annotation `marrowscope.io/model-version`, so Kubernetes replaces
the pods. The chart's `maxUnavailable: 0` rolling update plus the gRPC readiness probe (SERVING
only after load and warm-up) keep the old pods serving until the new version is warm.

The explain service follows npm1: it preloads the NPM1 model (and loads any other version a
request names through `target_version`), so promoting npm1 also moves explain's preloaded
version. A cluster without an explain Deployment is reported, not treated as an error.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from marrowscope.errors import InvalidInput
from marrowscope.stages import PIPELINE_MODELS, Stage

log = logging.getLogger(__name__)

MODEL_KINDS: tuple[str, ...] = PIPELINE_MODELS
# Services that preload another kind's model and move with it (explain follows npm1).
FOLLOWERS: dict[str, tuple[str, ...]] = {k: k.followers for k in PIPELINE_MODELS if k.followers}
VERSION_ANNOTATION = "marrowscope.io/model-version"
STRATEGIC_MERGE = "application/strategic-merge-patch+json"


class RolloutError(RuntimeError):
    """A Deployment could not be patched or did not finish rolling out in time."""


@dataclass(frozen=True)
class RolloutResult:
    """What happened to one Deployment.

    `status` is one of `patched` (change sent), `unchanged` (already at that version),
    `dry-run` (validated by the API server, not persisted), `absent` (optional follower
    Deployment not found), `complete` (patched and every replica updated and available).
    """

    service: str
    deployment: str
    model_uri: str
    previous_uri: str | None
    status: str
    generation: int | None = None


def model_uri(kind: str, version: str) -> str:
    """The exact-version registry URI a service loads, e.g. `models:/marrowscope-npm1/7`."""
    return f"models:/{Stage(kind).registered_name}/{version}"


def env_name(service: str) -> str:
    return f"{Stage(service).env_prefix}MODEL_URI"


def _targets(versions: dict[str, str]) -> list[tuple[str, str, str, bool]]:
    """(service, kind, version, optional) for every Deployment to patch, checked first."""
    unknown = sorted(set(versions) - set(MODEL_KINDS))
    if unknown:
        raise InvalidInput(f"unknown model kinds {unknown}; expected some of {list(MODEL_KINDS)}")
    targets = []
    for kind in MODEL_KINDS:
        if kind not in versions:
            continue
        version = str(versions[kind]).strip()
        if not version or "/" in version or "@" in version:
            raise InvalidInput(
                f"{kind}: version must be a registry version number, got {version!r}"
            )
        targets.append((kind, kind, version, False))
        targets.extend((f, kind, version, True) for f in FOLLOWERS.get(kind, ()))
    return targets


def _container_index(deployment: Any, service: str) -> int:
    """Index of the container that reads `MS_<SERVICE>_MODEL_URI` (else the one named service)."""
    containers = deployment.spec.template.spec.containers
    wanted = env_name(service)
    for i, c in enumerate(containers):
        if any(e.name == wanted for e in (c.env or [])):
            return i
    for i, c in enumerate(containers):
        if c.name == service:
            return i
    raise RolloutError(
        f"deployment {deployment.metadata.name}: no container sets {wanted} or is named {service}"
    )


def _current_uri(container: Any, service: str) -> str | None:
    for e in container.env or []:
        if e.name == env_name(service):
            return e.value
    return None


def patch_body(container: str, service: str, uri: str, version: str) -> dict[str, Any]:
    """Strategic-merge patch: containers and env merge by name, nothing else changes."""
    return {
        "spec": {
            "template": {
                "metadata": {"annotations": {VERSION_ANNOTATION: version}},
                "spec": {
                    "containers": [
                        {"name": container, "env": [{"name": env_name(service), "value": uri}]}
                    ]
                },
            }
        }
    }


def rollout_model_services(
    versions: dict[str, str],
    *,
    namespace: str,
    deployment_prefix: str = "marrowscope-",
    api_client: Any = None,
    dry_run: bool = False,
    wait: bool = False,
    timeout_s: float = 900.0,
    poll_s: float = 2.0,
) -> list[RolloutResult]:
    """Pin each model service Deployment to a promoted version so its pods roll.

    Args:
        versions: model kind (`segmentation|celltype|ensemble|npm1`) -> registry version,
            e.g. `{"npm1": "7"}`. npm1 also moves the explain Deployment.
        namespace: namespace of the release.
        deployment_prefix: Deployment name = prefix + service (the chart's fullname + "-").
        api_client: a `kubernetes.client.ApiClient`; default loads in-cluster config, then
            kubeconfig.
        dry_run: send the patches with `dryRun=All` (server-side validation, nothing
            persisted).
        wait: block until every patched Deployment has all replicas updated and available.
        timeout_s: how long `wait` may take in total before raising `RolloutError`.

    Returns:
        One `RolloutResult` per Deployment considered, in kind order.

    Raises:
        InvalidInput: unknown kind or malformed version (before anything is sent).
        RolloutError: a required Deployment is missing, the API refused the patch, or the
            rollout did not complete in time / exceeded its progress deadline.
    """
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    targets = _targets(versions)
    apps = client.AppsV1Api(api_client if api_client is not None else _default_client())
    results: list[RolloutResult] = []
    for service, kind, version, optional in targets:
        name = f"{deployment_prefix}{service}"
        uri = model_uri(kind, version)
        try:
            dep: Any = apps.read_namespaced_deployment(name, namespace)
        except ApiException as exc:
            if exc.status == 404 and optional:
                log.info("deployment %s/%s absent; %s not rolled", namespace, name, service)
                results.append(RolloutResult(service, name, uri, None, "absent"))
                continue
            raise RolloutError(
                f"cannot read deployment {namespace}/{name}: {exc.status} {exc.reason}"
            ) from exc
        idx = _container_index(dep, service)
        container = dep.spec.template.spec.containers[idx]
        previous = _current_uri(container, service)
        annotations = dep.spec.template.metadata.annotations or {}
        if previous == uri and annotations.get(VERSION_ANNOTATION) == version:
            results.append(
                RolloutResult(service, name, uri, previous, "unchanged", dep.metadata.generation)
            )
            continue
        body = patch_body(container.name, service, uri, version)
        kwargs: dict[str, Any] = {"dry_run": "All"} if dry_run else {}
        try:
            patched: Any = apps.patch_namespaced_deployment(
                name, namespace, body, _content_type=STRATEGIC_MERGE, **kwargs
            )
        except ApiException as exc:
            raise RolloutError(
                f"patch of {namespace}/{name} refused: {exc.status} {exc.body}"
            ) from exc
        status = "dry-run" if dry_run else "patched"
        log.info("%s %s/%s: %s -> %s", status, namespace, name, previous, uri)
        results.append(
            RolloutResult(service, name, uri, previous, status, patched.metadata.generation)
        )

    if wait and not dry_run:
        deadline = time.monotonic() + timeout_s
        results = [
            _wait_complete(apps, namespace, r, deadline, poll_s) if r.status == "patched" else r
            for r in results
        ]
    return results


def rollout_complete(dep: Any, generation: int | None) -> bool:
    """`kubectl rollout status` semantics: the controller saw the new generation and every
    desired replica is updated and available, with no old replica left."""
    st = dep.status
    desired = dep.spec.replicas if dep.spec.replicas is not None else 1
    if st is None or (st.observed_generation or 0) < (generation or dep.metadata.generation or 0):
        return False
    for cond in st.conditions or []:
        if cond.type == "Progressing" and cond.reason == "ProgressDeadlineExceeded":
            raise RolloutError(f"deployment {dep.metadata.name} exceeded its progress deadline")
    return (
        (st.updated_replicas or 0) >= desired
        and (st.replicas or 0) <= (st.updated_replicas or 0)
        and (st.available_replicas or 0) >= desired
    )


def _wait_complete(
    apps: Any, namespace: str, result: RolloutResult, deadline: float, poll_s: float
) -> RolloutResult:
    while True:
        dep = apps.read_namespaced_deployment(result.deployment, namespace)
        if rollout_complete(dep, result.generation):
            log.info("rollout of %s/%s complete", namespace, result.deployment)
            return RolloutResult(
                result.service,
                result.deployment,
                result.model_uri,
                result.previous_uri,
                "complete",
                result.generation,
            )
        if time.monotonic() >= deadline:
            st = dep.status
            raise RolloutError(
                f"rollout of {namespace}/{result.deployment} not complete in time: "
                f"{st.updated_replicas if st else 0} updated, {st.available_replicas if st else 0} available"
            )
        time.sleep(poll_s)


def _default_client() -> Any:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()
