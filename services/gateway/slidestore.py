"""Where whole slides come from: configured slide stores and size-limited streamed uploads.

Slides are gigabytes, so the LIS usually does not upload them: it names a slide in a store the
gateway can read (`SlideRef(store, path)`), a local/NFS root or an object-store URL read
through fsspec (`s3://bucket/prefix`, `gs://...`, `memory://...` in tests), or uploads it
(`PUT /v1/slide-uploads`, `save_upload`). `source_path` turns either into a local file.

Path confinement: a reference is a relative POSIX path inside its store's root. Absolute
paths, `..` segments, backslashes, NUL and empty segments are refused before any file system
call, and a local reference is resolved (symlinks included) and refused unless it stays under
the resolved root, so no reference can escape its root.

Object-store slides are copied to a local cache file in chunks (OpenSlide reads local files),
refusing anything above `max_bytes`; memory stays one chunk. A copy unused for
`fetch_ttl_s` (`MS_GATEWAY_SLIDE_FETCH_TTL_S`, 24 h) is deleted at the next fetch and by the
blob sweep (`expire_fetched`), so the cache holds the slides in use, not every slide ever read.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import posixpath
import re
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CHUNK_BYTES = 4 * 1024 * 1024
DEFAULT_FETCH_TTL_S = 86400.0
"""A cached object-store copy unused this long is deleted (`MS_GATEWAY_SLIDE_FETCH_TTL_S`)."""


class SlideStoreError(Exception):
    """A slide reference or upload refused; `status` is the HTTP status the gateway answers
    (400 bad reference, 404 no such slide/store, 413 too large) and `code` a stable word."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class SlideRef:
    """A slide named by the LIS: `store` (a configured root's name) and `path` inside it."""

    store: str
    path: str


def confine(path: str) -> str:
    """The normalised relative path, or SlideStoreError 400 when it could leave its root."""
    if not path or "\x00" in path or "\\" in path:
        raise SlideStoreError(400, "bad_slide_path", "slide path is empty or has NUL/backslash")
    if path.startswith("/") or "://" in path or (len(path) > 1 and path[1] == ":"):
        raise SlideStoreError(400, "bad_slide_path", "slide path must be relative to its store")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise SlideStoreError(400, "bad_slide_path", "slide path may not contain '', '.' or '..'")
    return posixpath.normpath(path)


class SlideStore:
    """Configured slide roots by name: a local directory (`/mnt/slides`, `file:///mnt/slides`)
    or an fsspec URL (`s3://bucket/slides`). `cache_dir` holds fetched object-store slides."""

    def __init__(
        self,
        roots: Mapping[str, str],
        *,
        cache_dir: Path,
        max_bytes: int,
        fetch_ttl_s: float = DEFAULT_FETCH_TTL_S,
    ) -> None:
        self.roots = dict(roots)
        self.cache_dir = Path(cache_dir)
        self.fetch_ttl_s = float(fetch_ttl_s)
        self.max_bytes = max_bytes

    @classmethod
    def from_settings(cls, settings) -> SlideStore:
        """The gateway's configured stores (`MS_GATEWAY_SLIDE_ROOTS`), cache and size limit."""
        return cls(
            settings.slide_roots,
            cache_dir=settings.slide_cache_dir,
            fetch_ttl_s=settings.slide_fetch_ttl_s,
            max_bytes=settings.max_slide_bytes,
        )

    def _root(self, store: str) -> str:
        try:
            return self.roots[store]
        except KeyError:
            raise SlideStoreError(
                404, "unknown_slide_store", f"no slide store {store!r}; known: {sorted(self.roots)}"
            ) from None

    @staticmethod
    def _local_root(root: str) -> Path | None:
        if root.startswith("file://"):
            return Path(root.removeprefix("file://"))
        return None if "://" in root else Path(root)

    def fetch(self, ref: SlideRef) -> Path:
        """A local path to the referenced slide: the file itself under a local root, else a
        cached copy of the object (fetched once per object version: size and etag/mtime)."""
        rel = confine(ref.path)
        root = self._root(ref.store)
        local = self._local_root(root)
        if local is not None:
            base = local.resolve()
            target = (base / rel).resolve()
            if not target.is_relative_to(base):
                raise SlideStoreError(400, "bad_slide_path", "slide path leaves its store")
            if not target.is_file():
                raise SlideStoreError(404, "slide_not_found", f"no slide {ref.path!r}")
            if target.stat().st_size > self.max_bytes:
                raise SlideStoreError(413, "slide_too_large", f"slide above {self.max_bytes} bytes")
            return target
        return self._fetch_remote(root.rstrip("/") + "/" + rel, ref)

    def _fetch_remote(self, url: str, ref: SlideRef) -> Path:
        import fsspec

        fs, fpath = fsspec.core.url_to_fs(url)
        try:
            info = fs.info(fpath)
        except FileNotFoundError:
            raise SlideStoreError(404, "slide_not_found", f"no slide {ref.path!r}") from None
        size = int(info.get("size") or 0)
        if size > self.max_bytes:
            raise SlideStoreError(413, "slide_too_large", f"slide above {self.max_bytes} bytes")
        stamp = f"{url}|{size}|{info.get('ETag') or info.get('etag') or info.get('mtime') or ''}"
        name = hashlib.sha256(stamp.encode()).hexdigest()[:32] + Path(fpath).suffix.lower()
        dest = self.cache_dir / name
        if dest.is_file() and dest.stat().st_size == size:
            with contextlib.suppress(FileNotFoundError):  # expired meanwhile: fetched below
                os.utime(dest)  # used again: its expiry starts over (`expire_fetched`)
                return dest
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, suffix=".part")
        written = 0
        try:
            with os.fdopen(fd, "wb") as out, fs.open(fpath, "rb") as src:
                while chunk := src.read(CHUNK_BYTES):
                    written += len(chunk)
                    if written > self.max_bytes:
                        raise SlideStoreError(
                            413, "slide_too_large", f"slide above {self.max_bytes} bytes"
                        )
                    out.write(chunk)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        log.info("fetched slide %s/%s (%d bytes) into the cache", ref.store, ref.path, written)
        # the cache only grows here, so this is where it is bounded as well
        self.expire_fetched()
        return dest

    def expire_fetched(self, *, dry_run: bool = False) -> list[Path]:
        """Delete the cached object-store copies (and `.part` files of fetches that stopped)
        unused for `fetch_ttl_s`: their mtime is set when fetched and by every `fetch` that
        finds them. Uploads (`uploads/`) are not touched: `blobs.expire_uploads` owns them.
        A job reads its copy right after `fetch` touched it, and the TTL (at least an hour)
        is longer than any slide job, so no copy in use is removed. Returns the removed."""
        from services.gateway.files import remove_older

        if not self.cache_dir.is_dir():
            return []
        copies = (p for p in self.cache_dir.iterdir() if p.is_file())
        removed = remove_older(copies, time.time() - self.fetch_ttl_s, dry_run=dry_run)
        for path in removed:
            log.info("expired cached slide copy %s", path.name)
        return removed


def _quota_error(quota_left: int) -> SlideStoreError:
    return SlideStoreError(
        413,
        "upload_quota_exceeded",
        f"this tenant's uploaded slides leave {max(0, quota_left)} bytes of its quota "
        "(MS_GATEWAY_SLIDE_UPLOAD_QUOTA_BYTES); uploads expire "
        "MS_GATEWAY_SLIDE_UPLOAD_TTL_S after their last use",
    )


async def save_upload(
    chunks: AsyncIterator[bytes],
    dest_dir: Path,
    *,
    max_bytes: int,
    quota_left: int | None = None,
    declared_length: int | None = None,
    suffix: str = "",
) -> tuple[Path, int, str]:
    """Stream an uploaded slide to `dest_dir` without holding it in memory.

    Refused with 413 `slide_too_large` when the declared Content-Length or the bytes actually
    received exceed `max_bytes`, and with 413 `upload_quota_exceeded` when they exceed
    `quota_left` (the partial file is removed). Returns (path, size, sha256); the file is
    named by its content hash, so a retried upload of the same slide is one file.
    """
    if declared_length is not None and declared_length > max_bytes:
        raise SlideStoreError(
            413, "slide_too_large", f"declared {declared_length} bytes above {max_bytes}"
        )
    if quota_left is not None and declared_length is not None and declared_length > quota_left:
        raise _quota_error(quota_left)
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest_dir, suffix=".part")
    digest = hashlib.sha256()
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            async for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise SlideStoreError(413, "slide_too_large", f"upload above {max_bytes} bytes")
                if quota_left is not None and size > quota_left:
                    raise _quota_error(quota_left)
                digest.update(chunk)
                out.write(chunk)
        final = dest_dir / f"{digest.hexdigest()}{suffix.lower()}"
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return final, size, digest.hexdigest()


UPLOAD_ID = re.compile(r"^[0-9a-f]{64}(\.[a-z0-9]{1,5})?$")
UPLOAD_SUFFIXES = frozenset({".tif", ".tiff", ".svs", ".dcm", ".ndpi", ".scn", ".bif"})


def upload_dir(root: Path, tenant: str) -> Path:
    """Uploaded slides of one tenant (a tenant can only name its own uploads)."""
    return root / "uploads" / hashlib.sha256(tenant.encode()).hexdigest()[:16]


def upload_suffix(name: str | None) -> str:
    """The file suffix OpenSlide may need to recognise an uploaded slide, from its name."""
    suffix = Path(name or "slide.tiff").suffix.lower()
    if suffix not in UPLOAD_SUFFIXES:
        raise SlideStoreError(
            400, "bad_slide_name", f"slide file name must end in one of {sorted(UPLOAD_SUFFIXES)}"
        )
    return suffix


def source_path(store: SlideStore, source: Mapping[str, str], *, tenant: str) -> Path:
    """A local path for a slide source: `{"store", "path"}` (fetched from an object store
    into the cache when needed) or `{"upload"}` (an id `PUT /v1/slide-uploads` returned)."""
    if "upload" in source:
        upload = source["upload"]
        if not UPLOAD_ID.match(upload):
            raise SlideStoreError(400, "bad_upload_id", "upload id is not one this gateway issued")
        path = upload_dir(store.cache_dir, tenant) / upload
        try:
            os.utime(path)  # named again: its expiry starts over (`expire_uploads`)
        except FileNotFoundError:
            raise SlideStoreError(
                404, "upload_not_found", f"no uploaded slide {upload!r} (expired uploads are gone)"
            ) from None
        return path
    return store.fetch(SlideRef(source["store"], source["path"]))


def is_local(store: SlideStore, source: Mapping[str, str]) -> bool:
    """Whether the source can be opened without copying (uploads and local roots)."""
    return "upload" in source or store._local_root(store._root(source["store"])) is not None


def upload_bytes(tenant_dir: Path) -> int:
    """Bytes one tenant's uploads hold, uploads in progress (`.part`) included."""
    total = 0
    for path in tenant_dir.glob("*") if tenant_dir.is_dir() else ():
        try:
            total += path.stat().st_size
        except FileNotFoundError:  # expired or finished meanwhile
            continue
    return total


def upload_paths(root: Path, uploads: set[tuple[str, str]]) -> set[Path]:
    """The files of (tenant, upload id) pairs (`store.uploads_in_use`)."""
    return {upload_dir(root, tenant) / upload for tenant, upload in uploads}
