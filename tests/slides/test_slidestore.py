"""Slide stores: path confinement, local and fsspec roots, size-limited streamed uploads."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from services.gateway.slidestore import SlideRef, SlideStore, SlideStoreError, confine, save_upload


@pytest.mark.parametrize(
    "path",
    [
        "",
        "../x.svs",
        "/etc/passwd",
        "a/../../b.svs",
        "a//b.svs",
        "./a.svs",
        "C:\\x.svs",
        "s3://other/x.svs",
        "a\x00.svs",
    ],
)
def test_confine_refuses_escapes(path: str) -> None:
    with pytest.raises(SlideStoreError) as exc:
        confine(path)
    assert exc.value.status == 400


def test_local_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "cases").mkdir(parents=True)
    (root / "cases" / "a.svs").write_bytes(b"x" * 10)
    (tmp_path / "secret.svs").write_bytes(b"s")
    (root / "link.svs").symlink_to(tmp_path / "secret.svs")
    store = SlideStore({"lab": str(root)}, cache_dir=tmp_path / "cache", max_bytes=100)
    assert store.fetch(SlideRef("lab", "cases/a.svs")) == (root / "cases" / "a.svs").resolve()
    for ref, status in (
        (SlideRef("lab", "link.svs"), 400),  # a symlink out of the root
        (SlideRef("lab", "cases/b.svs"), 404),
        (SlideRef("nope", "cases/a.svs"), 404),
    ):
        with pytest.raises(SlideStoreError) as exc:
            store.fetch(ref)
        assert exc.value.status == status
    small = SlideStore({"lab": str(root)}, cache_dir=tmp_path / "cache", max_bytes=5)
    with pytest.raises(SlideStoreError) as exc:
        small.fetch(SlideRef("lab", "cases/a.svs"))
    assert exc.value.status == 413


def test_fsspec_root_is_fetched_to_the_cache(tmp_path: Path, small_slide: Path) -> None:
    import fsspec

    from marrowscope.slides import open_slide

    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket/slides/s1.tiff", small_slide.read_bytes())
    store = SlideStore(
        {"s3": "memory://bucket/slides"}, cache_dir=tmp_path / "cache", max_bytes=10**9
    )
    local = store.fetch(SlideRef("s3", "s1.tiff"))
    assert local.parent == tmp_path / "cache"
    with open_slide(local) as slide:
        assert slide.info.dimensions == (3072, 2048)
    assert store.fetch(SlideRef("s3", "s1.tiff")) == local  # cached
    tiny = SlideStore({"s3": "memory://bucket/slides"}, cache_dir=tmp_path / "c2", max_bytes=10)
    with pytest.raises(SlideStoreError) as exc:
        tiny.fetch(SlideRef("s3", "s1.tiff"))
    assert exc.value.status == 413


def test_unused_object_store_copies_expire_and_used_ones_stay(tmp_path: Path) -> None:
    """The cache holds the slides in use: a copy unused for the TTL goes at the next fetch
    (and with the blob sweep), one fetched again starts its TTL over, uploads stay."""
    import os
    import time

    import fsspec

    fs = fsspec.filesystem("memory")
    for name in ("old.tiff", "used.tiff", "new.tiff"):
        fs.pipe(f"/bucket2/slides/{name}", name.encode() * 100)
    cache = tmp_path / "cache"
    store = SlideStore(
        {"s3": "memory://bucket2/slides"}, cache_dir=cache, max_bytes=10**6, fetch_ttl_s=3600
    )
    old, used = store.fetch(SlideRef("s3", "old.tiff")), store.fetch(SlideRef("s3", "used.tiff"))
    upload = cache / "uploads" / "tenant" / "u1.svs"
    upload.parent.mkdir(parents=True)
    upload.write_bytes(b"u")
    stale = (cache / "crashed.part", upload)  # the upload is old too: not this expiry's
    (cache / "crashed.part").write_bytes(b"p")
    two_hours_ago = time.time() - 7200
    for path in (old, used, *stale):
        os.utime(path, (two_hours_ago, two_hours_ago))
    assert store.fetch(SlideRef("s3", "used.tiff")) == used  # a hit starts its TTL over
    assert set(store.expire_fetched(dry_run=True)) == {old, cache / "crashed.part"}
    assert old.exists()  # dry run
    new = store.fetch(SlideRef("s3", "new.tiff"))  # a new copy bounds the cache
    assert new.exists() and used.exists() and upload.exists()
    assert not old.exists() and not (cache / "crashed.part").exists()
    assert store.fetch(SlideRef("s3", "old.tiff")).read_bytes() == b"old.tiff" * 100  # again


def test_upload_is_streamed_and_size_limited(tmp_path: Path) -> None:
    async def chunks(n: int):
        for _ in range(n):
            yield b"y" * 1000

    path, size, sha = asyncio.run(save_upload(chunks(3), tmp_path, max_bytes=5000, suffix=".SVS"))
    assert size == 3000 and path.name == f"{sha}.svs" and path.stat().st_size == 3000
    with pytest.raises(SlideStoreError) as exc:
        asyncio.run(save_upload(chunks(10), tmp_path / "big", max_bytes=5000))
    assert exc.value.status == 413
    assert list((tmp_path / "big").iterdir()) == []  # the partial file is gone
    with pytest.raises(SlideStoreError) as exc:
        asyncio.run(save_upload(chunks(1), tmp_path, max_bytes=5000, declared_length=10**6))
    assert exc.value.status == 413
