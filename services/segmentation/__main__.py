"""`python -m services.segmentation`: serve the segmentation model over OIP gRPC (settings: MS_SEGMENTATION_*)."""

from __future__ import annotations

from services.runtime.server import run_service
from services.segmentation.config import SegmentationSettings
from services.segmentation.model import SegmentationHandler


def main() -> int:
    settings = SegmentationSettings()
    return run_service(lambda resolved: SegmentationHandler(resolved.local_dir, settings), settings)


if __name__ == "__main__":
    raise SystemExit(main())
