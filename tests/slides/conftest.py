"""Real slide files for the slide tests: written by the synthetic generator, read by OpenSlide."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.gateway.conftest import gateway, make_settings, spawn  # noqa: F401 - fixtures
from training.data.synth_slide import SlideSpec, write_slide

SMALL = SlideSpec(width=3072, height=2048, block=256, tile=256, levels=(1, 4, 16), seed=3)


@pytest.fixture(scope="session")
def small_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3072x2048 synthetic slide (0.5 um/px, 12x8 zone blocks) with its JSON ground truth."""
    path = tmp_path_factory.mktemp("slides") / "small.tiff"
    write_slide(path, SMALL)
    return path
