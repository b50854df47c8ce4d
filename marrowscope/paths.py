"""Where things live on disk: the project root and the shared real-data folder."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    """`../shared/data` next to the project root (env `MARROWSCOPE_SHARED_DATA` overrides).

    The folder may be absent on a user's machine; callers check `.is_dir()` and skip.
    """
    env = os.environ.get("MARROWSCOPE_SHARED_DATA")
    if env:
        return Path(env)
    return PROJECT_ROOT.parent / "shared" / "data"
