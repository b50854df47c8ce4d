"""Synthetic smear generator: dataset contract, ground-truth consistency, determinism."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from marrowscope.taxonomy import ATTRIBUTE_CODES, CATEGORY_IDS, COUNTED_CODES
from training.data.manifest import read_manifest
from training.data.synth import benchmark, generate_dataset, main
from training.data.synth_cohort import SynthConfig, case_rng, sample_case, sample_cohort
from training.data.synth_render import render_image, rle_from_crop

TINY = SynthConfig(size=(160, 120), um_per_px=0.8, images_per_case=2)


@pytest.fixture(scope="module")
def tiny_ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    summary = generate_dataset(out, cases=6, seed=3, config=TINY, preview=True)
    return out, summary


def test_coco_loads_and_masks_are_consistent(tiny_ds):
    out, summary = tiny_ds
    coco = COCO(str(out / "annotations.json"))
    assert len(coco.imgs) == summary.images >= 6
    assert coco.getCatIds() == sorted(CATEGORY_IDS.values())
    assert len(coco.anns) > 20
    for ann in coco.anns.values():
        img = coco.imgs[ann["image_id"]]
        assert {"case_id", "patient_id", "um_per_px"} <= img.keys()
        m = coco.annToMask(ann).astype(bool)
        assert m.shape == (img["height"], img["width"])
        assert m.sum() == ann["area"] > 0
        x, y, w, h = ann["bbox"]
        assert min(x, y) >= 0 and x + w <= img["width"] and y + h <= img["height"]
        ys, xs = np.nonzero(m)
        assert (xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()) == (
            x,
            y,
            w,
            h,
        )
        assert set(ann["attributes"]) == set(ATTRIBUTE_CODES)
        if ann["category_id"] == CATEGORY_IDS["RBC"]:
            assert "nucleus_segmentation" not in ann
        else:
            nuc = mask_utils.decode(ann["nucleus_segmentation"]).astype(bool)
            assert nuc.any() or ann["area"] < 200  # small border slivers may lose the nucleus
            assert not (nuc & ~m).any()


def test_manifest_and_preview(tiny_ds):
    out, _ = tiny_ds
    records = read_manifest(out / "cases.csv", check_images=True)
    assert len(records) == 6
    assert all(r.patient_id != r.case_id for r in records)
    for r in records:
        assert (r.npm1_status == "na") == (r.aml_label == 0)
        assert (r.vaf is not None) == (r.npm1_status == "mutated")
    assert (out / "preview.png").stat().st_size > 1000


def test_rle_from_crop_matches_pycocotools():
    rng = np.random.default_rng(0)
    for x0, y0, h, w in [(0, 0, 5, 4), (3, 2, 7, 5), (11, 9, 4, 5), (0, 13, 3, 16)]:
        crop = rng.random((h, w)) > 0.4
        crop[0, 0] = True
        full = np.zeros((16, 16), np.uint8)
        full[y0 : y0 + h, x0 : x0 + w] = crop
        rle = rle_from_crop(crop, x0, y0, 16, 16)
        assert np.array_equal(mask_utils.decode(rle), full)
        assert rle["counts"] == mask_utils.encode(np.asfortranarray(full))["counts"].decode()


def _files(d):
    return {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_deterministic_across_runs_and_workers(tmp_path):
    cfg = replace(TINY, label_noise=0.1)
    generate_dataset(tmp_path / "a", cases=4, seed=11, config=cfg, workers=1)
    generate_dataset(tmp_path / "b", cases=4, seed=11, config=cfg, workers=2)
    generate_dataset(tmp_path / "c", cases=4, seed=12, config=cfg, workers=1)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a == b
    assert a != c


def test_blast_fractions_by_label(tmp_path):
    cfg = SynthConfig(size=(320, 240), um_per_px=0.45, images_per_case=3)
    generate_dataset(tmp_path, cases=16, seed=5, config=cfg)
    recs = read_manifest(tmp_path / "cases.csv")
    ctrl = [r.blast_pct for r in recs if r.aml_label == 0]
    aml = [r.blast_pct for r in recs if r.aml_label == 1]
    assert len(ctrl) == len(aml) == 8
    assert max(ctrl) <= 12.0 and np.mean(ctrl) <= 5.0
    assert min(aml) >= 12.0 and np.mean(aml) >= 30.0


def test_npm1_attributes():
    cfg = SynthConfig(size=(320, 240), um_per_px=0.45)
    rates = {}
    for status in ("mutated", "wild_type"):
        cup = nucleoli = n = 0
        for i in range(4):
            spec = sample_case(case_rng(7, i), i, "aml", status, cfg)
            _, cells = render_image(case_rng(7, i, 1), spec, cfg, cell_types=["BLA"] * 12)
            blasts = [c for c in cells if c.code == "BLA"]
            n += len(blasts)
            cup += sum(c.attributes["cup_like_nucleus"] for c in blasts)
            nucleoli += sum(c.attributes["prominent_nucleoli"] for c in blasts)
        rates[status] = (cup / n, nucleoli / n)
    assert rates["mutated"][0] > 0.3 > rates["wild_type"][0]
    assert rates["wild_type"][1] > 0.5 > rates["mutated"][1]


def test_label_noise_rate(tmp_path):
    generate_dataset(tmp_path, cases=4, seed=2, config=replace(TINY, label_noise=0.3))
    coco = json.loads((tmp_path / "annotations.json").read_text())
    counted = {CATEGORY_IDS[c] for c in COUNTED_CODES}
    anns = [a for a in coco["annotations"] if a["true_category_id"] in counted]
    flipped = sum(a["category_id"] != a["true_category_id"] for a in anns)
    assert len(anns) >= 40
    assert 0.15 < flipped / len(anns) < 0.45
    assert coco["info"]["label_noise_flipped"] == flipped
    assert all(a["category_id"] in counted for a in anns)


def test_empty_image_and_cohort_counts():
    img, cells = render_image(
        case_rng(0, 0, 1), sample_cohort(0, 1, TINY)[0], replace(TINY, crowding=0.05), cell_types=[]
    )
    assert img.shape == (120, 160, 3) and img.dtype == np.uint8
    assert all(c.code == "RBC" for c in cells)
    specs = sample_cohort(1, 10, SynthConfig(aml_fraction=0.6, npm1_fraction=0.5))
    assert sum(s.aml_label for s in specs) == 6
    assert sum(s.npm1_status == "mutated" for s in specs) == 3


@pytest.mark.parametrize(
    "argv",
    [
        ["--out", "x", "--size", "0x10"],
        ["--out", "x", "--cases", "0"],
        ["--out", "x", "--label-noise", "1.5"],
        ["--cases", "2"],
        ["--out", "x", "--workers", "0"],
    ],
)
def test_bad_arguments_are_rejected(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_bad_config_raises():
    with pytest.raises(ValueError, match="size"):
        SynthConfig(size=(0, 10))
    with pytest.raises(ValueError, match="cases"):
        sample_cohort(0, 0, SynthConfig())


def test_cli_jpeg_and_benchmark(tmp_path, capsys):
    main(
        [
            "--out",
            str(tmp_path),
            "--cases",
            "2",
            "--size",
            "96x64",
            "--um-per-px",
            "1.0",
            "--jpeg-quality",
            "80",
            "--images-per-case",
            "1",
        ]
    )
    assert "cases" in capsys.readouterr().out
    assert sorted(p.suffix for p in (tmp_path / "images").iterdir()) == [".jpg", ".jpg"]
    res = benchmark(sizes=((96, 64),), n=1)
    assert res["96x64"] > 0
