"""Every bad-input class is refused with a 4xx JSON error and nothing is stored."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from sqlalchemy import func, select

from services.gateway.db import Analysis, Idempotency, Image
from tests.gateway.conftest import files, meta, png


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def bomb_png() -> bytes:
    """A 100000 x 100000 RGB PNG header (30 GB of pixels) with a tiny compressed body."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024, 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def gif() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(buf, format="GIF")
    return buf.getvalue()


NOISE = png(400, 300, seed=9)  # incompressible: ~360 kB, over the 200 kB test limit

CASES = {
    "non-image": (files(b"hello, this is not an image", metadata=meta()), 422, "invalid_image"),
    "truncated-png": (files(png()[:300], metadata=meta()), 422, "invalid_image"),
    "zero-bytes": (files(b"", metadata=meta()), 422, "invalid_image"),
    "decompression-bomb": (files(bomb_png(), metadata=meta()), 422, "invalid_image"),
    "over-upload-limit": (files(NOISE, metadata=meta()), 413, "image_too_large"),
    "unsupported-gif": (files(gif(), metadata=meta()), 422, "invalid_image"),
    "missing-metadata": (files(png()), 422, "invalid_request"),
    "metadata-not-json": (files(png(), metadata="{accession"), 422, "invalid_metadata"),
    "metadata-no-accession": (files(png(), metadata='{"stain": "MGG"}'), 422, "invalid_metadata"),
    "metadata-unknown-field": (
        files(png(), metadata=meta(patient_name="x")),
        422,
        "invalid_metadata",
    ),
    "webhook-not-http": (
        files(png(), metadata=meta(webhook_url="file:///etc/passwd")),
        422,
        "invalid_metadata",
    ),
    "no-images": ([("metadata", (None, meta()))], 422, "invalid_request"),
    "second-image-bad": (
        files(png(), b"\x89PNG\r\n\x1a\nbroken", metadata=meta()),
        422,
        "invalid_image",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_and_nothing_stored(gateway, case):
    client, services, keys = gateway(max_upload_bytes="200000")
    parts, code, error = CASES[case]
    with client:
        r = client.post(
            "/v1/analyses", files=parts, headers={**keys["lis"], "Idempotency-Key": f"k-{case}"}
        )
    assert r.status_code == code, r.text
    body = r.json()
    assert body["error"] == error and body["detail"], body
    with services.sessions() as session:
        for table in (Analysis, Image, Idempotency):
            assert session.scalar(select(func.count()).select_from(table)) == 0
    stored = [p for p in services.settings.image_root.rglob("*") if p.is_file()]
    assert stored == []


def test_bomb_message_names_the_pixel_limit(gateway):
    client, _, keys = gateway()
    with client:
        r = client.post(
            "/v1/analyses", files=files(bomb_png(), metadata=meta()), headers=keys["lis"]
        )
    assert r.status_code == 422 and "pixel" in r.json()["detail"].lower()
