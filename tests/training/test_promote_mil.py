"""Promotion of a MIL model (P(APL | AML) from cell embeddings) against a real `mlflow
server`: refused when its pinned celltype version is not the one that will serve, and a
celltype promotion is refused while the serving MIL model learned another celltype's
embeddings."""

from __future__ import annotations

import pytest

from marrowscope.errors import ModelNotFound
from marrowscope.registry import CHAMPION, alias_version, registered_name
from tests import fixtures_mlflow
from tests.fixtures_mlflow import make_tiny_model_dir
from tests.training.test_promote import champions, cli, good_set, model_dirs, reg

mlflow_server = fixtures_mlflow.mlflow_server
__all__ = ["good_set", "model_dirs", "reg"]  # module fixtures reused here


def _mil_dir(tmp_path, celltype_version: str, name: str = "marrowscope-celltype"):
    return make_tiny_model_dir(
        "mil",
        tmp_path / f"mil-{celltype_version}-{name}",
        celltype={"name": name, "version": celltype_version},
    )


def test_mil_pinned_to_another_celltype_is_refused(mlflow_server, good_set, reg, tmp_path, capsys):
    celltype = champions(mlflow_server)["celltype"]
    stale = reg("mil", {"apl_auroc": 0.84}, model_dir=_mil_dir(tmp_path, "999"))
    assert cli(mlflow_server, "--model", "mil", "--version", stale) == 1
    err = capsys.readouterr().err
    assert f"gate 'lineage' failed for mil v{stale}" in err
    assert f"learned the embeddings of celltype v999, but celltype v{celltype} would serve" in err
    with pytest.raises(ModelNotFound):  # nothing moved: mil has no champion yet
        alias_version(registered_name("mil"), CHAMPION, tracking_uri=mlflow_server)

    # pinned to the serving celltype: promoted
    good = reg("mil", {"apl_auroc": 0.84}, model_dir=_mil_dir(tmp_path, celltype))
    assert cli(mlflow_server, "--model", "mil", "--version", good) == 0
    assert alias_version(registered_name("mil"), CHAMPION, tracking_uri=mlflow_server) == good

    # a new celltype alone would leave the MIL model reading embeddings it never learned
    cel2 = reg("celltype")
    assert cli(mlflow_server, "--model", "celltype", "--version", cel2, "--dry-run") == 1
    err = capsys.readouterr().err
    assert f"gate 'lineage' failed for celltype v{cel2}" in err
    assert f"mil v{good} learned the embeddings of celltype v{celltype}" in err


def test_mil_gates_metrics_and_config(mlflow_server, good_set, reg, tmp_path, capsys):
    celltype = champions(mlflow_server)["celltype"]
    low = reg("mil", {"apl_auroc": 0.6}, model_dir=_mil_dir(tmp_path, celltype))
    assert cli(mlflow_server, "--model", "mil", "--version", low, "--dry-run") == 1
    assert "apl_auroc=0.6 < floor 0.75" in capsys.readouterr().err
    other = reg(
        "mil", {"apl_auroc": 0.9}, model_dir=_mil_dir(tmp_path, celltype, name="someone-else")
    )
    assert cli(mlflow_server, "--model", "mil", "--version", other, "--dry-run") == 1
    assert "is not the served celltype model" in capsys.readouterr().err
