"""Patient-grouped, label-stratified splits and cross-validation folds over case records.

Every case of one patient lands on the same side of every split and fold (the paper split
after augmentation; we split by patient before anything else). Stratification keeps label
proportions approximately equal across sides; it uses scikit-learn's
`StratifiedGroupKFold`, so fractions are met approximately: a fraction f takes one fold of
`round(1 / f)` folds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence

import numpy as np

from training.data.manifest import CaseRecord

log = logging.getLogger(__name__)

Stratify = str | Callable[[CaseRecord], Hashable] | None


def stratum_key(stratify: Stratify) -> Callable[[CaseRecord], Hashable]:
    """Label used for stratification: `aml_label`, `npm1_status`, `aml_npm1` (control /
    NPM1-mutated / wild-type AML), any CaseRecord attribute, a callable, or None."""
    if stratify is None:
        return lambda r: 0
    if callable(stratify):
        return stratify
    if stratify == "aml_npm1":
        return lambda r: f"{r.aml_label}:{r.npm1_status}"
    if stratify not in CaseRecord.__dataclass_fields__:
        raise ValueError(
            f"unknown stratify key {stratify!r}; use a CaseRecord field, "
            "'aml_npm1', a callable or None"
        )
    return lambda r: getattr(r, stratify)


def _folds(
    records: Sequence[CaseRecord], n_splits: int, seed: int, stratify: Stratify
) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import StratifiedGroupKFold

    groups = [r.patient_id for r in records]
    n_groups = len(set(groups))
    if n_splits < 2 or n_splits > n_groups:
        raise ValueError(f"cannot make {n_splits} folds from {n_groups} patients")
    key = stratum_key(stratify)
    labels = np.unique([str(key(r)) for r in records], return_inverse=True)[1]
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(records)), labels, groups))


def _check_unique(records: Sequence[CaseRecord]) -> None:
    ids = [r.case_id for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate case_id in records")


def split_cases(
    records: Sequence[CaseRecord],
    *,
    test_fraction: float,
    val_fraction: float,
    seed: int,
    stratify: Stratify = "aml_label",
) -> list[CaseRecord]:
    """Assign `split` (train | val | test) to every record, grouped by patient_id and
    stratified by `stratify`; returns new records in the input order.

    test_fraction, val_fraction: shares of all cases (0 = no such split), met approximately.
    """
    _check_unique(records)
    if not (0 <= test_fraction < 1 and 0 <= val_fraction < 1 and test_fraction + val_fraction < 1):
        raise ValueError(
            f"fractions must be in [0, 1) with a sum < 1, got test="
            f"{test_fraction}, val={val_fraction}"
        )
    assigned = {r.case_id: "train" for r in records}
    remaining = list(records)
    if test_fraction > 0:
        _, test_idx = _folds(remaining, max(2, round(1 / test_fraction)), seed, stratify)[0]
        for i in test_idx:
            assigned[remaining[i].case_id] = "test"
        remaining = [r for r in remaining if assigned[r.case_id] == "train"]
    if val_fraction > 0:
        relative = val_fraction / (1 - test_fraction)
        _, val_idx = _folds(remaining, max(2, round(1 / relative)), seed + 1, stratify)[0]
        for i in val_idx:
            assigned[remaining[i].case_id] = "val"
    out = [r.with_split(assigned[r.case_id]) for r in records]
    counts = {s: sum(r.split == s for r in out) for s in ("train", "val", "test")}
    log.info(
        "split %d cases (%d patients) seed=%d stratify=%s: %s",
        len(out),
        len({r.patient_id for r in out}),
        seed,
        stratify,
        counts,
    )
    return out


def grouped_kfold(
    records: Sequence[CaseRecord], k: int, *, seed: int, stratify_by: Stratify = "aml_label"
) -> list[tuple[list[str], list[str]]]:
    """k (train case_ids, val case_ids) folds, grouped by patient_id and stratified by
    `stratify_by`. Pass only the cases meant for cross-validation (e.g. not the test split).
    """
    _check_unique(records)
    folds = _folds(records, k, seed, stratify_by)
    return [
        ([records[i].case_id for i in tr], [records[i].case_id for i in va]) for tr, va in folds
    ]
