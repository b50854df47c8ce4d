"""Where an order's inputs are: images in `MS_HL7_INPUT_ROOT/<accession>/`, or a slide
`<accession>.<suffix>` in a local slide store of the gateway (`MS_HL7_SLIDE_STORE`).

An accession names a folder or a file only when it is a plain name (`ACCESSION_PATH`: no
separators, no `..`), and what it names must resolve inside its root (a symlink out of it is
refused), so an order cannot make the listener read anything else.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from services.gateway.config import GatewaySettings
from services.gateway.slidestore import UPLOAD_SUFFIXES, SlideRef, SlideStore, SlideStoreError
from services.hl7.orders import ACCESSION_PATH, Refused

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff"})


@dataclass(frozen=True)
class InputFile:
    """One image file as the gateway's upload checks read it (`intake.check_images`)."""

    file: IO[bytes]
    size: int
    filename: str


def _plain(accession: str) -> str:
    if not ACCESSION_PATH.match(accession):
        raise Refused(
            "AE",
            102,
            f"accession {accession!r} cannot name inputs: letters, digits, '.', '_' and '-' "
            "only, starting with a letter or digit",
            location="SPM^1^2",
        )
    return accession


def case_images(root: Path | None, accession: str) -> list[Path]:
    """The image files of `root/<accession>/` in name order; Refused when there are none."""
    if root is None:
        raise Refused(
            "AE", 207, "this listener has no input store (MS_HL7_INPUT_ROOT)", app_code="no_inputs"
        )
    base = root.resolve()
    folder = (base / _plain(accession)).resolve()
    if not folder.is_relative_to(base) or not folder.is_dir():
        raise Refused(
            "AE",
            204,
            f"unknown accession {accession}: no folder of that name in the input store",
            location="SPM^1^2",
            app_code="unknown_accession",
        )
    files = sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and p.resolve().is_relative_to(base)
    )
    if not files:
        raise Refused(
            "AE",
            204,
            f"accession {accession}: its folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})",
            location="SPM^1^2",
            app_code="no_images",
        )
    return files


@contextlib.contextmanager
def opened(paths: list[Path]) -> Iterator[list[InputFile]]:
    """The files open for reading (closed on exit), as upload-like objects."""
    with contextlib.ExitStack() as stack:
        yield [
            InputFile(stack.enter_context(p.open("rb")), p.stat().st_size, p.name) for p in paths
        ]


def slide_of(
    settings: GatewaySettings, store_name: str, accession: str
) -> tuple[dict[str, str], Path]:
    """(the slide source `{"store", "path"}` the worker reads, its local path) of a slide
    order; Refused when the store is not configured or local, or holds no such slide."""
    if not store_name:
        raise Refused(
            "AE",
            207,
            "this listener takes no slide orders (MS_HL7_SLIDE_STORE)",
            app_code="no_slides",
        )
    store = SlideStore.from_settings(settings)
    root = store.roots.get(store_name)
    if root is None or "://" in root.removeprefix("file://"):
        raise Refused(
            "AE",
            207,
            f"MS_HL7_SLIDE_STORE {store_name!r} is not a local slide store of the gateway",
            app_code="no_slides",
        )
    name = _plain(accession)
    for suffix in sorted(UPLOAD_SUFFIXES):
        path = f"{name}{suffix}"
        try:
            return {"store": store_name, "path": path}, store.fetch(SlideRef(store_name, path))
        except SlideStoreError as exc:
            if exc.code != "slide_not_found":
                raise Refused("AE", 207, exc.message, app_code=exc.code) from None
    raise Refused(
        "AE",
        204,
        f"unknown accession {accession}: no slide {name}.<{'|'.join(s[1:] for s in sorted(UPLOAD_SUFFIXES))}> "
        f"in slide store {store_name!r}",
        location="SPM^1^2",
        app_code="unknown_accession",
    )
