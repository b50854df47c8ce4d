import pytest

from marrowscope import taxonomy


def test_codes_match_design_and_rbc_not_counted():
    assert taxonomy.CODES == (
        "BLA",
        "PMO",
        "MYB",
        "MMZ",
        "NGB",
        "NGS",
        "EOS",
        "BAS",
        "MON",
        "LYT",
        "PLM",
        "EBO",
        "RBC",
    )
    assert "RBC" not in taxonomy.COUNTED_CODES
    assert len(taxonomy.COUNTED_CODES) == 12
    assert set(taxonomy.ATTRIBUTE_CODES) == {
        "auer_rod",
        "prominent_nucleoli",
        "cup_like_nucleus",
        "condensed_chromatin",
    }


def test_category_ids_are_one_based_and_invertible():
    ids = [taxonomy.CATEGORY_IDS[c] for c in taxonomy.CODES]
    assert ids == list(range(1, len(taxonomy.CODES) + 1))
    assert all(taxonomy.CODE_BY_CATEGORY_ID[i] == c for c, i in taxonomy.CATEGORY_IDS.items())
    cats = taxonomy.coco_categories()
    assert [c["name"] for c in cats] == list(taxonomy.CODES)


def test_lookup_is_case_insensitive_and_unknown_is_clear():
    assert taxonomy.cell_type("bla").name.startswith("blast")
    with pytest.raises(taxonomy.UnknownCellType, match="known: BLA"):
        taxonomy.cell_type("XYZ")
