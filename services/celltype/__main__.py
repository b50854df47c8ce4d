"""`python -m services.celltype`: serve the celltype model (per-cell types and attributes) over OIP gRPC.

Settings come from `MS_CELLTYPE_*` environment variables; `--help` lists them.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.celltype.config import CelltypeSettings
from services.runtime.cli import service_main


def build(settings: CelltypeSettings, resolved):
    """An unloaded handler for the registry's model (imported here: `--help` stays cheap)."""
    from services.celltype.model import CelltypeHandler as handler

    return handler(resolved.local_dir, settings)


def main(argv: Sequence[str] | None = None) -> int:
    return service_main(
        CelltypeSettings,
        build,
        argv,
        "Serve the celltype model (per-cell types and attributes) over the Open Inference Protocol (gRPC).",
    )


if __name__ == "__main__":
    raise SystemExit(main())
