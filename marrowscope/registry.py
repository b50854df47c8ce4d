"""MLflow model registry: names, version tags (metrics, lineage), resolution to local files.

Registered names are `marrowscope-{segmentation,celltype,ensemble,npm1,nucseg}`; serving follows
the alias `champion` (aliases, never the deprecated stages). A model version is a plain
MLflow artifact directory (`model.safetensors` + `config.json`, see `marrowscope.models`)
so loading it never unpickles.

Tracking URI: `MLFLOW_TRACKING_URI` when set (e.g. `http://mlflow:5000`), otherwise the
embedded store `sqlite:///<project>/mlflow.db` with artifacts under `<project>/mlruns`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from marrowscope.errors import InvalidInput, ModelNotFound
from marrowscope.models.io import ModelFormatError, model_digest, read_config
from marrowscope.paths import PROJECT_ROOT
from marrowscope.provenance import TAG_TRAINED_ON, trained_on
from marrowscope.stages import REGISTERED, Stage

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

KINDS: tuple[str, ...] = REGISTERED
MODEL_KIND: dict[str, str] = {s: s.model_kind for s in REGISTERED}
CHAMPION = "champion"
ARTIFACT_PATH = "marrowscope-model"
EXPERIMENT = "marrowscope-models"

TAG_DATA_HASH = "marrowscope.data_hash"
TAG_GIT_COMMIT = "marrowscope.git_commit"
TAG_CONFIG = "marrowscope.config"
TAG_DIGEST = "marrowscope.digest"
TAG_KIND = "marrowscope.kind"
TAG_ARTIFACT_PATH = "marrowscope.artifact_path"
METRIC_PREFIX = "marrowscope.metric."
LINEAGE_PREFIX = "marrowscope.lineage."

_URI_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)/?$")
_URI_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)/?$")


def registered_name(kind: str) -> str:
    """`segmentation` -> `marrowscope-segmentation` (raises InvalidInput for other kinds)."""
    if kind not in KINDS:
        raise InvalidInput(f"unknown registry kind {kind!r}; known: {', '.join(KINDS)}")
    return Stage(kind).registered_name


def kind_of(name_or_model_kind: str) -> str:
    """Registry kind for a registered name or a model-config kind (`detector` -> `segmentation`)."""
    value = name_or_model_kind.removeprefix("marrowscope-")
    for kind, model_kind in MODEL_KIND.items():
        if value in (kind, model_kind):
            return kind
    raise InvalidInput(f"{name_or_model_kind!r} is not a MarrowScope model name or kind")


def default_tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI`, else the embedded `sqlite:///<project>/mlflow.db`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"


def get_client(tracking_uri: str | None = None) -> MlflowClient:
    """An MlflowClient whose tracking and registry stores are the same URI."""
    from mlflow import MlflowClient

    uri = tracking_uri or default_tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _is_not_found(exc: Exception) -> bool:
    code = getattr(exc, "error_code", "")
    return code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or (
        code == "INVALID_PARAMETER_VALUE" and "not found" in str(exc).lower()
    )


def git_commit() -> str:
    """`git rev-parse HEAD` of the project, or `unknown` outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def local_artifact_location(uri: str) -> str | None:
    """Artifacts next to a local SQLite store (`<db dir>/mlruns`); servers choose their own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlruns").as_uri()
    return None


def _experiment_id(client: MlflowClient, uri: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(EXPERIMENT, artifact_location=local_artifact_location(uri))
    except MlflowException as exc:  # created concurrently by another process
        exp = client.get_experiment_by_name(EXPERIMENT)
        if exp is None:
            raise exc from None
        return exp.experiment_id


def _ensure_registered(client: MlflowClient, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if not _is_not_found(exc):
            raise
        try:
            client.create_registered_model(name, description=f"MarrowScope {kind_of(name)} model")
        except MlflowException as exc2:
            if getattr(exc2, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise


def register_model_dir(
    kind: str,
    model_dir: str | os.PathLike[str],
    *,
    metrics: dict[str, float],
    params: dict[str, Any],
    data_hash: str,
    lineage: dict[str, str],
    run_id: str | None = None,
    description: str | None = None,
    tracking_uri: str | None = None,
) -> str:
    """Log `model_dir` as run artifacts and register it as a new version; return the version.

    `metrics` (e.g. {"auroc": 0.93}) become version tags `marrowscope.metric.<name>`;
    `lineage` maps upstream kinds to versions (an ensemble: {"segmentation": "3",
    "celltype": "5"}) and becomes `marrowscope.lineage.<kind>`. With `run_id`, the
    artifacts go into that (training) run; otherwise a run is created in the
    `marrowscope-models` experiment and params/metrics are logged to it too.
    """
    name = registered_name(kind)
    model_dir = Path(model_dir)
    try:
        config = read_config(model_dir)
        digest = model_digest(model_dir)
    except ModelFormatError as exc:
        raise InvalidInput(f"cannot register {model_dir}: {exc}") from None
    if config["kind"] != MODEL_KIND[kind]:
        raise InvalidInput(f"{model_dir} holds a {config['kind']} model, not a {MODEL_KIND[kind]}")
    for key, value in metrics.items():
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise InvalidInput(f"metric {key!r} must be a finite number, got {value!r}")
    for upstream, version in lineage.items():
        if upstream not in KINDS or not str(version).isdigit():
            raise InvalidInput(
                f"lineage entry {upstream}={version!r} is not <kind>=<version number>"
            )

    uri = tracking_uri or default_tracking_uri()
    client = get_client(uri)
    _ensure_registered(client, name)
    own_run = run_id is None
    if run_id is None:  # (not `own_run`: this narrows run_id to str below)
        run = client.create_run(_experiment_id(client, uri), run_name=f"register-{kind}")
        run_id = run.info.run_id
        for key, value in params.items():
            client.log_param(run_id, key, str(value)[:6000])
        for key, value in metrics.items():
            client.log_metric(run_id, key, float(value))
        client.set_tag(run_id, TAG_DATA_HASH, data_hash)
    else:
        run = client.get_run(run_id)
    try:
        client.log_artifacts(run_id, str(model_dir), ARTIFACT_PATH)
        tags = {
            TAG_KIND: kind,
            TAG_DATA_HASH: data_hash,
            TAG_GIT_COMMIT: git_commit(),
            TAG_CONFIG: json.dumps(config, sort_keys=True, separators=(",", ":")),
            TAG_DIGEST: digest,
            TAG_ARTIFACT_PATH: ARTIFACT_PATH,
            TAG_TRAINED_ON: trained_on(config),
            **{f"{METRIC_PREFIX}{k}": repr(float(v)) for k, v in metrics.items()},
            **{f"{LINEAGE_PREFIX}{k}": str(v) for k, v in lineage.items()},
        }
        mv = client.create_model_version(
            name,
            source=f"{run.info.artifact_uri}/{ARTIFACT_PATH}",
            run_id=run_id,
            tags=tags,
            description=description,
        )
    finally:
        if own_run:
            client.set_terminated(run_id)
    log.info("registered %s version %s (run %s, digest %s)", name, mv.version, run_id, digest[:12])
    return str(mv.version)


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    version: str
    """Registry version number, or `local-<digest[:12]>` for a plain directory."""
    local_dir: Path
    tags: dict[str, str] = field(default_factory=dict)
    uri: str = ""

    @property
    def kind(self) -> str:
        return kind_of(self.name)

    def metric(self, name: str) -> float | None:
        value = self.tags.get(f"{METRIC_PREFIX}{name}")
        return None if value is None else float(value)

    def lineage(self) -> dict[str, str]:
        return {
            k[len(LINEAGE_PREFIX) :]: v
            for k, v in self.tags.items()
            if k.startswith(LINEAGE_PREFIX)
        }


def get_version(
    name: str, version: str, *, client: MlflowClient | None = None, alias: str | None = None
) -> Any:
    """The MLflow `ModelVersion` for `name` at `version` (or at `alias`); ModelNotFound if absent."""
    from mlflow.exceptions import MlflowException

    client = client or get_client()
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        if _is_not_found(exc):
            what = f"alias {alias!r}" if alias is not None else f"version {version}"
            raise ModelNotFound(f"model {name!r} has no {what} in {client.tracking_uri}") from None
        raise


def parse_alias_uri(uri: str) -> tuple[str, str] | None:
    """`models:/NAME@ALIAS` -> (NAME, ALIAS); None for versions and directories."""
    m = _URI_ALIAS.match(uri)
    return (m["name"], m["alias"]) if m else None


def alias_version(name: str, alias: str = CHAMPION, *, tracking_uri: str | None = None) -> str:
    """The version `name@alias` points to now (one cheap registry call, for polling)."""
    return str(get_version(name, "", client=get_client(tracking_uri), alias=alias).version)


def default_cache_dir() -> Path:
    """`MARROWSCOPE_MODEL_CACHE`, else `~/.cache/marrowscope/models`."""
    env = os.environ.get("MARROWSCOPE_MODEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "marrowscope" / "models"


def _resolve_local(path: Path, uri: str) -> ResolvedModel:
    try:
        config = read_config(path)
        digest = model_digest(path)
    except ModelFormatError as exc:
        raise ModelNotFound(f"{uri} is not a loadable model directory: {exc}") from None
    tags = {
        TAG_DIGEST: digest,
        TAG_CONFIG: json.dumps(config, sort_keys=True, separators=(",", ":")),
    }
    return ResolvedModel(
        name=registered_name(kind_of(config["kind"])),
        version=f"local-{digest[:12]}",
        local_dir=path.resolve(),
        tags=tags,
        uri=uri,
    )


def _cache_entry_ok(path: Path, expected: str | None) -> bool:
    try:
        digest = model_digest(path)
    except ModelFormatError:
        return False
    return expected is None or digest == expected


def _download(mv: Any, tracking: str, cache_dir: Path) -> Path:
    """Artifacts of a version in `cache/<store hash>/<name>/<version>`, digest-checked."""
    import mlflow.artifacts

    store = hashlib.sha256(tracking.encode()).hexdigest()[:10]
    target: Path = cache_dir / store / mv.name / str(mv.version)
    expected = mv.tags.get(TAG_DIGEST)
    if target.is_dir():
        if _cache_entry_ok(target, expected):
            return target
        shutil.rmtree(target)  # incomplete or stale entry: download again
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".dl-") as tmp:
        local = mlflow.artifacts.download_artifacts(
            run_id=mv.run_id,
            artifact_path=mv.tags.get(TAG_ARTIFACT_PATH, ARTIFACT_PATH),
            dst_path=tmp,
            tracking_uri=tracking,
        )
        got = model_digest(local)
        if expected is not None and got != expected:
            raise ModelFormatError(
                f"{mv.name} version {mv.version}: downloaded digest {got[:12]} != registered {expected[:12]}"
            )
        try:
            os.replace(local, target)
        except OSError:
            if not target.is_dir():  # another process won the race with the same files
                raise
    return target


def resolve(
    uri: str,
    *,
    name: str | None = None,
    tracking_uri: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> ResolvedModel:
    """Resolve `models:/NAME@ALIAS`, `models:/NAME/VERSION`, a bare version (needs `name`)
    or a local model directory to files on disk. Raises ModelNotFound."""
    uri = str(uri).strip()
    if not uri.startswith("models:/"):
        if uri.isdigit():
            if not name:
                raise InvalidInput(f"bare version {uri!r} needs a model name")
            uri = f"models:/{name}/{uri}"
        else:
            path = Path(uri.removeprefix("file://")).expanduser()
            if not path.is_dir():
                raise ModelNotFound(
                    f"{uri!r} is neither a models:/ URI nor an existing model directory"
                )
            return _resolve_local(path, uri)
    tracking = tracking_uri or default_tracking_uri()
    client = get_client(tracking)
    if m := _URI_ALIAS.match(uri):
        mv = get_version(m["name"], "", client=client, alias=m["alias"])
    elif m := _URI_VERSION.match(uri):
        mv = get_version(m["name"], m["version"], client=client)
    else:
        raise InvalidInput(
            f"malformed model URI {uri!r}; use models:/NAME@ALIAS or models:/NAME/VERSION"
        )
    local = _download(mv, tracking, Path(cache_dir) if cache_dir else default_cache_dir())
    return ResolvedModel(
        name=mv.name, version=str(mv.version), local_dir=local, tags=dict(mv.tags), uri=uri
    )
