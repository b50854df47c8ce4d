"""`training.results --reuse`: a finished stage is reused only for the same command and
the same resolved config section."""

from __future__ import annotations

import hashlib
import json

import pytest

from training import results
from training.cli import UsageError, load_job_config


def _section_sha(job: str, config: str) -> str:
    return hashlib.sha256(
        json.dumps(load_job_config(job, config), sort_keys=True).encode()
    ).hexdigest()


def _flags(tmp_path) -> list[str]:
    return [
        "--data",
        str(tmp_path / "no-such-data"),
        "--output",
        str(tmp_path / "out"),
        "--config",
        "cpu-tiny",
    ]


def test_reuse_returns_the_saved_stage_for_the_same_command_and_config(tmp_path):
    flags = _flags(tmp_path)
    (tmp_path / "out").mkdir()
    saved = {
        "command": "python -m training.npm1 " + " ".join(flags),
        "metrics": {"auroc": 0.61},
        "seconds": 1.0,
        "config_sha256": _section_sha("npm1", "cpu-tiny"),
    }
    (tmp_path / "out" / "result.json").write_text(json.dumps(saved))
    assert results._run("npm1", flags, reuse=True) == saved


@pytest.mark.parametrize("change", ["config", "command"])
def test_a_changed_config_section_or_command_runs_the_stage_again(tmp_path, change):
    flags = _flags(tmp_path)
    (tmp_path / "out").mkdir()
    saved = {
        "command": "python -m training.npm1 " + " ".join(flags),
        "metrics": {"auroc": 0.61},
        "seconds": 1.0,
        "config_sha256": _section_sha("npm1", "cpu-tiny"),
    }
    if change == "config":
        saved["config_sha256"] = "0" * 64
    else:
        saved["command"] += " --set epochs=9"
    (tmp_path / "out" / "result.json").write_text(json.dumps(saved))
    with pytest.raises((UsageError, FileNotFoundError)):  # it really ran: the data are absent
        results._run("npm1", flags, reuse=True)
