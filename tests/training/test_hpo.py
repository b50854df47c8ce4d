"""Optuna search: nested MLflow runs, pruning, and two worker processes sharing one study
in the real PostgreSQL."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import uuid

import pytest

from training.cli import JobConfig, load_job_config


def _args(tmp_path, tracking: str, **over) -> argparse.Namespace:
    base = dict(
        output=tmp_path,
        study=f"t-{uuid.uuid4().hex[:8]}",
        storage=None,
        hpo_trials=4,
        worker_id="w0",
        tracking_uri=tracking,
        experiment=None,
    )
    return argparse.Namespace(**{**base, **over})


def test_pruned_trials_are_recorded_and_nested_under_the_worker_run(tmp_path, sqlite_tracking):
    import optuna

    import mlflow
    from training.engine import fit  # noqa: F401  (the objective below mimics fit's reporting)
    from training.hpo import run_hpo

    values = load_job_config("ensemble", "cpu-tiny")
    values["hpo"] = {"pruner": "threshold", "lower": 0.5, "n_warmup_steps": 0}
    config = JobConfig.of("ensemble", values)

    def train_trial(cfg: JobConfig, trial) -> dict[str, float]:
        # a trial with small dropout scores well; a large one is pruned by the threshold
        score = 0.9 if cfg["dropout"] < 0.25 else 0.1
        for step in range(3):
            mlflow.log_metric("val_auroc", score, step=step)
            trial.report(score, step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return {"auroc": score}

    args = _args(tmp_path, sqlite_tracking, hpo_trials=8)
    study = run_hpo(args, config, job="ensemble", monitor="auroc", train_trial=train_trial)
    states = [t.state for t in study.trials]
    assert len(states) == 8
    assert optuna.trial.TrialState.PRUNED in states and optuna.trial.TrialState.COMPLETE in states
    assert all(t.user_attrs["worker"] == "w0" for t in study.trials)
    assert set(study.trials[0].params) == {"lr", "weight_decay", "dropout"}
    client = mlflow.MlflowClient(sqlite_tracking)
    exp = client.get_experiment_by_name("marrowscope-train-ensemble")
    runs = client.search_runs([exp.experiment_id], "tags.`mlflow.parentRunId` != ''")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(children) == 8
    assert {r.data.tags["state"] for r in children} == {"PRUNED", "COMPLETE"}
    assert all("val_auroc" in r.data.metrics for r in children)


@pytest.mark.postgres
def test_two_worker_processes_share_one_study(tmp_path, tiny_cohort, postgres_url):
    import optuna

    storage = postgres_url.replace("postgresql://", "postgresql+psycopg2://", 1)
    study = f"marrowscope-test-{uuid.uuid4().hex[:10]}"
    env = dict(os.environ, PYTHONPATH=os.getcwd(), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "training.celltype",
                "--data",
                str(tiny_cohort),
                "--output",
                str(tmp_path / w),
                "--config",
                "cpu-tiny",
                "--set",
                "epochs=2",
                "--hpo-trials",
                "3",
                "--study",
                study,
                "--storage",
                storage,
                "--worker-id",
                w,
                "--tracking-uri",
                f"sqlite:///{tmp_path / w}.db",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for w in ("w1", "w2")
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    trials = optuna.load_study(study_name=study, storage=storage).trials
    assert len(trials) == 6
    assert {t.user_attrs["worker"] for t in trials} == {"w1", "w2"}
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    assert all(t.state in finished for t in trials)
    assert any(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    optuna.delete_study(study_name=study, storage=storage)
