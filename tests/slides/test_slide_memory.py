"""`bench.slide_memory` on two small synthetic slides: reading and tiling costs memory
bounded by tiles and regions, not by the slide (the 8k and 16k figures are in
bench/results/slide_memory.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.slide_memory import markdown, measure


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_reading_memory_does_not_follow_the_slide_size(tmp_path: Path) -> None:
    result = measure(tmp_path, ((2048, 1536), (4096, 3072)), tile=512)
    small, large = result["rows"]
    assert large["tiles"] == 48 and large["regions_scored"] == 48
    # a whole level 0 decoded would alone cost its RGBA size (48 MiB here)
    assert large["tiling_growth_mib"] < large["level0_rgba_mib"]
    # 4x the pixels, far less than the 36 MiB more a decoded level 0 would take
    assert large["read_growth_mib"] - small["read_growth_mib"] < (
        large["level0_rgba_mib"] - small["level0_rgba_mib"]
    )
    assert large["write_growth_mib"] < large["level0_rgba_mib"]  # the writer streams tiles
    assert "4096x3072" in markdown(result)
    assert not list(tmp_path.glob("*.tiff"))  # slides are removed once measured
