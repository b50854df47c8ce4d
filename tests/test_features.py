"""Case feature vector and differential: order, empty input, fractions, Wilson intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from marrowscope.errors import InvalidInput
from marrowscope.features import (
    MORPH_SUMMARY_FEATURES,
    CellCall,
    case_feature_names,
    case_features,
    differential,
    non_counted_summary,
    wilson_interval,
)
from marrowscope.morphometrics import FEATURE_NAMES
from marrowscope.taxonomy import ATTRIBUTE_CODES, CODES, COUNTED_CODES


def call(code: str, morph_value: float = 1.0, ok: float = 1.0, **attrs: float) -> CellCall:
    probs = {c: 0.01 for c in CODES}
    probs[code] = 0.9
    probs.update({a: attrs.get(a, 0.0) for a in ATTRIBUTE_CODES})
    morph = {f: morph_value for f in FEATURE_NAMES}
    morph["segmentation_ok"] = ok
    return CellCall(probs, morph)


def test_names_are_fixed_unique_and_cover_the_contract():
    names = case_feature_names()
    assert names == case_feature_names()
    assert len(set(names)) == len(names)
    assert names[: len(COUNTED_CODES)] == tuple(f"frac_{c}" for c in COUNTED_CODES)
    assert "frac_RBC" not in names
    assert [n for n in names if n.startswith("frac_attr_")] == [
        f"frac_attr_{a}" for a in ATTRIBUTE_CODES
    ]
    assert names[-1] == "n_cells_log"
    # the summary subset must exist in the morphometrics the segmentation service emits
    assert set(MORPH_SUMMARY_FEATURES) <= set(FEATURE_NAMES)


def test_empty_case_is_all_zeros():
    names, vec = case_features([])
    assert vec.dtype == np.float32 and vec.shape == (len(names),)
    assert not vec.any()
    diff = differential([])
    assert list(diff) == list(COUNTED_CODES)
    assert all(e == (0, 0.0, 0.0, 1.0) for e in diff.values())


def test_fractions_sum_to_one_and_rbc_is_not_counted():
    cells = [
        call("BLA", 2.0, auer_rod=0.8),
        call("BLA", 4.0, auer_rod=0.4),
        call("LYT", 6.0),
        call("NGS", 100.0, ok=0.0),
        call("RBC", 50.0),
    ]
    names, vec = case_features(cells)
    v = dict(zip(names, vec.tolist(), strict=True))
    fracs = [v[f"frac_{c}"] for c in COUNTED_CODES]
    assert math.isclose(sum(fracs), 1.0, rel_tol=1e-6)
    assert v["frac_BLA"] == pytest.approx(0.5) and v["frac_NGS"] == pytest.approx(0.25)
    assert v["n_cells_log"] == pytest.approx(math.log1p(4))
    assert v["frac_attr_auer_rod"] == pytest.approx(0.6)  # over the two blasts only
    # the failed segmentation (ok=0) and the RBC are left out of the morph summary
    assert v["mean_cell_area"] == pytest.approx(4.0)
    assert v["std_cell_area"] == pytest.approx(np.std([2.0, 4.0, 6.0]), rel=1e-5)
    diff = differential(cells)
    assert diff["BLA"].count == 2 and diff["BLA"].fraction == pytest.approx(0.5)
    assert sum(e.count for e in diff.values()) == 4


def test_bad_cells_are_rejected():
    good = call("BLA")
    with pytest.raises(InvalidInput, match="auer_rod"):
        case_features(
            [CellCall({k: v for k, v in good.probs.items() if k != "auer_rod"}, good.morph)]
        )
    with pytest.raises(InvalidInput, match="not in"):
        case_features([CellCall({**good.probs, "BLA": 1.5}, good.morph)])
    with pytest.raises(InvalidInput, match="nc_ratio"):
        case_features([CellCall(good.probs, {**good.morph, "nc_ratio": float("nan")})])


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [  # Newcombe, Stat Med 1998;17:857-872, table I (Wilson score, no continuity correction)
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_interval_known_values(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=1e-4) and hi == pytest.approx(high, abs=1e-4)


def test_wilson_interval_rejects_impossible_counts():
    with pytest.raises(InvalidInput):
        wilson_interval(3, 2)


def test_non_counted_cells_are_summarised_not_counted():
    cells = [call("BLA"), call("LYT"), call("KSC"), call("KSC"), call("PLT"), call("RBC")]
    summary = non_counted_summary(cells)
    assert summary == {"RBC": 1, "KSC": 2, "PLT": 1, "ART": 0, "NIF": 0}
    diff = differential(cells)
    assert sum(e.count for e in diff.values()) == 2
    names, vec = case_features(cells)
    v = dict(zip(names, vec.tolist(), strict=True))
    assert v["frac_BLA"] == pytest.approx(0.5) and v["n_cells_log"] == pytest.approx(math.log1p(2))
    assert not any(n.endswith(("_KSC", "_PLT")) for n in names)


def test_old_typer_without_new_codes_still_works():
    """A typer trained before KSC/PLT/ART/NIF existed answers only the older codes."""
    old = [c for c in CODES if c not in ("KSC", "PLT", "ART", "NIF")]
    probs = {c: 0.01 for c in old} | {"MON": 0.9} | dict.fromkeys(ATTRIBUTE_CODES, 0.0)
    cell = CellCall(probs, {f: 1.0 for f in FEATURE_NAMES})
    assert cell.cell_type == "MON"
    assert non_counted_summary([cell])["KSC"] == 0
    assert differential([cell])["MON"].count == 1
