"""Promotion gates of the learned nucleus/cytoplasm split (`nucseg`), on a real MLflow."""

from __future__ import annotations

import pytest

from marrowscope.registry import CHAMPION, alias_version, register_model_dir, registered_name
from tests import fixtures_mlflow
from tests.fixtures_mlflow import make_tiny_model_dir
from training.promote import promote

mlflow_server = fixtures_mlflow.mlflow_server  # the session's real server (fixture)

GOOD = {
    "cell_dice": 0.93,
    "nucleus_dice": 0.95,
    "nc_abs_err": 0.06,
    "wbcseg_cv_nucleus_dice": 0.955,
    "classical_wbcseg_cv_nucleus_dice": 0.955,
    "synth_nucleus_dice": 0.95,
    "classical_synth_nucleus_dice": 0.92,
}


@pytest.fixture(scope="module")
def reg(mlflow_server, tmp_path_factory):
    model_dir = make_tiny_model_dir("nucseg", tmp_path_factory.mktemp("nucseg") / "m")

    def register(**changes: float | None) -> str:
        metrics = {k: v for k, v in {**GOOD, **changes}.items() if v is not None}
        return register_model_dir(
            "nucseg",
            model_dir,
            metrics=metrics,
            params={},
            data_hash="synthetic",
            lineage={},
            tracking_uri=mlflow_server,
        )

    return register


def _failed(decisions) -> dict[str, str]:
    return {d.gate: d.detail for d in decisions if not d.passed}


def test_good_split_is_promoted_and_a_worse_one_refused(mlflow_server, reg, tmp_path):
    log_file = tmp_path / "promotions.jsonl"
    first = reg()
    ok, decisions = promote({"nucseg": first}, tracking_uri=mlflow_server, log_file=log_file)
    assert ok, _failed(decisions)
    gates = {d.gate for d in decisions}
    assert {"metrics", "nc_error", "vs_classical", "non_inferiority", "lineage", "config"} <= gates
    assert alias_version(registered_name("nucseg"), CHAMPION, tracking_uri=mlflow_server) == first
    # non-inferiority on cell Dice against the champion (0.93 - margin 0.01)
    worse = reg(cell_dice=0.91)
    ok, decisions = promote({"nucseg": worse}, tracking_uri=mlflow_server, log_file=log_file)
    assert not ok and set(_failed(decisions)) == {"non_inferiority"}
    assert alias_version(registered_name("nucseg"), CHAMPION, tracking_uri=mlflow_server) == first


@pytest.mark.parametrize(
    ("changes", "gate", "detail"),
    [
        ({"cell_dice": 0.85}, "metrics", "cell_dice=0.85 < floor 0.9"),
        ({"nc_abs_err": 0.2}, "nc_error", "nc_abs_err=0.2 > 0.1"),
        ({"nc_abs_err": None}, "nc_error", "nc_abs_err missing"),
        (
            {"wbcseg_cv_nucleus_dice": 0.90},
            "vs_classical",
            "wbcseg_cv nucleus Dice 0.9 < classical",
        ),
        (
            {"wbcseg_cv_nucleus_dice": None, "synth_nucleus_dice": None},
            "vs_classical",
            "no per-domain nucleus Dice",
        ),
    ],
    ids=[
        "cell-dice-floor",
        "nc-ceiling",
        "nc-missing",
        "nucleus-worse-than-classical",
        "no-domains",
    ],
)
def test_gates_refuse(mlflow_server, reg, changes, gate, detail):
    version = reg(**changes)
    ok, decisions = promote({"nucseg": version}, tracking_uri=mlflow_server, dry_run=True)
    assert not ok
    failed = _failed(decisions)
    assert gate in failed and detail in failed[gate], failed


def test_ceiling_can_be_set_like_a_floor(mlflow_server, reg):
    version = reg(nc_abs_err=0.12)
    floors = {"nucseg": {"cell_dice": 0.9, "nc_abs_err": 0.15}}
    ok, decisions = promote(
        {"nucseg": version}, tracking_uri=mlflow_server, floors=floors, dry_run=True
    )
    failed = _failed(decisions)
    assert "nc_error" not in failed and "metrics" not in failed, failed
