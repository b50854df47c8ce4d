"""`python -m services.segmentation`: serve the segmentation model (cell boxes + morphometrics) over OIP gRPC.

Settings come from `MS_SEGMENTATION_*` environment variables; `--help` lists them.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.runtime.cli import service_main
from services.segmentation.config import SegmentationSettings


def build(settings: SegmentationSettings, resolved):
    """An unloaded handler for the registry's model (imported here: `--help` stays cheap)."""
    from services.segmentation.model import SegmentationHandler as handler

    return handler(resolved.local_dir, settings)


def main(argv: Sequence[str] | None = None) -> int:
    return service_main(
        SegmentationSettings,
        build,
        argv,
        "Serve the segmentation model (cell boxes + morphometrics) over the Open Inference Protocol (gRPC).",
    )


if __name__ == "__main__":
    raise SystemExit(main())
