"""Promotion gates against a real `mlflow server` (metrics are synthetic tag values)."""

from __future__ import annotations

import json

import pytest

from marrowscope.registry import (
    CHAMPION,
    alias_version,
    get_client,
    register_model_dir,
    registered_name,
)
from tests import fixtures_mlflow
from tests.fixtures_mlflow import make_tiny_model_dir
from training.promote import get_args_parser, main, promote

mlflow_server = fixtures_mlflow.mlflow_server  # the session's real server (fixture)

GOOD = {
    "segmentation": {"map50": 0.9},
    "celltype": {"macro_f1": 0.9},
    "ensemble": {"auroc": 0.9},
    "npm1": {"auroc": 0.9},
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {kind: make_tiny_model_dir(kind, root / kind) for kind in GOOD}


@pytest.fixture(scope="module")
def reg(mlflow_server, model_dirs):
    def register(
        kind: str, metrics: dict | None = None, lineage: dict | None = None, model_dir=None
    ) -> str:
        return register_model_dir(
            kind,
            model_dir or model_dirs[kind],
            metrics=GOOD[kind] if metrics is None else metrics,
            params={},
            data_hash="synthetic",
            lineage=lineage or {},
            tracking_uri=mlflow_server,
        )

    return register


@pytest.fixture(scope="module")
def good_set(mlflow_server, reg, tmp_path_factory):
    """A consistent champion set with primary metrics 0.9 (any later good set equals it)."""
    seg, cel = reg("segmentation"), reg("celltype")
    versions = {
        "segmentation": seg,
        "celltype": cel,
        "ensemble": reg("ensemble", lineage={"segmentation": seg, "celltype": cel}),
        "npm1": reg("npm1"),
    }
    log_file = tmp_path_factory.mktemp("log") / "promotions.jsonl"
    ok, decisions = promote(versions, tracking_uri=mlflow_server, actor="tester", log_file=log_file)
    assert ok, [d for d in decisions if not d.passed]
    return versions, log_file


def champions(uri: str) -> dict[str, str]:
    return {k: alias_version(registered_name(k), CHAMPION, tracking_uri=uri) for k in GOOD}


def cli(uri: str, *argv: str, log_file=None) -> int:
    extra = ["--log-file", str(log_file)] if log_file else []
    return main(
        get_args_parser().parse_args([*argv, "--tracking-uri", uri, "--actor", "tester", *extra])
    )


def test_good_set_promoted_together_and_recorded(mlflow_server, good_set):
    versions, log_file = good_set
    assert champions(mlflow_server) == versions
    client = get_client(mlflow_server)
    tags = client.get_model_version("marrowscope-ensemble", versions["ensemble"]).tags
    assert tags["marrowscope.promoted_by"] == "tester"
    assert tags["marrowscope.promoted_at"].startswith("20")
    assert "marrowscope.previous_champion" in tags
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert records[-1]["outcome"] == "promoted"
    assert {k: v["version"] for k, v in records[-1]["moved"].items()} == versions
    exp = client.get_experiment_by_name("marrowscope-promotions")
    assert exp is not None and client.search_runs([exp.experiment_id])


def test_dry_run_changes_nothing(mlflow_server, good_set, reg, tmp_path, capsys):
    before = champions(mlflow_server)
    better = reg("npm1", {"auroc": 0.95})
    log_file = tmp_path / "p.jsonl"
    assert (
        cli(mlflow_server, "--model", "npm1", "--version", better, "--dry-run", log_file=log_file)
        == 0
    )
    out = capsys.readouterr().out
    assert "non_inferiority" in out and "would promote: npm1 v" + better in out
    assert champions(mlflow_server) == before
    assert not log_file.exists()


def test_worse_model_is_refused_by_non_inferiority(mlflow_server, good_set, reg, tmp_path, capsys):
    before = champions(mlflow_server)
    worse = reg("npm1", {"auroc": 0.8})  # above the 0.65 floor, below 0.9 - 0.01
    log_file = tmp_path / "p.jsonl"
    assert cli(mlflow_server, "--model", "npm1", "--version", worse, log_file=log_file) == 1
    err = capsys.readouterr().err
    assert f"gate 'non_inferiority' failed for npm1 v{worse}" in err
    assert champions(mlflow_server) == before
    assert json.loads(log_file.read_text().splitlines()[-1])["outcome"] == "refused"
    # within the margin it passes
    assert (
        cli(mlflow_server, "--model", "npm1", "--version", worse, "--margin", "0.2", "--dry-run")
        == 0
    )


def test_lineage_is_checked_against_what_will_serve(mlflow_server, good_set, reg, tmp_path, capsys):
    current = champions(mlflow_server)
    seg2 = reg("segmentation")
    log_file = tmp_path / "p.jsonl"
    # A new detector alone would leave the ensemble on features from the old one.
    assert cli(mlflow_server, "--model", "segmentation", "--version", seg2, log_file=log_file) == 1
    err = capsys.readouterr().err
    assert "gate 'lineage' failed for segmentation" in err
    assert f"built on segmentation v{current['segmentation']}" in err
    # An ensemble built on a celltype version that is not (and will not be) champion.
    stray = reg("ensemble", lineage={"segmentation": current["segmentation"], "celltype": "999"})
    assert cli(mlflow_server, "--model", "ensemble", "--version", stray, log_file=log_file) == 1
    assert "gate 'lineage' failed for ensemble" in capsys.readouterr().err
    # Promoted together with a matching ensemble, the new detector is fine.
    ens2 = reg("ensemble", lineage={"segmentation": seg2, "celltype": current["celltype"]})
    assert (
        cli(
            mlflow_server,
            "--pipeline",
            f"segmentation={seg2}",
            f"ensemble={ens2}",
            log_file=log_file,
        )
        == 0
    )
    assert champions(mlflow_server) == {**current, "segmentation": seg2, "ensemble": ens2}


def test_set_is_all_or_nothing(mlflow_server, good_set, reg, tmp_path, capsys):
    current = champions(mlflow_server)
    seg, cel = reg("segmentation"), reg("celltype", {"macro_f1": 0.3})  # below the floor
    ens = reg("ensemble", lineage={"segmentation": seg, "celltype": cel})
    code = cli(
        mlflow_server,
        "--pipeline",
        f"segmentation={seg}",
        f"celltype={cel}",
        f"ensemble={ens}",
        log_file=tmp_path / "p.jsonl",
    )
    assert code == 1
    assert (
        f"gate 'metrics' failed for celltype v{cel}: macro_f1=0.3 < floor 0.5"
        in capsys.readouterr().err
    )
    assert champions(mlflow_server) == current


def test_floors_missing_metrics_and_flags(mlflow_server, good_set, reg, tmp_path, capsys):
    no_metric = reg("npm1", {})
    assert cli(mlflow_server, "--model", "npm1", "--version", no_metric, "--dry-run") == 1
    assert "gate 'metrics' failed for npm1" in capsys.readouterr().err
    fine = reg("npm1", {"auroc": 0.95})
    assert (
        cli(
            mlflow_server,
            "--model",
            "npm1",
            "--version",
            fine,
            "--floor",
            "npm1.auroc=0.99",
            "--dry-run",
        )
        == 1
    )
    assert "auroc=0.95 < floor 0.99" in capsys.readouterr().err
    assert cli(mlflow_server, "--model", "npm1", "--version", "9999", "--dry-run") == 1
    assert "gate 'exists' failed" in capsys.readouterr().err


def test_config_gate(mlflow_server, good_set, reg, tmp_path, capsys):
    current = champions(mlflow_server)
    odd = make_tiny_model_dir(
        "ensemble", tmp_path / "odd", feature_names=["frac_BLA", "n_cells_log"]
    )
    bad_ens = reg(
        "ensemble",
        lineage={"segmentation": current["segmentation"], "celltype": current["celltype"]},
        model_dir=odd,
    )
    assert cli(mlflow_server, "--model", "ensemble", "--version", bad_ens, "--dry-run") == 1
    assert "gate 'config' failed for ensemble" in capsys.readouterr().err
    narrow = make_tiny_model_dir("celltype", tmp_path / "narrow", outputs=["BLA", "LYT"])
    bad_cel = reg("celltype", model_dir=narrow)
    assert cli(mlflow_server, "--model", "celltype", "--version", bad_cel, "--dry-run") == 1
    assert "outputs lack" in capsys.readouterr().err


def test_usage_errors(mlflow_server, capsys):
    assert cli(mlflow_server, "--model", "npm1") == 2
    assert cli(mlflow_server, "--pipeline", "npm1") == 2
    assert cli(mlflow_server, "--pipeline", "detector=3") == 2
    assert cli(mlflow_server, "--model", "npm1", "--version", "v3") == 2
    assert "error:" in capsys.readouterr().err


def test_rollout_is_called_with_promoted_versions(
    mlflow_server, good_set, reg, monkeypatch, capsys
):
    import training.rollout

    calls = []

    def fake_rollout(versions, *, namespace, dry_run):
        calls.append((versions, namespace, dry_run))
        return []

    monkeypatch.setattr(training.rollout, "rollout_model_services", fake_rollout)
    fine = reg("npm1", {"auroc": 0.95})
    assert (
        cli(
            mlflow_server,
            "--model",
            "npm1",
            "--version",
            fine,
            "--dry-run",
            "--rollout",
            "k8s",
            "--namespace",
            "ms-test",
        )
        == 0
    )
    assert calls == [({"npm1": fine}, "ms-test", True)]
    worse = reg("npm1", {"auroc": 0.1})
    assert (
        cli(mlflow_server, "--model", "npm1", "--version", worse, "--dry-run", "--rollout", "k8s")
        == 1
    )
    assert len(calls) == 1  # a refusal never rolls out


def test_config_gate_accepts_cell_detectors_and_refuses_ones_without_nucleated_class():
    import json

    from marrowscope.models import make_config
    from training.promote import _config_gate, _Version

    def version(classes):
        config = make_config(
            "detector",
            "fasterrcnn_mobilenet_v3_large_fpn",
            classes=classes,
            min_size=240,
            max_size=320,
        )
        return _Version("segmentation", "1", {"marrowscope.config": json.dumps(config)})

    for ok_classes in (["cell", "RBC"], ["WBC", "RBC", "Platelets"]):
        assert _config_gate(version(ok_classes), {})[0], ok_classes
    passed, detail = _config_gate(version(["RBC", "Platelets"]), {})
    assert not passed and "nucleated" in detail


def test_ensemble_npm1_output_is_gated_and_cannot_be_dropped_silently(
    mlflow_server, good_set, reg, tmp_path, capsys
):
    """npm1_auroc floor (default 0.80) and non-inferiority for ensembles with the npm1 output;
    an AML-only ensemble may not replace one with it unless --allow-drop-target."""
    from training.promote import DEFAULT_FLOORS

    assert DEFAULT_FLOORS["ensemble"]["npm1_auroc"] == 0.80
    current = champions(mlflow_server)
    lineage = {"segmentation": current["segmentation"], "celltype": current["celltype"]}
    two = make_tiny_model_dir("ensemble", tmp_path / "two", targets=["aml", "npm1"])
    low = reg("ensemble", {"auroc": 0.9, "npm1_auroc": 0.7}, lineage=lineage, model_dir=two)
    assert cli(mlflow_server, "--model", "ensemble", "--version", low, "--dry-run") == 1
    captured = capsys.readouterr()
    assert f"gate 'metrics' failed for ensemble v{low}: npm1_auroc=0.7 < floor 0.8" in captured.err
    assert "adds ['npm1']" in captured.out  # the targets row of the table
    missing = reg("ensemble", {"auroc": 0.9}, lineage=lineage, model_dir=two)
    assert cli(mlflow_server, "--model", "ensemble", "--version", missing, "--dry-run") == 1
    assert "npm1_auroc missing" in capsys.readouterr().err
    # the AML-only champion has no npm1_auroc: floor and AML non-inferiority decide
    good = reg("ensemble", {"auroc": 0.9, "npm1_auroc": 0.9}, lineage=lineage, model_dir=two)
    ok, decisions = promote({"ensemble": good}, tracking_uri=mlflow_server, dry_run=True)
    assert ok, [d for d in decisions if not d.passed]
    by_gate = {d.gate: d.detail for d in decisions}
    assert "npm1_auroc=0.9 >= 0.8" in by_gate["metrics"]
    assert "has no npm1_auroc; nothing to compare" in by_gate["non_inferiority"]
    assert by_gate["targets"].endswith("-> ['aml', 'npm1'], adds ['npm1']")
    # an AML-only candidate is not held to the npm1 floor
    aml_only = reg("ensemble", {"auroc": 0.9}, lineage=lineage)
    ok, decisions = promote({"ensemble": aml_only}, tracking_uri=mlflow_server, dry_run=True)
    assert ok and "npm1_auroc not applicable" in {d.gate: d.detail for d in decisions}["metrics"]

    log_file = tmp_path / "p.jsonl"
    try:
        assert cli(mlflow_server, "--model", "ensemble", "--version", good, log_file=log_file) == 0
        capsys.readouterr()
        # above the floor but worse than the champion's NPM1 head
        worse = reg("ensemble", {"auroc": 0.9, "npm1_auroc": 0.85}, lineage=lineage, model_dir=two)
        assert cli(mlflow_server, "--model", "ensemble", "--version", worse, "--dry-run") == 1
        assert (
            f"gate 'non_inferiority' failed for ensemble v{worse}: auroc 0.9 >= champion v{good} 0.9 - "
            f"margin 0.01; npm1_auroc 0.85 < champion v{good} 0.9"
        ) in capsys.readouterr().err
        # dropping the npm1 output: refused, shown, and accepted only on request
        assert (
            cli(mlflow_server, "--model", "ensemble", "--version", aml_only, log_file=log_file) == 1
        )
        err = capsys.readouterr().err
        assert f"gate 'targets' failed for ensemble v{aml_only}" in err and "drops ['npm1']" in err
        assert "--allow-drop-target" in err
        assert champions(mlflow_server)["ensemble"] == good
        assert (
            cli(
                mlflow_server,
                "--model",
                "ensemble",
                "--version",
                aml_only,
                "--allow-drop-target",
                "--dry-run",
            )
            == 0
        )
        assert "drops ['npm1'] (--allow-drop-target)" in capsys.readouterr().out
    finally:  # later tests expect the AML-only champion set
        get_client(mlflow_server).set_registered_model_alias(
            registered_name("ensemble"), CHAMPION, current["ensemble"]
        )


def test_ensemble_apl_output_is_gated_like_npm1(mlflow_server, good_set, reg, tmp_path, capsys):
    """apl_auroc: its own floor (0.75), non-inferiority against a champion with the apl
    output, and no silent drop of it (a champion serving npm1 + apl, a candidate npm1 only)."""
    current = champions(mlflow_server)
    lineage = {"segmentation": current["segmentation"], "celltype": current["celltype"]}
    three = make_tiny_model_dir("ensemble", tmp_path / "three", targets=["aml", "npm1", "apl"])
    two = make_tiny_model_dir("ensemble", tmp_path / "two", targets=["aml", "npm1"])
    scores = {"auroc": 0.9, "npm1_auroc": 0.9}
    low = reg("ensemble", {**scores, "apl_auroc": 0.7}, lineage=lineage, model_dir=three)
    assert cli(mlflow_server, "--model", "ensemble", "--version", low, "--dry-run") == 1
    err = capsys.readouterr().err
    assert f"gate 'metrics' failed for ensemble v{low}: apl_auroc=0.7 < floor 0.75" in err
    missing = reg("ensemble", scores, lineage=lineage, model_dir=three)
    assert cli(mlflow_server, "--model", "ensemble", "--version", missing, "--dry-run") == 1
    assert "apl_auroc missing" in capsys.readouterr().err
    # a candidate without the apl output is not held to its floor
    npm1_only = reg("ensemble", scores, lineage=lineage, model_dir=two)
    ok, decisions = promote({"ensemble": npm1_only}, tracking_uri=mlflow_server, dry_run=True)
    assert ok and "apl_auroc not applicable" in {d.gate: d.detail for d in decisions}["metrics"]

    good = reg("ensemble", {**scores, "apl_auroc": 0.86}, lineage=lineage, model_dir=three)
    log_file = tmp_path / "p.jsonl"
    try:
        assert cli(mlflow_server, "--model", "ensemble", "--version", good, log_file=log_file) == 0
        capsys.readouterr()
        worse = reg("ensemble", {**scores, "apl_auroc": 0.8}, lineage=lineage, model_dir=three)
        assert cli(mlflow_server, "--model", "ensemble", "--version", worse, "--dry-run") == 1
        assert f"apl_auroc 0.8 < champion v{good} 0.86" in capsys.readouterr().err
        assert cli(mlflow_server, "--model", "ensemble", "--version", npm1_only) == 1
        err = capsys.readouterr().err
        assert f"gate 'targets' failed for ensemble v{npm1_only}" in err and "drops ['apl']" in err
        assert champions(mlflow_server)["ensemble"] == good
    finally:  # later tests expect the AML-only champion set
        get_client(mlflow_server).set_registered_model_alias(
            registered_name("ensemble"), CHAMPION, current["ensemble"]
        )


def test_ensemble_feature_unit_change_is_refused_unless_allowed(
    mlflow_server, good_set, reg, tmp_path, capsys
):
    """An um-trained champion replaced by a px-trained ensemble would make the gateway
    withhold P(AML) for every request that sends um_per_px: refused unless asked for."""
    from marrowscope.models import units_from_pixel_sizes

    current = champions(mlflow_server)
    lineage = {"segmentation": current["segmentation"], "celltype": current["celltype"]}
    metrics = {"auroc": 0.95, "npm1_auroc": 0.95}
    um = reg(
        "ensemble",
        metrics,
        lineage=lineage,
        model_dir=make_tiny_model_dir(
            "ensemble",
            tmp_path / "um",
            targets=["aml", "npm1"],
            feature_units=units_from_pixel_sizes([0.27]),
        ),
    )
    px = reg(
        "ensemble",
        metrics,
        lineage=lineage,
        model_dir=make_tiny_model_dir(
            "ensemble",
            tmp_path / "px",
            targets=["aml", "npm1"],
            feature_units=units_from_pixel_sizes([None]),
        ),
    )
    try:
        # from a champion of unknown units: shown, not refused
        ok, decisions = promote(
            {"ensemble": um}, tracking_uri=mlflow_server, log_file=tmp_path / "p.jsonl"
        )
        assert ok, [d for d in decisions if not d.passed]
        assert "features in um" in {d.gate: d.detail for d in decisions}["feature_units"]
        assert cli(mlflow_server, "--model", "ensemble", "--version", px, "--dry-run") == 1
        err = capsys.readouterr().err
        assert (
            f"gate 'feature_units' failed for ensemble v{px}: features in um (champion v{um}) -> px"
            in err
        )
        assert "--allow-unit-change" in err
        assert (
            cli(
                mlflow_server,
                "--model",
                "ensemble",
                "--version",
                px,
                "--allow-unit-change",
                "--dry-run",
            )
            == 0
        )
        assert "-> px (--allow-unit-change)" in capsys.readouterr().out
        same = reg("ensemble", metrics, lineage=lineage, model_dir=tmp_path / "um")
        ok, decisions = promote({"ensemble": same}, tracking_uri=mlflow_server, dry_run=True)
        assert (
            ok
            and "features in um (champion" in {d.gate: d.detail for d in decisions}["feature_units"]
        )
    finally:  # later tests expect the original champion set
        get_client(mlflow_server).set_registered_model_alias(
            registered_name("ensemble"), CHAMPION, current["ensemble"]
        )
