"""The reviewed cells and differential from a result and the review's state: labels, drawn
cells and exclusions, and the box checks that refuse a bad drawing."""

from __future__ import annotations

import pytest

from services.gateway.review.cells import (
    AddedCell,
    Exclusion,
    cells_of,
    checked_box,
    differential_of,
    next_id,
)

RESULT = {
    "images": [
        {
            "index": 0,
            "width": 100,
            "height": 80,
            "cells": [
                {"box": [0, 0, 10, 10], "cell_type": "BLA", "confidence": 0.6},
                {"box": [50, 50, 60, 60], "cell_type": "LYT", "confidence": 0.9},
                {"box": [70, 10, 80, 20], "cell_type": None, "detector_label": "RBC"},
            ],
        },
        {
            "index": 1,
            "width": 100,
            "height": 80,
            "cells": [{"box": [5, 5, 15, 15], "cell_type": "BLA", "confidence": 0.7}],
        },
    ]
}


def test_the_reviewed_differential_follows_labels_drawn_cells_and_exclusions() -> None:
    added = [AddedCell("0.a1", 0, (20.0, 20.0, 30.0, 30.0), "EBO", "dr.a", 1.0)]
    exclusions = [
        Exclusion("x1", 1, None, "dr.a", 2.0),  # the whole of image 1
        Exclusion("x2", 0, (45.0, 45.0, 65.0, 65.0), "dr.a", 3.0),  # the LYT's centre inside
    ]
    cells = cells_of(RESULT, {"0.0": "MON"}, added, exclusions)
    assert [c.id for c in cells] == ["0.0", "0.1", "0.2", "0.a1", "1.0"]
    assert [c.excluded for c in cells] == [False, True, False, False, True]
    assert cells[2].model_code == "RBC" and not cells[2].counted
    reviewed = differential_of(cells, reviewed=True)
    model = differential_of(cells, reviewed=False)
    assert {k: e.count for k, e in reviewed.items() if e.count} == {"MON": 1, "EBO": 1}
    assert {k: e.count for k, e in model.items() if e.count} == {"BLA": 2, "LYT": 1}
    # a region that holds a box's corner but not its centre leaves the cell in
    corner = Exclusion("x3", 0, (0.0, 0.0, 4.0, 4.0), "dr.a", 4.0)
    assert not cells_of(RESULT, {}, (), [corner])[0].excluded


@pytest.mark.parametrize(
    ("image", "box", "reason"),
    [
        (0, (0, 0, 101, 10), "not inside image 0 (100 x 80 px)"),
        (0, (-1, 0, 10, 10), "not inside image 0"),
        (0, (10, 10, 12, 30), "smaller than 4 px"),
        (0, (30, 30, 10, 10), "smaller than 4 px"),  # corners swapped: drawn backwards
        (0, (float("nan"), 0, 10, 10), "must be numbers"),
        (0, (0, 0, 10), "four coordinates"),
        (5, (0, 0, 10, 10), "no image 5"),
    ],
)
def test_a_bad_box_is_refused_with_the_reason(image: int, box: tuple, reason: str) -> None:
    with pytest.raises(ValueError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        checked_box(RESULT, image, box, what="cell's box")


def test_ids_are_never_reused() -> None:
    assert next_id(".a", []) == 1
    assert next_id(".a", ["0.a1", "1.a3"]) == 4
    assert next_id("x", ["x2"]) == 3
