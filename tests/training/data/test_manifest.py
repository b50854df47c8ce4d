import pytest

from training.data.manifest import CaseRecord, ManifestError, read_manifest, write_manifest


def _records():
    return [
        CaseRecord(
            "C1", "P1", ("images/C1_0.png", "images/C1_1.png"), 1, "mutated", 0.31, 54.0, "train"
        ),
        CaseRecord("C2", "P2", ("images/C2_0.png",), 0, "na", None, 2.5, "test"),
    ]


def test_round_trip(tmp_path):
    path = write_manifest(tmp_path / "cases.csv", _records())
    back = read_manifest(path)
    assert back == _records()
    assert back[0].npm1_label == 1 and back[1].npm1_label is None


def test_missing_images_are_reported_with_row(tmp_path):
    path = write_manifest(tmp_path / "cases.csv", _records())
    with pytest.raises(ManifestError, match=r"cases.csv:2: image not found"):
        read_manifest(path, check_images=True)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("C1,P1,a.png,2,na,,,train", "aml_label must be 0 or 1"),
        ("C1,P1,a.png,1,maybe,,,train", "npm1_status"),
        ("C1,P1,a.png,1,na,abc,,train", "vaf: not a number"),
        ("C1,P1,,1,na,,,train", "has no images"),
        ("C1,P1,a.png,1,na,,,holdout", "split must be"),
    ],
)
def test_bad_rows_give_clear_errors(tmp_path, row, message):
    path = tmp_path / "cases.csv"
    path.write_text(
        "case_id,patient_id,image_paths,aml_label,npm1_status,vaf,blast_pct,split\n" + row + "\n"
    )
    with pytest.raises(ManifestError, match=message):
        read_manifest(path)


def test_duplicate_case_and_missing_columns(tmp_path):
    path = tmp_path / "cases.csv"
    path.write_text(
        "case_id,patient_id,image_paths,aml_label,npm1_status,vaf,blast_pct,split\n"
        "C1,P1,a.png,1,na,,,\nC1,P1,b.png,1,na,,,\n"
    )
    with pytest.raises(ManifestError, match="duplicate case_id"):
        read_manifest(path)
    path.write_text("case_id,patient_id\nC1,P1\n")
    with pytest.raises(ManifestError, match="missing columns"):
        read_manifest(path)
