"""How a review reads as outcomes (`review.outcomes`): kept and corrected calls, cells the
reviewer drew or excluded, the agreement tally and the JSON report's `review` block."""

from __future__ import annotations

import pytest

from services.gateway.db import CaseReview
from services.gateway.result import ReviewSummary
from services.gateway.review import outcomes

RESULT = {
    "model_versions": {"celltype": {"model": "celltype", "version": "9"}},
    "images": [
        {
            "index": 0,
            "cells": [
                {"box": [0, 0, 10, 10], "detector_label": "cell", "cell_type": "BLA"},
                {"box": [10, 0, 20, 10], "detector_label": "cell", "cell_type": "BLA"},
                {"box": [20, 0, 30, 10], "detector_label": "cell", "cell_type": "LYT"},
                {"box": [30, 0, 40, 10], "detector_label": "RBC", "cell_type": None},
                {"box": [40, 0, 50, 10], "detector_label": "cell", "cell_type": None},
            ],
        }
    ],
}


def review(labels: str, state: str = "in_review", amendments: int = 0) -> CaseReview:
    return CaseReview(
        analysis_id="a",
        revision=3,
        state=state,
        labels_json=labels,
        amendments=amendments,
        signed_at=1.8e9 if state == "signed_out" else None,
        comment="ok",
    )


def test_kept_and_corrected_calls_and_the_tally() -> None:
    r = review('{"0.1": "MON", "0.4": "NGS"}')
    cells = {c.id: c for c in outcomes.reviewed_cells(RESULT, r)}
    assert cells["0.0"].kept and not cells["0.0"].corrected
    assert cells["0.1"].corrected and cells["0.1"].label == "MON" and not cells["0.1"].kept
    assert cells["0.3"].kept and cells["0.3"].model_code == "RBC"
    # a detection the typer did not type, labelled by the reviewer: not drawn, not judged
    assert not cells["0.4"].added and not cells["0.4"].judged and cells["0.4"].label == "NGS"
    counts = outcomes.tally("site-a", RESULT, r)
    assert counts == {
        ("site-a", "9", "BLA", True): 1,
        ("site-a", "9", "BLA", False): 1,
        ("site-a", "9", "LYT", True): 1,
        ("site-a", "9", "RBC", True): 1,
    }
    found = outcomes.agreement(counts.items())
    assert found["overall"] == {"cells": 4, "kept": 3, "agreement": 0.75}
    assert found["by_class"]["BLA"]["agreement"] == 0.5


def test_drawn_and_excluded_cells_count_as_the_app_records_them() -> None:
    labelled = review('{"0.4": "NGS"}')
    labelled.added_json = (
        '[{"id": "0.a1", "image": 0, "box": [60, 0, 70, 10], "code": "MON", "by": "r", "at": 1}]'
    )
    labelled.excluded_json = '[{"id": "x1", "image": 0, "box": [0, 0, 9, 9], "by": "r", "at": 1}]'
    cells = {c.id: c for c in outcomes.reviewed_cells(RESULT, labelled)}
    assert cells["0.0"].excluded and not cells["0.0"].judged
    assert cells["0.a1"].added and cells["0.a1"].label == "MON" and not cells["0.a1"].judged
    assert cells["0.a1"].model_code is None
    block = outcomes.review_block(RESULT, labelled, None)
    # 0.1 BLA, 0.2 LYT, 0.4 NGS and the drawn 0.a1 MON; 0.0 excluded, the RBC not counted
    assert block["n_cells_counted"] == 4


@pytest.mark.parametrize(
    ("row", "state"),
    [
        (None, "unreviewed"),
        (("{}", "in_review", 0), "in_review"),
        (("{}", "signed_out", 0), "signed_out"),
        (("{}", "signed_out", 2), "amended"),
        (("{}", "in_review", 1), "in_review"),
    ],
)
def test_the_report_block_validates_in_every_state(row, state) -> None:
    r = None if row is None else review(*row)
    block = outcomes.review_block(RESULT, r, "Dr Who")
    parsed = ReviewSummary.model_validate(block)
    assert parsed.state == state
    signed = state in ("signed_out", "amended")
    assert (parsed.reviewer == "Dr Who") == signed and (parsed.signed_at is not None) == signed
    if r is not None:
        assert {d.code for d in parsed.differential} >= {"BLA", "LYT"}


def test_the_reviewer_s_differential_follows_the_labels() -> None:
    block = outcomes.review_block(RESULT, review('{"0.0": "LYT", "0.1": "LYT"}'), None)
    lyt = next(d for d in block["differential"] if d["code"] == "LYT")
    assert (lyt["count"], lyt["fraction"]) == (3, 1.0)
    assert block["corrected_cells"] == 2 and block["blast_percent"] == 0.0


def test_the_report_block_lists_the_fields_whose_boxes_are_complete() -> None:
    r = review("{}")
    assert outcomes.review_block(RESULT, r, None)["complete_images"] == []
    r.complete_json = '[{"image": 0, "by": "r", "at": 1}]'
    block = ReviewSummary.model_validate(outcomes.review_block(RESULT, r, None))
    assert block.complete_images == [0]
    assert (
        ReviewSummary.model_validate(outcomes.review_block(RESULT, None, None)).complete_images
        == []
    )
