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
        "KSC",
        "PLT",
        "ART",
        "NIF",
    )
    assert "RBC" not in taxonomy.COUNTED_CODES
    assert len(taxonomy.COUNTED_CODES) == 12
    assert taxonomy.NON_COUNTED_CODES == ("RBC", "KSC", "PLT", "ART", "NIF")
    # appended after RBC: the COCO ids of the older codes (and old COCO files) keep meaning
    assert taxonomy.CATEGORY_IDS["RBC"] == 13 and taxonomy.CATEGORY_IDS["EBO"] == 12
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


def test_every_source_folder_maps_to_a_taxonomy_code():
    for source, table in taxonomy.SOURCE_CLASS_MAP.items():
        for folder, code in table.items():
            assert code is None or code in taxonomy.CODES, (source, folder)
    assert taxonomy.source_code("deepapl", "Promonocyte") == "BLA"  # blast equivalent
    assert taxonomy.source_code("deepapl", "Smudge cells") == "KSC"
    assert taxonomy.source_code("deepapl", "") is None
    assert taxonomy.source_code("pbc", "platelet") == "PLT"
    assert not taxonomy.cell_type("KSC").counted and not taxonomy.cell_type("PLT").counted


@pytest.mark.parametrize(
    ("folder", "code"),
    [
        ("Artifact", "ART"),
        ("artefacts", "ART"),
        (" ARTIFACTS ", "ART"),
        ("Unidentified", "NIF"),
        ("unidentifiable", "NIF"),
        ("Not  identifiable", "NIF"),
        ("smudge CELLS", "KSC"),
        ("Blast,  no lineage spec", "BLA"),
    ],
)
def test_later_cohort_spellings_map_case_and_blank_insensitively(folder, code):
    """The later DeepAPL cohort's artefact / unidentified folders, however spelt, are the
    non-counted ART / NIF; case and runs of blanks do not matter."""
    assert taxonomy.source_code("deepapl", folder) == code
    assert taxonomy.cell_type(code).counted == (code == "BLA")


def test_unknown_source_folder_is_a_clear_error():
    with pytest.raises(taxonomy.UnknownCellType, match="'Hairy cell' has no taxonomy mapping"):
        taxonomy.source_code("deepapl", "Hairy cell")
    with pytest.raises(taxonomy.UnknownCellType, match="unknown source"):
        taxonomy.source_code("matek", "BLA")


@pytest.mark.real_data
def test_shared_readme_folder_names_are_all_mapped():
    """The class names DeepAPL's README lists are every one in the table (no silent drop)."""
    from pathlib import Path

    cells = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "deepapl" / "cells.csv"
    if not cells.is_file():
        pytest.skip("../shared/data/deepapl is absent (real data not on this machine)")
    import csv

    with cells.open(newline="") as f:
        names = {row["cell_class"] for row in csv.DictReader(f)}
    assert names <= set(taxonomy.SOURCE_CLASS_MAP["deepapl"])
