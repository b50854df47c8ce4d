"""Genetic targets as a list (`marrowscope.targets`): old ensemble configs still load and serve,
APL is labelled, thresholded, cross-validated and gated like NPM1, and a third target is one
registry entry."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from marrowscope.models import ModelConfigError, build_model, load_model, make_config, save_model
from marrowscope.targets import APL, BY_CODE, NPM1, genetic_target, output_of
from training.cli import JobConfig, UsageError, load_job_config
from training.data.manifest import CaseRecord

NAMES = ["a", "b", "c"]


@pytest.mark.parametrize("targets", [None, ["aml"], ["aml", "npm1"]])
def test_old_ensemble_configs_load_and_predict_unchanged(tmp_path, targets):
    fields = {} if targets is None else {"targets": targets}
    config = make_config("ensemble", "mlp", feature_names=NAMES, **fields)
    if targets is None:
        del config["targets"]  # as written before `targets` existed
    model = build_model(config)
    directory = save_model(model, config, tmp_path / "m")
    loaded = load_model(directory)
    x = np.random.default_rng(0).random((4, 3)).astype(np.float32)
    probs = loaded.module.predict_targets(x, NAMES)
    assert list(probs) == (targets or ["aml"])
    np.testing.assert_allclose(loaded.module.predict_proba(x).numpy(), probs["aml"].numpy())


def test_apl_target_config_and_refusals():
    config = make_config("ensemble", "mlp", feature_names=NAMES, targets=["aml", "npm1", "apl"])
    assert build_model(config).mlp[-1].out_features == 3
    for bad in (["apl"], ["aml", "apl", "apl"], ["aml", "flt3"]):
        with pytest.raises(ModelConfigError, match="targets must start with 'aml'"):
            make_config("ensemble", "mlp", feature_names=NAMES, targets=bad)


def test_apl_labels_come_from_the_apl_status_column_of_aml_cases():
    from training.ensemble import target_labels

    records = [
        CaseRecord("C1", "P1", ("x.png",), 1, extra={"apl_status": "apl"}),
        CaseRecord("C2", "P2", ("x.png",), 1, extra={"apl_status": "non_apl"}),
        CaseRecord("C3", "P3", ("x.png",), 1, extra={"apl_status": ""}),
        CaseRecord("C4", "P4", ("x.png",), 1),
        CaseRecord("C5", "P5", ("x.png",), 0, extra={"apl_status": "apl"}),  # a control: never
        CaseRecord("C6", "P6", ("x.png",), 1, npm1_status="mutated", extra={"apl_status": "0"}),
    ]
    y = target_labels(records, ["aml", "npm1", "apl"])
    np.testing.assert_array_equal(y[:, 0], [1, 1, 1, 1, 0, 1])
    np.testing.assert_array_equal(np.isnan(y[:, 2]), [False, False, True, True, True, False])
    assert (y[0, 2], y[1, 2], y[5, 2]) == (1.0, 0.0, 0.0) and y[5, 1] == 1.0


def _cohort(n: int, seed: int = 0):
    """Controls and AML cases; feature 0 separates AML, feature 1 APL among AML."""
    rng = np.random.default_rng(seed)
    records, rows = [], []
    for i in range(n):
        aml, apl = i % 3 != 0, i % 2 == 0
        extra = {"apl_status": "apl" if apl else "non_apl"} if aml else {}
        records.append(CaseRecord(f"C{i:03d}", f"P{i:03d}", ("x.png",), int(aml), extra=extra))
        rows.append(
            [
                (2.0 if aml else -2.0) + rng.normal(0, 0.3),
                (2.0 if apl else -2.0) + rng.normal(0, 0.3),
                rng.normal(0, 1),
            ]
        )
    return records, ("aml_signal", "apl_signal", "noise"), np.array(rows, dtype=np.float32)


def test_cross_validation_and_test_metrics_of_the_apl_head(tmp_path):
    from training.ensemble import cross_validate, target_labels, target_report, train_mlp

    config = JobConfig.of(
        "ensemble",
        load_job_config(
            "ensemble",
            "cpu-tiny",
            ["cv_folds=3", "epochs=60", 'targets=["aml", "apl"]', "apl_score_threshold=0.3"],
        ),
    )
    records, names, table = _cohort(48)
    metrics = cross_validate(config, names, table, records, tmp_path)
    assert metrics["apl_cv_auroc_mean"] > 0.9 and metrics["apl_cv_folds"] == 3, metrics
    assert not any(k.startswith("npm1_") for k in metrics)

    y = target_labels(records, ["aml", "apl"])
    model, model_config = train_mlp(
        config, names, table[:36], y[:36], None, None, output=tmp_path / "m", checkpoint=False
    )
    # the threshold travels with the model for serving
    assert model_config["hyperparameters"]["apl_score_threshold"] == 0.3
    scores = model.predict_targets(table[36:])["apl"].numpy()
    report, plots = target_report("apl", y[36:, 1], scores, config, tmp_path / "plots")
    assert report["apl_threshold"] == 0.3 and report["apl_auroc"] > 0.9
    assert report["apl_n_pos"] + report["apl_n_neg"] == np.sum(~np.isnan(y[36:, 1]))
    assert {p.name for p in plots} >= {"apl_roc.png", "apl_confusion.png"}


def test_a_target_without_both_states_is_refused(tmp_path):
    from training.ensemble import check_target_labels

    records = [
        dataclasses.replace(r, split="train")
        for r in [
            CaseRecord("C1", "P1", ("x.png",), 1, npm1_status="mutated"),
            CaseRecord("C2", "P2", ("x.png",), 1, npm1_status="wild_type"),
            CaseRecord("C3", "P3", ("x.png",), 1, extra={"apl_status": "non_apl"}),
        ]
    ]
    check_target_labels(records, ["aml", "npm1"], tmp_path)
    with pytest.raises(
        UsageError, match=r"target apl .*apl_status apl and non_apl.*only non_apl APL"
    ):
        check_target_labels(records, ["aml", "npm1", "apl"], tmp_path)


def test_promotion_floors_cover_every_target():
    from training.promote import default_floors

    floors = default_floors()["ensemble"]
    assert floors["npm1_auroc"] == NPM1.floor == 0.80 and floors["apl_auroc"] == APL.floor


def test_a_third_target_is_one_registry_entry(monkeypatch):
    """Registering a definition is all it takes for config, training labels, thresholds,
    promotion floors, the service's outputs and the gateway's call."""
    from services.ensemble.model import threshold_parameters
    from services.gateway.clients import EnsembleOutput, ModelInfo
    from services.gateway.config import GatewaySettings
    from services.gateway.morphology import morphology_calls
    from services.gateway.result import AmlCall
    from training.ensemble import target_labels, threshold_hyperparameters
    from training.promote import default_floors

    flt3 = dataclasses.replace(
        APL,
        code="flt3",
        name="FLT3-ITD",
        column="flt3_status",
        positive=("itd",),
        negative=("wild_type",),
        threshold_key="flt3_score_threshold",
        threshold_parameter="flt3_threshold",
        gateway_threshold_setting="flt3_threshold",
        floor=0.7,
        output="P_FLT3",
        report_entry="flt3_morphology",
        fhir_code="p-flt3-morphology",
        missing_reason="no_flt3_output",
    )
    monkeypatch.setitem(BY_CODE, "flt3", flt3)

    config = make_config("ensemble", "mlp", feature_names=NAMES, targets=["aml", "flt3"])
    x = np.zeros((1, 3), np.float32)
    assert list(build_model(config).predict_targets(x)) == ["aml", "flt3"]
    assert genetic_target("flt3") is flt3 and output_of("flt3") == "P_FLT3"
    record = CaseRecord("C1", "P1", ("x.png",), 1, extra={"flt3_status": "itd"})
    assert target_labels([record], ["aml", "flt3"]).tolist() == [[1.0, 1.0]]
    job = JobConfig.of("ensemble", {"flt3_score_threshold": 0.4})
    assert threshold_hyperparameters(job, ["aml", "flt3"]) == {"flt3_score_threshold": 0.4}
    assert default_floors()["ensemble"]["flt3_auroc"] == 0.7
    assert threshold_parameters(
        {"targets": ["aml", "flt3"], "hyperparameters": {"flt3_score_threshold": 0.4}}
    ) == {"flt3_threshold": "0.4"}
    calls = morphology_calls(
        AmlCall(status="predicted"),
        EnsembleOutput(0.9, {}, "2", p_targets={"flt3": 0.8}, thresholds={"flt3": 0.4}),
        ensemble=ModelInfo("ensemble", "2"),
        settings=GatewaySettings(),  # no flt3 setting: the 0.5 default
        aml_positive=True,
    )
    assert set(calls) == {"npm1_morphology", "apl_morphology", "flt3_morphology"}
    assert (calls["flt3_morphology"].p, calls["flt3_morphology"].positive) == (0.8, True)
    assert calls["npm1_morphology"].status == "not_available"
