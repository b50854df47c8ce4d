"""`python -m services.ensemble`: serve the ensemble model over OIP gRPC (settings: MS_ENSEMBLE_*)."""

from __future__ import annotations

from services.ensemble.config import EnsembleSettings
from services.ensemble.model import EnsembleHandler
from services.runtime.server import run_service


def main() -> int:
    settings = EnsembleSettings()
    # registry tags carry the lineage (marrowscope.lineage.<upstream>)
    return run_service(
        lambda resolved: EnsembleHandler(resolved.local_dir, settings, tags=resolved.tags), settings
    )


if __name__ == "__main__":
    raise SystemExit(main())
