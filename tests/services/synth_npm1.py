"""A tiny npm1 model trained on synthetic smears in seconds, for explanation tests.

Stand-in task: NPM1-mutated AML images (20-95 % blasts with cup-like nuclei and condensed
chromatin) against control images (0-5 % blasts), so the evidence the model should learn is
in the blasts. Soft targets (0.1 / 0.9) keep P(NPM1) away from saturation, where occluding
a cell could not move it. Figures from this model are synthetic and functional evidence only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

HEIGHT, WIDTH = 144, 192


@dataclass(frozen=True)
class SynthImage:
    image: np.ndarray  # uint8[H, W, 3]
    boxes: np.ndarray  # float32[N, 4] x1, y1, x2, y2 pixels, every annotated cell
    blast_mask: np.ndarray  # bool[H, W], union of the blast cell masks


def render(label: str, npm1: str, n: int, seed: int) -> list[SynthImage]:
    """``n`` images of one group (``("aml", "mutated")`` or ``("control", "na")``)."""
    from training.data.synth_cohort import SynthConfig, case_rng, sample_case
    from training.data.synth_render import render_image

    config = SynthConfig(size=(WIDTH, HEIGHT), um_per_px=0.27 * 640 / WIDTH)
    out = []
    for i in range(n):
        rng = case_rng(seed, i)
        image, cells = render_image(rng, sample_case(rng, i, label, npm1, config), config)
        boxes = np.array(
            [[c.bbox[0], c.bbox[1], c.bbox[0] + c.bbox[2], c.bbox[1] + c.bbox[3]] for c in cells],
            np.float32,
        ).reshape(-1, 4)
        mask = np.zeros((HEIGHT, WIDTH), bool)
        for c in cells:
            if c.code == "BLA":
                mask |= c.full_mask(HEIGHT, WIDTH)
        out.append(SynthImage(image, boxes, mask))
    return out


def train_tiny_npm1(
    directory: Path, *, n_per_class: int = 16, epochs: int = 5, seed: int = 0
) -> Path:
    """Train resnet18 at 144x192 (about 25 s on one core) and save it to ``directory``;
    ``epochs=0`` saves the untrained network (the control of the pointing game)."""
    import torch

    from marrowscope.models import build_model, make_config, save_model

    positives = render("aml", "mutated", n_per_class, seed + 1)
    negatives = render("control", "na", n_per_class, seed + 2)
    x = torch.from_numpy(np.stack([s.image for s in positives + negatives]))
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    y = torch.tensor([0.9] * len(positives) + [0.1] * len(negatives))
    config = make_config(
        "npm1",
        "resnet18",
        input_size=[HEIGHT, WIDTH],
        training={"note": "synthetic stand-in for explanation tests"},
    )
    torch.manual_seed(seed)
    model = build_model(config)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), 8):
            idx = order[start : start + 8]
            batch = x[idx].flip(-1) if start % 16 else x[idx]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), y[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()
    return save_model(model, config, directory)
