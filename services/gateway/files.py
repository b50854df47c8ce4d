"""File housekeeping shared by the blob store (`blobs`) and the slide cache (`slidestore`)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


def remove_older(paths: Iterable[Path], cutoff: float, *, dry_run: bool = False) -> list[Path]:
    """Unlink those of `paths` last modified before `cutoff` (epoch seconds); a file removed
    or rewritten meanwhile is skipped. Returns the removed (with `dry_run`: would remove)."""
    removed = []
    for path in paths:
        try:
            if path.stat().st_mtime >= cutoff:
                continue
            if not dry_run:
                path.unlink()
        except FileNotFoundError:
            continue
        removed.append(path)
    return removed
