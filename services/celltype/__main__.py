"""`python -m services.celltype`: serve the celltype model over OIP gRPC (settings: MS_CELLTYPE_*)."""

from __future__ import annotations

from services.celltype.config import CelltypeSettings
from services.celltype.model import CelltypeHandler
from services.runtime.server import run_service


def main() -> int:
    settings = CelltypeSettings()
    return run_service(lambda resolved: CelltypeHandler(resolved.local_dir, settings), settings)


if __name__ == "__main__":
    raise SystemExit(main())
