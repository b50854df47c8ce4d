"""Content-addressed files on disk: `<root>/<sha[:2]>/<sha[2:4]>/<sha256>`.

Writes go to a temporary file in the same folder and are renamed into place, so a crash
never leaves a half-written blob under its final name and equal content is stored once.

Because equal content is stored once, a blob may belong to several analyses, or to a
concurrent request that is about to commit the row pointing at it. Nothing in a request or
a worker therefore deletes a blob; only `sweep` does, for blobs the job store does not
reference and that nobody has written (or re-written: `put` refreshes the mtime of a blob it
finds) within a grace period longer than any request:

    python -m services.gateway.blobs sweep [--grace-s 86400] [--dry-run]

The same sweep deletes uploaded slides (`PUT /v1/slide-uploads`) unused for
`MS_GATEWAY_SLIDE_UPLOAD_TTL_S`, except those an analysis has not cut into tiles yet
(`sweep_uploads`), and the slide cache's copies of object-store slides unused for
`MS_GATEWAY_SLIDE_FETCH_TTL_S` (`SlideStore.expire_fetched`).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from services.gateway.files import remove_older

log = logging.getLogger(__name__)
_HEX = frozenset("0123456789abcdef")


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in _HEX for c in sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / sha256[:2] / sha256[2:4] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put(self, data: bytes) -> tuple[str, bool]:
        """Store `data`; returns (sha256 hex, True when this call created the file).

        An existing blob gets its mtime refreshed, so a sweep running now sees it as fresh
        even before the database row that will reference it is committed."""
        sha = hashlib.sha256(data).hexdigest()
        target = self.path(sha)
        if target.is_file():
            try:
                os.utime(target)
                return sha, False
            except FileNotFoundError:  # swept between the check and the touch: write it again
                pass
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return sha, True

    def get(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()

    def blobs(self) -> Iterator[tuple[str, Path]]:
        """(sha256, path) of every stored blob (temporary files are skipped)."""
        for path in self.root.glob("??/??/*"):
            name = path.name
            if len(name) == 64 and set(name) <= _HEX and path.is_file():
                yield name, path

    def sweep(self, referenced: set[str], *, grace_s: float, dry_run: bool = False) -> list[str]:
        """Delete blobs not in `referenced` whose mtime is older than `grace_s` seconds;
        also stale `.tmp-` files of crashed writes. Returns the removed sha256s."""
        cutoff = time.time() - grace_s
        orphans = (path for sha, path in self.blobs() if sha not in referenced)
        removed = remove_older(orphans, cutoff, dry_run=dry_run)
        remove_older(self.root.glob("??/??/.tmp-*"), cutoff, dry_run=dry_run)
        return [path.name for path in removed]


def sweep_unreferenced(sessions, blobs: BlobStore, *, grace_s: float, dry_run: bool = False):
    """Remove the blobs no analysis or result references, older than `grace_s`.

    The referenced set is read before the files are listed; a blob written after that read
    is younger than the grace period, so it survives even though the set misses it."""
    from services.gateway.store import referenced_blobs

    with sessions() as session:
        referenced = referenced_blobs(session)
    return blobs.sweep(referenced, grace_s=grace_s, dry_run=dry_run)


def expire_uploads(
    root: Path,
    *,
    ttl_s: float,
    in_use: set[Path],
    tenant_dir: Path | None = None,
    dry_run: bool = False,
) -> list[Path]:
    """Delete the uploads (under `root`'s upload area, or only `tenant_dir`) whose mtime,
    set at upload and by every submission naming them (`slidestore.source_path`), is older than
    `ttl_s`, except those `in_use` (an analysis has not cut them yet); partial `.part` files
    of uploads that stopped as well. Returns the removed paths.

    Race-free with a submission for the same reason as the blob sweep: callers read
    `in_use` before listing, and a submission touches the file before it commits."""
    dirs = [tenant_dir] if tenant_dir is not None else list((root / "uploads").glob("*"))
    candidates = (p for d in dirs if d.is_dir() for p in d.glob("*") if p not in in_use)
    removed = remove_older(candidates, time.time() - ttl_s, dry_run=dry_run)
    for path in removed:
        log.info("expired slide upload %s/%s", path.parent.name, path.name)
    return removed


def sweep_uploads(sessions, root: Path, *, ttl_s: float, dry_run: bool = False) -> list[Path]:
    """Delete the uploaded slides under `root` unused for `ttl_s`, except those a queued or
    running analysis has not cut yet (read before the files are listed, as above)."""
    from services.gateway.slidestore import upload_paths
    from services.gateway.store import uploads_in_use

    with sessions() as session:
        in_use = upload_paths(root, uploads_in_use(session))
    return expire_uploads(root, ttl_s=ttl_s, in_use=in_use, dry_run=dry_run)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m services.gateway.blobs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sweep", help="delete unreferenced blobs older than the grace period")
    s.add_argument("--grace-s", type=float, default=86400.0)
    s.add_argument("--dry-run", action="store_true", help="list, do not delete")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.grace_s < 60:
        print("error: --grace-s must be at least 60 (longer than any request)", file=sys.stderr)
        return 2
    from services.gateway.config import GatewaySettings
    from services.gateway.db import make_engine, make_sessionmaker
    from services.gateway.migrations import upgrade_head

    settings = GatewaySettings()
    engine = make_engine(settings.database_url)
    upgrade_head(engine)
    sessions = make_sessionmaker(engine)
    removed = sweep_unreferenced(
        sessions, BlobStore(settings.image_root), grace_s=args.grace_s, dry_run=args.dry_run
    )
    uploads = sweep_uploads(
        sessions, settings.slide_cache_dir, ttl_s=settings.slide_upload_ttl_s, dry_run=args.dry_run
    )
    from services.gateway.slidestore import SlideStore

    copies = SlideStore.from_settings(settings).expire_fetched(dry_run=args.dry_run)
    engine.dispose()
    for sha in removed:
        print(sha)
    for path in uploads:
        print(f"upload {path.parent.name}/{path.name}")
    for path in copies:
        print(f"slide copy {path.name}")
    verb = "would remove" if args.dry_run else "removed"
    print(
        f"{verb} {len(removed)} unreferenced blobs, {len(uploads)} expired slide uploads and "
        f"{len(copies)} unused slide copies",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
