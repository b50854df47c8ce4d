"""Move the `champion` alias to new model versions after gates pass (aliases, never stages).

    python -m training.promote --model npm1 --version 7
    python -m training.promote --pipeline segmentation=3 celltype=5 ensemble=4 --dry-run

Gates, evaluated on every candidate before anything moves (a set is all or nothing):
- `exists`: the version is registered.
- `metrics`: `marrowscope.metric.<m>` tags present and >= the floors (`DEFAULT_FLOORS`,
  overridden with `--floor [kind.]metric=value`). Metrics of an output the version's
  config withholds (`withheld`, `marrowscope.provenance`: an ensemble's P(AML), an npm1
  model's P(NPM1); the real-data set has no labels to learn them) are not applicable, and
  the gateway never reports that output. An ensemble's `<target>_*` floors apply
  when its config `targets` include that genetic target (`marrowscope.targets`: npm1 =
  P(NPM1 | AML), apl = P(APL | AML)) and are skipped otherwise; the default `npm1_auroc`
  floor is 0.80 (the paper's CNN reached 0.92; a morphology call below 0.8 would mislead
  more than help), `apl_auroc` 0.75 (Eckardt 2022: 0.8575).
- `non_inferiority`: primary metric (`PRIMARY_METRIC`) >= champion's - `--margin`; for an
  ensemble also `<target>_auroc` of each genetic output, when the champion has it.
- `targets` (ensembles): the outputs of the champion and the candidate, shown in the table.
  Adding an output passes; dropping one the champion serves (npm1, apl) is refused unless
  `--allow-drop-target`, since the reports would silently lose that call.
- `feature_units` (ensembles): the unit its morphometric features were learned in (um or
  px, `marrowscope.models.config.feature_units`). A candidate whose unit differs from the
  champion's is refused unless `--allow-unit-change`: the gateway would start withholding
  P(AML) for every LIS request that follows the old convention (sending or omitting
  `um_per_px`). Unknown units (models from before they were recorded) pass, shown.
- `lineage`: the ensemble that will serve (candidate or current champion) was built on the
  segmentation and celltype versions that will serve with it (champions after promotion).
  For a MIL model (`mil`, P(APL | AML) from cell embeddings) or a celltype candidate: the
  MIL model that will serve was trained on the embeddings of the celltype version that
  will serve (its config's `celltype.version`); embeddings of another celltype model mean
  something else, so such a MIL model is refused.
- `nc_error`, `vs_classical` (nucseg, the learned nucleus/cytoplasm split): median |N:C
  error| `nc_abs_err` <= the ceiling (`NUCSEG_NC_ERROR_CEILING`, 0.10, overridable with
  `--floor nucseg.nc_abs_err=...`, read as a ceiling) and, in every domain it was measured
  on, nucleus Dice no worse than the classical split on the same cells (`margin`). Its
  `cell_dice` floor is 0.90 and the worst domain's, so a split that only works on one
  scanner is refused.
- `corrections` (celltype, only with `--corrections DIR`, off by default): on the reviewed
  cells of a corrections export (`python -m training.data.corrections export`) that neither
  the candidate nor the champion trained on (`corrections.json` beside each one's weights),
  the candidate's accuracy against the hematologists' labels >= the champion's - `--margin`,
  both re-run on the same crops (`training.evaluate_corrections.compare`). No such cells:
  refused, since the comparison that was asked for cannot be made.
- `config`: the config is valid for its kind; celltype outputs cover the taxonomy the case
  features need; ensemble `feature_names` equal `marrowscope.features.case_feature_names()`
  and only use cell types/attributes the serving celltype model outputs.
Each promotion tags the version (`marrowscope.promoted_by|promoted_at|previous_champion`),
appends a JSON line to the promotion log and records an MLflow run in `marrowscope-promotions`.
Exit codes: 0 promoted (or dry run passed), 1 refused, 2 usage error, 3 rollout failed.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from marrowscope import registry
from marrowscope.errors import ModelNotFound
from marrowscope.paths import PROJECT_ROOT
from marrowscope.stages import LINEAGE_UPSTREAMS, Stage
from marrowscope.targets import GENETIC_TARGETS, genetic_targets

log = logging.getLogger(__name__)

PRIMARY_METRIC = {
    Stage.SEGMENTATION: "map50",
    Stage.CELLTYPE: "macro_f1",
    Stage.ENSEMBLE: "auroc",
    Stage.NPM1: "auroc",
    Stage.NUCSEG: "cell_dice",
    Stage.MIL: "apl_auroc",
}
DEFAULT_FLOORS: dict[str, dict[str, float]] = {
    Stage.SEGMENTATION: {"map50": 0.5},
    Stage.CELLTYPE: {"macro_f1": 0.5},
    # plus `<target>_auroc` >= its floor for every genetic target (`default_floors`,
    # `marrowscope.targets`: npm1_auroc 0.80, apl_auroc 0.75), applied only to ensembles
    # that have that output
    Stage.ENSEMBLE: {"auroc": 0.75, **{f"{t.code}_auroc": t.floor for t in GENETIC_TARGETS}},
    Stage.NPM1: {"auroc": 0.65},
    Stage.NUCSEG: {"cell_dice": 0.90},
    # the ensemble's apl head floor (Eckardt 2022: 0.8575)
    Stage.MIL: {"apl_auroc": 0.75},
}
NUCSEG_NC_ERROR_CEILING = 0.10
"""Median |N:C error| a learned split may have (the classical split: 0.059 on wbc-seg,
0.37 on the other scanner's crowded cells)."""
NUCSEG_DOMAINS = ("wbcseg_cv", "synth")


def default_floors() -> dict[str, dict[str, float]]:
    """`DEFAULT_FLOORS` with the floor of every registered genetic target (read at call
    time, so a target added to `marrowscope.targets` is gated without touching this file)."""
    floors = {k: dict(v) for k, v in DEFAULT_FLOORS.items()}
    for t in genetic_targets():
        floors[Stage.ENSEMBLE].setdefault(f"{t.code}_auroc", t.floor)
    return floors


DEFAULT_MARGIN = 0.01
PROMOTIONS_EXPERIMENT = "marrowscope-promotions"


@dataclass(frozen=True)
class Decision:
    gate: str
    kind: str
    version: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class _Version:
    kind: str
    version: str
    tags: dict[str, str]

    @property
    def config(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.tags[registry.TAG_CONFIG])
        except (KeyError, json.JSONDecodeError):
            return None

    @property
    def targets(self) -> list[str]:
        """An ensemble's outputs (`aml`, then its genetic targets); [] for other kinds."""
        from marrowscope.models.config import ensemble_targets

        return ensemble_targets(self.config or {}) if self.kind == Stage.ENSEMBLE else []

    def metric(self, name: str) -> float | None:
        value = self.tags.get(f"{registry.METRIC_PREFIX}{name}")
        try:
            return None if value is None else float(value)
        except ValueError:
            return None


def _fetch(client: Any, kind: str, version: str | None = None) -> _Version | None:
    """A version, or the champion when `version` is None (None when there is no champion)."""
    name = registry.registered_name(kind)
    try:
        mv = registry.get_version(
            name, version or "", client=client, alias=None if version else registry.CHAMPION
        )
    except ModelNotFound:
        if version:
            raise
        return None
    return _Version(kind, str(mv.version), dict(mv.tags))


def _metric_target(c: _Version, metric: str) -> str | None:
    """The ensemble output a metric belongs to when it is not the AML one (`npm1_auroc` ->
    `npm1`), else None."""
    from marrowscope.targets import BY_CODE

    if c.kind != Stage.ENSEMBLE:
        return None
    return next((t for t in BY_CODE if metric.startswith(f"{t}_")), None)


def _withheld_output(c: _Version, metric: str) -> tuple[str, str] | None:
    """(output, why) when `metric` scores an output the version withholds (its config's
    `withheld`, `marrowscope.provenance`): an ensemble's P(AML) metrics (those of no genetic
    target), an npm1 model's metrics; None otherwise."""
    from marrowscope.provenance import withheld

    held = withheld(c.config or {})
    output = {Stage.ENSEMBLE: _metric_target(c, metric) or "aml", Stage.NPM1: "npm1"}.get(
        Stage(c.kind)
    )
    return (output, held[output]) if output in held else None


def _metrics_gate(c: _Version, floors: dict[str, float]) -> tuple[bool, str]:
    problems, seen = [], []
    for metric, floor in sorted(floors.items()):
        if c.kind == Stage.NUCSEG and metric == "nc_abs_err":
            continue  # a ceiling, checked by the nc_error gate
        if (held := _withheld_output(c, metric)) is not None:
            seen.append(f"{metric} not applicable ({held[0]} withheld: {held[1]})")
            continue
        target = _metric_target(c, metric)
        if target is not None and target not in c.targets:
            seen.append(f"{metric} not applicable (no {target} output)")
            continue
        value = c.metric(metric)
        if value is None:
            problems.append(f"{metric} missing")
        elif value < floor:
            problems.append(f"{metric}={value:.4g} < floor {floor:g}")
        else:
            seen.append(f"{metric}={value:.4g} >= {floor:g}")
    return (not problems, "; ".join(problems or seen) or "no floors configured")


def _non_inferiority_gate(
    c: _Version, champion: _Version | None, margin: float
) -> tuple[bool, str]:
    """The primary metric, and `<target>_auroc` of every further ensemble output."""
    if champion is None:
        return True, "no current champion"
    if champion.version == c.version:
        return True, f"v{c.version} is already the champion"
    results = [
        _compare(metric, c, champion, margin)
        for metric in (PRIMARY_METRIC[c.kind], *(f"{t}_auroc" for t in c.targets if t != "aml"))
    ]
    return all(ok for ok, _ in results), "; ".join(detail for _, detail in results)


def _compare(metric: str, c: _Version, champion: _Version, margin: float) -> tuple[bool, str]:
    if (held := _withheld_output(c, metric)) is not None:
        return True, f"{metric}: {held[0]} withheld by the candidate, nothing to compare"
    mine, theirs = c.metric(metric), champion.metric(metric)
    if mine is None:
        return False, f"{metric} missing on the candidate"
    if theirs is None:
        return True, f"champion v{champion.version} has no {metric}; nothing to compare"
    ok = mine >= theirs - margin
    sign = ">=" if ok else "<"
    return (
        ok,
        f"{metric} {mine:.4g} {sign} champion v{champion.version} {theirs:.4g} - margin {margin:g}",
    )


def _targets_gate(c: _Version, champion: _Version | None, allow_drop: bool) -> tuple[bool, str]:
    if champion is None or champion.version == c.version:
        return True, f"targets {c.targets}"
    theirs, mine = champion.targets, c.targets
    if theirs == mine:
        return True, f"targets {mine}, as champion v{champion.version}"
    added, dropped = [t for t in mine if t not in theirs], [t for t in theirs if t not in mine]
    change = (
        f"targets {theirs} (champion v{champion.version}) -> {mine}"
        + (f", adds {added}" if added else "")
        + (f", drops {dropped}" if dropped else "")
    )
    if dropped and not allow_drop:
        return False, f"{change}: reports would lose that call; pass --allow-drop-target to accept"
    return True, change + (" (--allow-drop-target)" if dropped else "")


def _units_gate(c: _Version, champion: _Version | None, allow_change: bool) -> tuple[bool, str]:
    from marrowscope.models.config import feature_units

    mine = feature_units(c.config or {})
    if champion is None or champion.version == c.version:
        return True, f"features in {mine['length']}"
    theirs = feature_units(champion.config or {})
    if "unknown" in (mine["length"], theirs["length"]) or mine["length"] == theirs["length"]:
        return (
            True,
            f"features in {mine['length']} (champion v{champion.version}: {theirs['length']})",
        )
    change = f"features in {theirs['length']} (champion v{champion.version}) -> {mine['length']}"
    if not allow_change:
        return False, (
            f"{change}: requests following the old pixel-size convention would have P(AML) "
            "withheld; pass --allow-unit-change once the LIS is changed"
        )
    return True, change + " (--allow-unit-change)"


def _nucseg_gates(
    c: _Version, floors: dict[str, float], margin: float
) -> list[tuple[str, tuple[bool, str]]]:
    """`nc_error`: median |N:C error| <= ceiling; `vs_classical`: nucleus Dice per domain
    >= the classical split's on the same cells - `margin` (the issue's "no worse")."""
    ceiling = floors.get("nc_abs_err", NUCSEG_NC_ERROR_CEILING)
    err = c.metric("nc_abs_err")
    if err is None:
        nc = (False, "nc_abs_err missing")
    else:
        nc = (err <= ceiling, f"nc_abs_err={err:.4g} {'<=' if err <= ceiling else '>'} {ceiling:g}")
    results = []
    for domain in NUCSEG_DOMAINS:
        mine = c.metric(f"{domain}_nucleus_dice")
        theirs = c.metric(f"classical_{domain}_nucleus_dice")
        if mine is None or theirs is None:
            continue
        ok = mine >= theirs - margin
        results.append(
            (ok, f"{domain} nucleus Dice {mine:.4g} {'>=' if ok else '<'} classical {theirs:.4g}")
        )
    if not results:
        vs = (False, "no per-domain nucleus Dice (learned and classical) recorded")
    else:
        vs = (all(ok for ok, _ in results), "; ".join(d for _, d in results) + f" - {margin:g}")
    return [("nc_error", nc), ("vs_classical", vs)]


def _mil_lineage(serving: dict[str, _Version | None]) -> tuple[bool, str]:
    """The MIL model that will serve learned the embeddings of the celltype that will."""
    mil, celltype = serving.get(Stage.MIL), serving[Stage.CELLTYPE]
    if mil is None:
        return True, "no MIL model serves"
    pinned = (mil.config or {}).get("celltype") or {}
    want = str(pinned.get("version", "")) if isinstance(pinned, dict) else ""
    if not want:
        return False, f"mil v{mil.version} records no celltype version (config celltype)"
    if celltype is None:
        return False, f"mil v{mil.version} needs celltype v{want}, but no celltype would serve"
    if celltype.version != want:
        return False, (
            f"mil v{mil.version} learned the embeddings of celltype v{want}, but celltype "
            f"v{celltype.version} would serve: its embeddings mean something else; retrain "
            "the MIL model on that celltype's embeddings (training.apl --save-mil) or promote "
            "a consistent set with --pipeline"
        )
    return True, f"mil v{mil.version} learned celltype v{want}'s embeddings"


def _lineage_gate(c: _Version, serving: dict[str, _Version | None]) -> tuple[bool, str]:
    if c.kind == Stage.MIL:
        return _mil_lineage(serving)
    if c.kind == Stage.CELLTYPE:
        ok, detail = _mil_lineage(serving)
        if not ok:
            return ok, detail
    ensemble = serving[Stage.ENSEMBLE]
    if c.kind in (Stage.NPM1, Stage.NUCSEG):
        return True, "no upstream models"
    if ensemble is None:
        return True, "no ensemble serves; nothing depends on upstream versions"
    lineage = {
        k[len(registry.LINEAGE_PREFIX) :]: v
        for k, v in ensemble.tags.items()
        if k.startswith(registry.LINEAGE_PREFIX)
    }
    problems = []
    for upstream in LINEAGE_UPSTREAMS:
        want, have = lineage.get(upstream), serving[upstream]
        if want is None:
            problems.append(f"ensemble v{ensemble.version} records no {upstream} lineage")
        elif have is None:
            problems.append(
                f"ensemble v{ensemble.version} needs {upstream} v{want}, but no {upstream} would serve"
            )
        elif have.version != want:
            problems.append(
                f"ensemble v{ensemble.version} was built on {upstream} v{want}, "
                f"but {upstream} v{have.version} would serve"
            )
    if problems:
        return False, "; ".join(problems) + " (promote a consistent set with --pipeline)"
    return True, (
        f"ensemble v{ensemble.version} built on segmentation v{lineage['segmentation']}, "
        f"celltype v{lineage['celltype']}"
    )


def _config_gate(c: _Version, serving: dict[str, _Version | None]) -> tuple[bool, str]:
    from marrowscope.models import ModelConfigError, validate_config
    from marrowscope.taxonomy import (
        ATTRIBUTE_CODES,
        COUNTED_CODES,
        NON_NUCLEATED_DETECTOR_LABELS,
    )

    config = c.config
    if config is None:
        return False, f"tag {registry.TAG_CONFIG} missing or not JSON"
    try:
        validate_config(config)
    except ModelConfigError as exc:
        return False, str(exc)
    if config["kind"] != registry.MODEL_KIND[c.kind]:
        return False, f"config kind {config['kind']!r} is not {registry.MODEL_KIND[c.kind]!r}"
    if c.kind == Stage.SEGMENTATION:
        # A detector only finds cells; the celltype model types them. It must find nucleated
        # cells (any class but red cells/platelets, e.g. `cell`, `WBC`, or taxonomy codes).
        classes = list(config["classes"])
        nucleated = [x for x in classes if x not in NON_NUCLEATED_DETECTOR_LABELS]
        if len(set(classes)) != len(classes) or not nucleated:
            return False, f"classes {classes} must be unique and include a nucleated-cell class"
        return True, f"{len(classes)} classes, nucleated: {nucleated}"
    if c.kind == Stage.CELLTYPE:
        missing = [x for x in (*COUNTED_CODES, *ATTRIBUTE_CODES) if x not in config["outputs"]]
        if missing:
            return False, f"outputs lack {missing} needed by the case features"
        return True, f"{len(config['outputs'])} outputs, crop {config['crop_size']} px"
    if c.kind == Stage.ENSEMBLE:
        names = list(config["feature_names"])
        try:
            from marrowscope.features import case_feature_names
        except ImportError:
            log.warning("marrowscope.features is absent; feature-name check skipped")
        else:
            expected = list(case_feature_names())
            if names != expected:
                missing = sorted(set(expected) - set(names))[:5]
                extra = sorted(set(names) - set(expected))[:5]
                return False, (
                    f"feature_names differ from case_feature_names() "
                    f"(missing {missing}, unexpected {extra}, or order)"
                )
        celltype = serving[Stage.CELLTYPE]
        outputs = (celltype.config or {}).get("outputs") if celltype else None
        if outputs is not None:
            needed = [
                n.removeprefix("frac_attr_")
                if n.startswith("frac_attr_")
                else n.removeprefix("frac_")
                for n in names
                if n.startswith("frac_")
            ]
            lacking = sorted({x for x in needed if x not in outputs})
            if lacking:
                return (
                    False,
                    f"features use {lacking}, which celltype v{celltype.version} does not output",
                )
        return True, f"{len(names)} features match"
    if c.kind == Stage.NUCSEG:
        source = config.get("nucleus_source", "learned")
        return True, f"input {config['input_size']}, nucleus {source}"
    if c.kind == Stage.MIL:
        name = config["celltype"]["name"]
        if name != Stage.CELLTYPE.registered_name:
            return False, (
                f"celltype {name!r} is not the served celltype model "
                f"{Stage.CELLTYPE.registered_name!r}"
            )
        return (
            True,
            f"{config['embedding_dim']}-d embeddings of {name} v{config['celltype']['version']}",
        )
    return True, f"input {config['input_size']}"


def _corrections_gate(
    c: _Version, champion: _Version | None, export_dir: Path, margin: float, tracking_uri: str
) -> tuple[bool, str]:
    from training.evaluate_corrections import compare, load_typer

    if champion is None:
        return True, "no current champion"
    if champion.version == c.version:
        return True, f"v{c.version} is already the champion"
    name = registry.registered_name(c.kind)
    found = compare(
        export_dir,
        load_typer(f"models:/{name}/{c.version}", tracking_uri=tracking_uri),
        load_typer(f"models:/{name}/{champion.version}", tracking_uri=tracking_uri),
    )
    cand, champ = found["candidate"], found["champion"]
    if not cand["cells"]:
        return False, (
            f"no corrected cells in {export_dir} that neither v{c.version} nor the champion "
            f"v{champion.version} trained on: export newer cases"
        )
    ok = cand["accuracy"] >= champ["accuracy"] - margin
    return ok, (
        f"accuracy on {cand['cells']} held-out corrected cells of "
        f"{found['held_out_analyses']} cases: {cand['accuracy']:.4g} "
        f"{'>=' if ok else '<'} champion v{champion.version} {champ['accuracy']:.4g} - {margin:g}"
    )


def evaluate(
    candidates: dict[str, str],
    *,
    client: Any,
    floors: dict[str, dict[str, float]],
    margin: float,
    allow_drop_target: bool = False,
    allow_unit_change: bool = False,
    corrections: Path | None = None,
    tracking_uri: str | None = None,
) -> list[Decision]:
    """Every gate for every candidate (`kind -> version`), nothing changed."""
    decisions: list[Decision] = []
    found: dict[str, _Version] = {}
    for kind, version in candidates.items():
        try:
            found[kind] = _fetch(client, kind, version)
            decisions.append(Decision("exists", kind, version, True, "registered"))
        except ModelNotFound as exc:
            decisions.append(Decision("exists", kind, version, False, str(exc)))
    champions = {kind: _fetch(client, kind) for kind in registry.KINDS}
    serving = {**champions, **found}
    for kind, c in found.items():
        for gate, (ok, detail) in (
            ("metrics", _metrics_gate(c, floors.get(kind, {}))),
            ("non_inferiority", _non_inferiority_gate(c, champions[kind], margin)),
            ("lineage", _lineage_gate(c, serving)),
            ("config", _config_gate(c, serving)),
        ):
            decisions.append(Decision(gate, kind, c.version, ok, detail))
        if kind == Stage.CELLTYPE and corrections is not None:
            ok, detail = _corrections_gate(
                c,
                champions[kind],
                corrections,
                margin,
                tracking_uri or registry.default_tracking_uri(),
            )
            decisions.append(Decision("corrections", kind, c.version, ok, detail))
        if kind == Stage.NUCSEG:
            for gate, (ok, detail) in _nucseg_gates(c, floors.get(kind, {}), margin):
                decisions.append(Decision(gate, kind, c.version, ok, detail))
        if kind == Stage.ENSEMBLE:
            ok, detail = _targets_gate(c, champions[kind], allow_drop_target)
            decisions.append(Decision("targets", kind, c.version, ok, detail))
            ok, detail = _units_gate(c, champions[kind], allow_unit_change)
            decisions.append(Decision("feature_units", kind, c.version, ok, detail))
    return decisions


def default_log_file(tracking_uri: str) -> Path:
    """`MARROWSCOPE_PROMOTION_LOG`, else next to a SQLite store, else `<project>/runs/`."""
    if env := os.environ.get("MARROWSCOPE_PROMOTION_LOG"):
        return Path(env)
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri.removeprefix("sqlite:///")).parent / "promotions.jsonl"
    return PROJECT_ROOT / "runs" / "promotions.jsonl"


def _move_aliases(
    client: Any, moves: dict[str, tuple[str, str | None]], actor: str, at: str
) -> None:
    """Set `champion` for every kind; on failure put back those already moved, then raise."""
    done: list[str] = []
    try:
        for kind, (version, previous) in moves.items():
            name = registry.registered_name(kind)
            client.set_registered_model_alias(name, registry.CHAMPION, version)
            done.append(kind)
            for key, value in (
                ("promoted_by", actor),
                ("promoted_at", at),
                ("previous_champion", previous or "none"),
            ):
                client.set_model_version_tag(name, version, f"marrowscope.{key}", value)
    except Exception:
        for kind in done:
            name, previous = registry.registered_name(kind), moves[kind][1]
            if previous is None:
                client.delete_registered_model_alias(name, registry.CHAMPION)
            else:
                client.set_registered_model_alias(name, registry.CHAMPION, previous)
        log.error("promotion failed part-way; champion aliases restored for %s", done)
        raise


def _record(client: Any, tracking_uri: str, record: dict[str, Any], log_file: Path) -> None:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
    exp = client.get_experiment_by_name(PROMOTIONS_EXPERIMENT)
    exp_id = (
        exp.experiment_id
        if exp
        else client.create_experiment(
            PROMOTIONS_EXPERIMENT, artifact_location=registry.local_artifact_location(tracking_uri)
        )
    )
    run = client.create_run(
        exp_id,
        run_name=f"{record['outcome']}-{record['at']}",
        tags={
            "marrowscope.promotion.outcome": record["outcome"],
            "marrowscope.promotion.by": record["by"],
        },
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "promotion.json"
        path.write_text(json.dumps(record, indent=2, sort_keys=True))
        client.log_artifact(run.info.run_id, str(path))
    client.set_terminated(run.info.run_id)


def promote(
    candidates: dict[str, str],
    *,
    tracking_uri: str | None = None,
    floors: dict[str, dict[str, float]] | None = None,
    margin: float = DEFAULT_MARGIN,
    dry_run: bool = False,
    actor: str | None = None,
    log_file: Path | None = None,
    allow_drop_target: bool = False,
    allow_unit_change: bool = False,
    corrections: Path | None = None,
) -> tuple[bool, list[Decision]]:
    """Evaluate the gates and, when all pass and not `dry_run`, move every alias together.

    Returns (promoted-or-would-promote, decisions). Refusals and promotions are recorded;
    a dry run records nothing.
    """
    uri = tracking_uri or registry.default_tracking_uri()
    client = registry.get_client(uri)
    decisions = evaluate(
        candidates,
        client=client,
        floors=default_floors() if floors is None else floors,
        margin=margin,
        allow_drop_target=allow_drop_target,
        allow_unit_change=allow_unit_change,
        corrections=corrections,
        tracking_uri=uri,
    )
    ok = all(d.passed for d in decisions)
    if dry_run:
        return ok, decisions
    actor = actor or getpass.getuser()
    at = datetime.now(UTC).isoformat(timespec="seconds")
    moves: dict[str, tuple[str, str | None]] = {}
    if ok:
        for kind, version in candidates.items():
            champion = _fetch(client, kind)
            if champion is None or champion.version != version:
                moves[kind] = (version, champion.version if champion else None)
        _move_aliases(client, moves, actor, at)
    record = {
        "at": at,
        "by": actor,
        "tracking_uri": uri,
        "outcome": "promoted" if ok else "refused",
        "candidates": candidates,
        "allow_drop_target": allow_drop_target,
        "allow_unit_change": allow_unit_change,
        "corrections": None if corrections is None else str(corrections),
        "moved": {k: {"version": v, "previous": p} for k, (v, p) in moves.items()},
        "decisions": [asdict(d) for d in decisions],
    }
    _record(client, uri, record, log_file or default_log_file(uri))
    return ok, decisions


def _parse_pairs(pairs: list[str], what: str) -> list[tuple[str, str]]:
    out = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"{what} {pair!r} is not KEY=VALUE")
        out.append((key.strip(), value.strip()))
    return out


def _floors(pairs: list[str], kinds: list[str]) -> dict[str, dict[str, float]]:
    floors = default_floors()
    for key, value in _parse_pairs(pairs, "--floor"):
        kind, dot, metric = key.rpartition(".")
        targets = [kind] if dot else kinds
        if dot and kind not in registry.KINDS:
            raise ValueError(f"--floor {key}: unknown kind {kind!r}")
        for k in targets:
            floors[k][metric] = float(value)
    return floors


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Move the champion alias after promotion gates pass.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", choices=registry.KINDS, help="promote one model kind")
    what.add_argument(
        "--pipeline",
        nargs="+",
        metavar="KIND=VERSION",
        help="promote a consistent set together (all or nothing)",
    )
    p.add_argument("--version", help="registry version for --model")
    p.add_argument(
        "--floor",
        action="append",
        default=[],
        metavar="[KIND.]METRIC=VALUE",
        help="metric floor (adds to/overrides the per-kind defaults)",
    )
    p.add_argument(
        "--margin",
        type=float,
        default=DEFAULT_MARGIN,
        help="non-inferiority margin on the primary metric (default %(default)s)",
    )
    p.add_argument(
        "--allow-drop-target",
        action="store_true",
        help="accept an ensemble without an output its champion has (e.g. npm1, apl)",
    )
    p.add_argument(
        "--allow-unit-change",
        action="store_true",
        help="accept an ensemble whose morphometric feature unit (um/px) differs from its champion's",
    )
    p.add_argument(
        "--corrections",
        type=Path,
        default=None,
        metavar="DIR",
        help="celltype: also require accuracy no worse than the champion's (- --margin) on "
        "the reviewed cells of this corrections export that neither trained on (off by default)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the decision table, change nothing"
    )
    p.add_argument(
        "--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI or the local store"
    )
    p.add_argument("--actor", default=None, help="recorded as promoted_by (default: login name)")
    p.add_argument("--log-file", type=Path, default=None, help="append-only JSONL promotion log")
    p.add_argument(
        "--rollout",
        choices=("none", "k8s"),
        default="none",
        help="k8s: pin the promoted versions on the model-service Deployments",
    )
    p.add_argument(
        "--namespace", default="marrowscope", help="Kubernetes namespace for --rollout k8s"
    )
    return p


def _print_table(decisions: list[Decision]) -> None:
    rows = [("gate", "kind", "version", "passed", "detail")]
    rows += [(d.gate, d.kind, d.version, "yes" if d.passed else "NO", d.detail) for d in decisions]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4])


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.model:
            if not args.version:
                raise ValueError("--model needs --version")
            candidates = {args.model: args.version}
        else:
            if args.version:
                raise ValueError("--version goes with --model, not --pipeline")
            candidates = {}
            for kind, version in _parse_pairs(args.pipeline, "--pipeline"):
                if kind not in registry.KINDS or kind in candidates:
                    raise ValueError(f"--pipeline: unknown or repeated kind {kind!r}")
                candidates[kind] = version
        for kind, version in candidates.items():
            if not version.isdigit():
                raise ValueError(f"{kind} version {version!r} is not a version number")
        floors = _floors(args.floor, list(candidates))
        if args.margin < 0:
            raise ValueError("--margin must be >= 0")
        if args.corrections is not None:
            from training.data.corrections import read_manifest

            read_manifest(args.corrections)  # not an export: a usage error, before any gate
        rollout = None
        if args.rollout == "k8s":
            try:
                from training.rollout import rollout_model_services as rollout
            except ImportError as exc:
                raise ValueError(f"--rollout k8s needs training/rollout.py ({exc})") from None
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    ok, decisions = promote(
        candidates,
        tracking_uri=args.tracking_uri,
        floors=floors,
        margin=args.margin,
        dry_run=args.dry_run,
        actor=args.actor,
        log_file=args.log_file,
        allow_drop_target=args.allow_drop_target,
        allow_unit_change=args.allow_unit_change,
        corrections=args.corrections,
    )
    _print_table(decisions)
    if not ok:
        for d in decisions:
            if not d.passed:
                print(
                    f"refused: gate '{d.gate}' failed for {d.kind} v{d.version}: {d.detail}",
                    file=sys.stderr,
                )
        return 1
    verb = "would promote" if args.dry_run else "promoted"
    print(f"{verb}: " + ", ".join(f"{k} v{v}" for k, v in candidates.items()))
    if rollout is not None:
        try:
            results = rollout(candidates, namespace=args.namespace, dry_run=args.dry_run)
        except Exception as exc:  # aliases moved already; report, the services also poll
            print(f"rollout failed (champion alias already moved): {exc}", file=sys.stderr)
            return 3
        for r in results:
            print(f"rollout {r.service}: {r.status} {r.model_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
