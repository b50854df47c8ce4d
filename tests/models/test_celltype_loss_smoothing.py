"""Soft targets of the cell typer's loss (issue 23 §2: label noise at the PMO/BLA boundary)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from marrowscope.errors import InvalidInput
from marrowscope.models.celltype import celltype_loss, soft_label_matrix

CODES = ["BLA", "PMO", "LYT", "MON"]


def test_no_smoothing_is_plain_one_hot():
    assert soft_label_matrix(CODES) is None
    assert soft_label_matrix(CODES, pairs=[("PMO", "BLA", 0.0)]) is None


def test_pair_smoothing_moves_mass_between_the_two_classes_only():
    m = soft_label_matrix(CODES, pairs=[("PMO", "BLA", 0.2)])
    assert m is not None
    torch.testing.assert_close(m.sum(1), torch.ones(4))
    assert m[1, 0] == pytest.approx(0.2) and m[1, 1] == pytest.approx(0.8)  # PMO -> BLA
    assert m[0, 1] == pytest.approx(0.2) and m[0, 0] == pytest.approx(0.8)  # BLA -> PMO
    torch.testing.assert_close(m[2:], torch.eye(4)[2:])  # other classes untouched


def test_uniform_and_pair_smoothing_combine():
    m = soft_label_matrix(CODES, smoothing=0.1, pairs=[("PMO", "BLA", 0.1), ("XXX", "BLA", 0.3)])
    assert m is not None
    torch.testing.assert_close(m.sum(1), torch.ones(4))
    assert m[2, 3] == pytest.approx(0.1 / 4)  # uniform share; the unknown pair is ignored
    assert m[1, 0] > m[2, 0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"smoothing": 1.0}, "label smoothing"), ({"pairs": [("PMO", "BLA", 0.5)]}, "pair")],
)
def test_out_of_range_smoothing_is_refused(kwargs, match):
    with pytest.raises(InvalidInput, match=match):
        soft_label_matrix(CODES, **kwargs)


def test_loss_uses_the_soft_targets():
    logits = torch.tensor([[2.0, 0.0, -1.0, -1.0], [0.0, 2.0, -1.0, -1.0]])
    targets = torch.tensor([0, 1])
    hard = celltype_loss(logits, targets, None, cell_head="softmax")
    torch.testing.assert_close(hard, F.cross_entropy(logits, targets))
    soft = soft_label_matrix(CODES, pairs=[("PMO", "BLA", 0.3)])
    smoothed = celltype_loss(logits, targets, None, cell_head="softmax", soft_targets=soft)
    assert soft is not None
    torch.testing.assert_close(smoothed, F.cross_entropy(logits, soft[targets]))
    assert smoothed > hard  # confident one-hot answers pay for the moved mass
    with pytest.raises(InvalidInput, match="soft_targets"):
        celltype_loss(logits, targets, None, cell_head="softmax", soft_targets=torch.eye(3))
