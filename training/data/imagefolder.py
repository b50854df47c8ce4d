"""Single-cell ImageFolder: ROOT/<CLASS>/**/<image>, one folder per cell-type code.

The layout of Matek et al.'s bone-marrow cytomorphology set (folders named by code, files
possibly in nested sub-folders). Folder names must be taxonomy codes unless `class_map`
maps them (a folder mapped to None is skipped and logged).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from marrowscope import taxonomy
from marrowscope.imaging import ImageLimits, decode_image
from training.data.coco import DatasetFormatError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def read_imagefolder(
    root: str | Path, *, class_map: Mapping[str, str | None] | None = None
) -> list[tuple[Path, str]]:
    """(image path, taxonomy code) for every image under ROOT, sorted by path.

    Raises DatasetFormatError when a folder is neither a code (case-insensitive) nor in
    `class_map` (the message lists the known codes), or when nothing is found.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetFormatError(f"{root}: image folder not found")
    items: list[tuple[Path, str]] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if class_map is not None and folder.name in class_map:
            code = class_map[folder.name]
            if code is None:
                log.info("%s: folder %s skipped by class_map", root, folder.name)
                continue
            if code not in taxonomy.CODES:
                raise DatasetFormatError(
                    f"class_map maps {folder.name!r} to {code!r}, which "
                    f"is not a taxonomy code ({', '.join(taxonomy.CODES)})"
                )
        elif folder.name.upper() in taxonomy.CODES:
            code = folder.name.upper()
        else:
            raise DatasetFormatError(
                f"{folder}: folder name is not a cell-type code; known codes: "
                f"{', '.join(taxonomy.CODES)} (pass class_map to map or skip it)"
            )
        files = sorted(
            p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        items.extend((p, code) for p in files)
    if not items:
        raise DatasetFormatError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    log.info(
        "%s: %d single-cell images in %d classes", root, len(items), len({c for _, c in items})
    )
    return items


def iter_imagefolder(
    items: list[tuple[Path, str]], *, limits: ImageLimits | None = None
) -> Iterator[tuple[np.ndarray, str]]:
    """Decode each item: yields (uint8[H, W, 3] RGB, code). No torch needed. A bad file
    raises `marrowscope.errors.InvalidInput` naming the path."""
    from marrowscope.errors import InvalidInput

    for path, code in items:
        try:
            image = decode_image(path.read_bytes(), limits=limits or ImageLimits(min_side=1))
        except InvalidInput as exc:
            raise InvalidInput(f"{path}: {exc}") from None
        yield image, code
