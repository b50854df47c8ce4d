"""The per-case domain check's library (`marrowscope.domain`) on fabricated cells."""

from __future__ import annotations

import json

import numpy as np
import pytest

from marrowscope.domain import (
    REFERENCE_FILE,
    DomainReference,
    DomainReferenceError,
    appearance_features,
    case_score,
)
from training.domain import calibrate, fit_reference


def _cells(n: int, seed: int, *, offset: float = 0.0, tint=(0, 0, 0)):
    """Embeddings float[n, 12] around `offset` and 16 px crops: a dark round cell on a
    light background, the background tinted by `tint`."""
    rng = np.random.default_rng(seed)
    emb = rng.normal(offset, 1.0, (n, 12))
    yy, xx = np.mgrid[:16, :16]
    disk = (yy - 7.5) ** 2 + (xx - 7.5) ** 2 < 20
    crops = np.empty((n, 16, 16, 3), np.uint8)
    for i in range(n):
        bg = np.array([225, 215, 220]) + np.array(tint) + rng.normal(0, 3, 3)
        img = np.where(disk[..., None], np.array([110, 70, 150]) + rng.normal(0, 5, 3), bg)
        crops[i] = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
    return emb, crops


@pytest.fixture(scope="module")
def reference() -> DomainReference:
    emb, crops = _cells(400, 0)
    return fit_reference(emb, crops, n_components=6, info={"test": True})


def test_unseen_cells_score_above_in_domain_cells(reference):
    held_in = case_score(reference.cell_scores(*_cells(40, 1)))
    shifted = case_score(reference.cell_scores(*_cells(40, 2, offset=2.5)))
    recoloured = case_score(reference.cell_scores(*_cells(40, 3, tint=(-40, 10, 30))))
    assert 0.5 < held_in.score < 1.5  # a typical training cell scores about 1
    assert shifted.embedding > 2 * held_in.embedding and shifted.score > 2 * held_in.score
    assert recoloured.appearance > 2 * held_in.appearance
    assert recoloured.score > 2 * held_in.score
    assert held_in.n_cells == 40


def test_json_round_trip_scores_identically(reference, tmp_path):
    calibrated = DomainReference(**{**reference.__dict__, "threshold": 1.7})
    path = calibrated.save(tmp_path)
    assert path.name == REFERENCE_FILE
    loaded = DomainReference.load(tmp_path)
    assert loaded is not None and loaded.threshold == 1.7 and loaded.info == {**reference.info}
    emb, crops = _cells(10, 4)
    np.testing.assert_array_equal(
        loaded.cell_scores(emb, crops), calibrated.cell_scores(emb, crops)
    )
    assert "pca_components" in json.loads(path.read_text())  # plain JSON, no pickle


def _write(tmp_path, data) -> None:
    (tmp_path / REFERENCE_FILE).write_text(data if isinstance(data, str) else json.dumps(data))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: "{not json", "not a readable JSON"),
        (lambda d: [1, 2], "JSON object"),
        (lambda d: {**d, "format": 99}, "format"),
        (lambda d: {k: v for k, v in d.items() if k != "embedding_precision"}, "lacks"),
        (lambda d: {**d, "embedding_mean": d["embedding_mean"][:-1]}, "embedding_mean must be"),
        (lambda d: {**d, "cell_scale": [float("nan"), 1.0]}, "non-finite"),
        (lambda d: {**d, "threshold": "high"}, "threshold must be a number"),
        (lambda d: {**d, "threshold": -1.0}, "positive"),
        (lambda d: {**d, "pca_mean": ["a"] * len(d["pca_mean"])}, "not numeric"),
    ],
)
def test_bad_reference_files_fail_clearly(reference, tmp_path, edit, message):
    _write(tmp_path, edit(reference.to_json()))
    with pytest.raises(DomainReferenceError, match=message) as info:
        DomainReference.load(tmp_path)
    assert str(tmp_path) in str(info.value)  # says which file


def test_a_model_without_a_reference_has_none(tmp_path):
    assert DomainReference.load(tmp_path) is None


def test_wrong_inputs_are_refused(reference):
    emb, crops = _cells(5, 5)
    with pytest.raises(ValueError, match="embeddings must be"):
        reference.cell_scores(emb[:, :3], crops)
    with pytest.raises(ValueError, match="crops must be uint8"):
        appearance_features(crops.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[N >= 1, 2\]"):
        case_score(np.zeros((0, 2)))


def test_calibrated_threshold_leaves_at_most_the_share_above():
    scores = np.linspace(1.0, 2.0, 40)
    t = calibrate(scores, 0.05)
    assert (scores > t).mean() <= 0.05 and (scores >= t).mean() > 0.05
    assert calibrate([1.2, 0.9], 0.05) == 1.2  # too few cases for 5 %: none abstains
