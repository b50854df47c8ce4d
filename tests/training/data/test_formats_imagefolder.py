"""Single-cell ImageFolder reader and its torch-free iterator."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from marrowscope.errors import InvalidInput
from training.data.coco import DatasetFormatError
from training.data.imagefolder import iter_imagefolder, read_imagefolder


def _img(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), colour).save(path)


def test_reads_codes_and_nested_files(tmp_path):
    _img(tmp_path / "BLA" / "b1.png", (10, 20, 30))
    _img(tmp_path / "BLA" / "0001-1000" / "b2.jpg", (10, 20, 30))
    _img(tmp_path / "lyt" / "l1.tiff", (200, 0, 0))
    (tmp_path / "lyt" / "notes.txt").write_text("not an image")
    items = read_imagefolder(tmp_path)
    assert [(p.name, c) for p, c in items] == [
        ("b2.jpg", "BLA"),
        ("b1.png", "BLA"),
        ("l1.tiff", "LYT"),
    ]
    decoded = list(iter_imagefolder(items))
    assert [c for _, c in decoded] == ["BLA", "BLA", "LYT"]
    assert decoded[2][0].shape == (10, 12, 3) and tuple(decoded[2][0][0, 0]) == (200, 0, 0)
    assert all(img.dtype == np.uint8 for img, _ in decoded)


def test_unknown_folder_lists_known_codes(tmp_path):
    _img(tmp_path / "BLA" / "b1.png", (0, 0, 0))
    _img(tmp_path / "ARTEFACTS" / "a1.png", (0, 0, 0))
    with pytest.raises(DatasetFormatError, match="ARTEFACTS.*known codes: BLA, PMO"):
        read_imagefolder(tmp_path)
    items = read_imagefolder(tmp_path, class_map={"ARTEFACTS": None})
    assert [c for _, c in items] == ["BLA"]
    assert [c for _, c in read_imagefolder(tmp_path, class_map={"ARTEFACTS": "PLM"})] == [
        "PLM",
        "BLA",
    ]
    with pytest.raises(DatasetFormatError, match="not a taxonomy code"):
        read_imagefolder(tmp_path, class_map={"ARTEFACTS": "artefact"})


def test_empty_or_bad_folders(tmp_path):
    with pytest.raises(DatasetFormatError, match="not found"):
        read_imagefolder(tmp_path / "nope")
    (tmp_path / "EOS").mkdir()
    with pytest.raises(DatasetFormatError, match="no images"):
        read_imagefolder(tmp_path)
    (tmp_path / "EOS" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(InvalidInput, match="broken.png"):
        list(iter_imagefolder(read_imagefolder(tmp_path)))
