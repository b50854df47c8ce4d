"""The generator's `rbc_contact` knob: red cells touching the white cells (crowded fields
where a classical nucleus/cytoplasm split leaks into red cells)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage as ndi

from training.data.synth import main
from training.data.synth_cohort import SynthConfig, case_rng, sample_cohort
from training.data.synth_render import render_image

BASE = SynthConfig(size=(320, 240), images_per_case=1)


def _touching_fraction(config: SynthConfig) -> tuple[float, int]:
    """Fraction of nucleated cells whose 2-px ring holds red-cell pixels, and their count."""
    touched = total = 0
    for k, spec in enumerate(sample_cohort(4, 6, config)):
        _, cells = render_image(case_rng(4, k, 1), spec, config)
        h, w = config.size[1], config.size[0]
        rbc = np.zeros((h, w), bool)
        for c in cells:
            if c.code == "RBC":
                rbc |= c.full_mask(h, w)
        for c in cells:
            if c.nucleus_mask is None:
                continue
            m = c.full_mask(h, w)
            ring = ndi.binary_dilation(m, iterations=2) & ~m
            total += 1
            touched += bool((ring & rbc).any())
    return touched / max(total, 1), total


def test_rbc_contact_puts_red_cells_against_white_cells():
    off, n_off = _touching_fraction(BASE)
    on, n_on = _touching_fraction(replace(BASE, rbc_contact=3.0))
    assert n_off > 10 and n_on > 10
    assert on > off + 0.2, (off, on)
    assert on > 0.8


def test_rbc_contact_off_is_the_default_and_changes_nothing():
    assert SynthConfig().rbc_contact == 0.0
    spec = sample_cohort(2, 1, BASE)[0]
    a, cells_a = render_image(case_rng(2, 0, 1), spec, BASE)
    b, cells_b = render_image(case_rng(2, 0, 1), spec, replace(BASE, rbc_contact=0.0))
    assert np.array_equal(a, b) and len(cells_a) == len(cells_b)


def test_rbc_contact_range_is_checked(tmp_path, capsys):
    with pytest.raises(ValueError, match="rbc_contact"):
        SynthConfig(rbc_contact=-1)
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--rbc-contact", "11"])
    assert "rbc_contact" in capsys.readouterr().err
