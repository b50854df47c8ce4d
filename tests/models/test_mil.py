"""The `mil` model kind: config (lineage, embedding_dim), safetensors round trip, shapes,
attention summing to 1, bad bags refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from marrowscope.errors import InvalidInput
from marrowscope.inference import MilPredictor, load_predictor
from marrowscope.models import ModelConfigError, load_model, make_config, save_model
from marrowscope.models.mil import GatedAttentionMIL

D = 12
LINEAGE = {"name": "marrowscope-celltype", "version": "4"}


def mil_config(**fields):
    return make_config("mil", "gated_attention", embedding_dim=D, celltype=LINEAGE, **fields)


def trained_dir(path, seed: int = 0):
    torch.manual_seed(seed)
    config = mil_config(hidden=8, attention=4)
    module = GatedAttentionMIL(D, hidden=8, attention=4)
    module.fit_standardisation(np.random.default_rng(seed).normal(2.0, 3.0, (50, D)))
    return save_model(module, config, path)


def test_config_records_dimension_and_celltype_lineage():
    config = mil_config()
    assert config["embedding_dim"] == D and config["celltype"] == LINEAGE
    assert config["target"] == "apl"
    for bad in (
        {"celltype": {"name": "marrowscope-celltype"}},
        {"celltype": {"name": "marrowscope-celltype", "version": ""}},
        {"celltype": "4"},
    ):
        with pytest.raises(ModelConfigError, match="celltype must be"):
            make_config("mil", "gated_attention", embedding_dim=D, **bad)
    with pytest.raises(ModelConfigError, match="embedding_dim must be a positive integer"):
        make_config("mil", "gated_attention", embedding_dim=0, celltype=LINEAGE)
    with pytest.raises(ModelConfigError, match="missing key"):
        make_config("mil", "gated_attention", embedding_dim=D)
    with pytest.raises(ModelConfigError, match="target must be 'apl'"):
        mil_config(target="npm1")


def test_round_trip_shapes_and_attention_sum(tmp_path):
    directory = trained_dir(tmp_path / "m")
    loaded = load_model(directory)
    assert loaded.config["kind"] == "mil"
    # the standardisation statistics travel with the weights
    assert float(loaded.module.mean.abs().sum()) > 0
    predictor = load_predictor(str(directory))
    assert isinstance(predictor, MilPredictor)
    assert predictor.embedding_dim == D and predictor.celltype == LINEAGE
    bag = np.random.default_rng(1).normal(size=(37, D)).astype(np.float32)
    p, attention = predictor.predict(bag)
    assert 0.0 <= p <= 1.0
    assert attention.shape == (37,) and attention.dtype == np.float32
    assert attention.min() >= 0 and attention.sum() == pytest.approx(1.0, abs=1e-5)
    # one cell: all the attention on it
    p1, a1 = predictor.predict(bag[:1])
    assert a1.tolist() == pytest.approx([1.0])
    # permuting the cells permutes the attention and keeps P
    order = np.random.default_rng(2).permutation(37)
    p2, a2 = predictor.predict(bag[order])
    assert p2 == pytest.approx(p, abs=1e-6)
    np.testing.assert_allclose(a2, attention[order], atol=1e-6)


@pytest.mark.parametrize(
    ("bag", "match"),
    [
        (np.zeros((5, D + 1), np.float32), r"must be \[N, 12\]"),
        (np.zeros((5,), np.float32), r"must be \[N, 12\]"),
        (np.zeros((2, 5, D), np.float32), r"must be \[N, 12\]"),
        (np.zeros((0, D), np.float32), "at least one cell"),
        (np.full((3, D), np.nan, np.float32), "NaN or infinite"),
        (np.zeros((3, D), np.int64), "floating point"),
    ],
)
def test_bad_bags_are_refused(tmp_path, bag, match):
    predictor = load_predictor(str(trained_dir(tmp_path / "m")))
    with pytest.raises(InvalidInput, match=match):
        predictor.predict(bag)
