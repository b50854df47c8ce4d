"""Fixtures for the training-job tests: one tiny synthetic cohort per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory) -> Path:
    """14 synthetic cases at 320x240 (about 6 control, 8 AML of which half NPM1-mutated), 1-2
    images each; splits by patient with the cpu-tiny fractions give every split AML cases
    of both NPM1 states."""
    from training.data.synth import generate_dataset
    from training.data.synth_cohort import SynthConfig

    out = tmp_path_factory.mktemp("cohort")
    generate_dataset(
        out,
        cases=14,
        seed=5,
        config=SynthConfig(size=(320, 240), images_per_case=2, aml_fraction=0.6, npm1_fraction=0.5),
    )
    return out


@pytest.fixture(scope="session")
def sqlite_tracking(tmp_path_factory) -> str:
    """A file-backed MLflow store for tests where a server is not the point."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def job_args(module, *flags: str):
    """Parsed args of a training job (`module.get_args_parser()`)."""
    return module.get_args_parser().parse_args([str(f) for f in flags])
