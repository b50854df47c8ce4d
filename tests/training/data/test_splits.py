"""Patient-grouped, stratified splits and folds: no patient on two sides, labels balanced."""

from __future__ import annotations

import numpy as np
import pytest

from training.data.manifest import CaseRecord
from training.data.splits import grouped_kfold, split_cases


def _cohort(n_patients=60, seed=3) -> list[CaseRecord]:
    """Patients with 1-3 cases each; about 40 % AML, a third of AML NPM1-mutated."""
    rng = np.random.default_rng(seed)
    records = []
    for p in range(n_patients):
        aml = int(rng.random() < 0.4)
        npm1 = ("mutated" if rng.random() < 0.33 else "wild_type") if aml else "na"
        for c in range(int(rng.integers(1, 4))):
            records.append(
                CaseRecord(
                    case_id=f"C{p:03d}_{c}",
                    patient_id=f"P{p:03d}",
                    image_paths=(f"images/C{p:03d}_{c}_0.png",),
                    aml_label=aml,
                    npm1_status=npm1,
                )
            )
    return records


def _patients(records, ids):
    by_id = {r.case_id: r.patient_id for r in records}
    return {by_id[i] for i in ids}


def test_split_cases_groups_patients_and_stratifies():
    records = _cohort()
    assert len(records) > len({r.patient_id for r in records})  # some patients repeat
    out = split_cases(records, test_fraction=0.2, val_fraction=0.2, seed=0)
    assert [r.case_id for r in out] == [r.case_id for r in records]
    sides: dict[str, set[str]] = {}
    for r in out:
        sides.setdefault(r.patient_id, set()).add(r.split)
    assert all(len(s) == 1 for s in sides.values()), "a patient is on two sides"
    overall = np.mean([r.aml_label for r in out])
    for split in ("train", "val", "test"):
        part = [r for r in out if r.split == split]
        assert 0.1 < len(part) / len(out) < 0.75
        assert abs(np.mean([r.aml_label for r in part]) - overall) < 0.15
    again = split_cases(records, test_fraction=0.2, val_fraction=0.2, seed=0)
    assert [r.split for r in again] == [r.split for r in out]
    other = split_cases(records, test_fraction=0.2, val_fraction=0.2, seed=1)
    assert [r.split for r in other] != [r.split for r in out]


def test_split_without_val_or_test_and_bad_fractions():
    records = _cohort(20)
    only_test = split_cases(
        records, test_fraction=0.25, val_fraction=0.0, seed=0, stratify="aml_npm1"
    )
    assert {r.split for r in only_test} == {"train", "test"}
    with pytest.raises(ValueError, match="sum < 1"):
        split_cases(records, test_fraction=0.6, val_fraction=0.5, seed=0)
    with pytest.raises(ValueError, match="unknown stratify"):
        split_cases(records, test_fraction=0.2, val_fraction=0.0, seed=0, stratify="colour")


def test_grouped_kfold_partitions_cases_by_patient():
    records = _cohort()
    folds = grouped_kfold(records, 5, seed=0, stratify_by="aml_label")
    assert len(folds) == 5
    all_val = [c for _, val in folds for c in val]
    assert sorted(all_val) == sorted(r.case_id for r in records)  # each case validated once
    overall = np.mean([r.aml_label for r in records])
    label = {r.case_id: r.aml_label for r in records}
    for train, val in folds:
        assert not set(train) & set(val)
        assert not _patients(records, train) & _patients(records, val)
        assert abs(np.mean([label[c] for c in val]) - overall) < 0.15
    with pytest.raises(ValueError, match="folds from"):
        grouped_kfold(records[:4], 5, seed=0)
