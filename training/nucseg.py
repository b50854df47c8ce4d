"""Train the learned nucleus/cytoplasm split (`marrowscope.models.nucseg`, a small U-Net).

    python -m training.nucseg --data ../shared/data/wbc-seg --output runs/nucseg --config cpu-demo

Two domains, each scored against the classical split on the same cells:

- **wbc-seg** (`--data`, 300 expert-masked white cells, 120x120, no patient ids): k-fold
  cross-validation **by image** (config `cv_folds`); each fold's model trains on the other
  folds plus the synthetic training cells and is scored on its held-out images.
- **synthetic crowded** (always; SYNTHETIC data): cells rendered in memory by the generator
  with `crowding` and `rbc_contact` (red cells touching the white cell, which the white
  cell covers). Training cells come from cases of seed `synth_seed`, test cells from a
  disjoint seed; crops are cut by `box_window` around the true box (random margin and
  jitter for training, the service's margin 0.15 for testing).

Another scanner (issue 23 §4): each fold's held-out wbc-seg cells are also scored under
every shift of `training.shifts` (background, stain, contrast, blur, defocus, JPEG, pixel
size), for the classical split and the net's cell with each nucleus source, including the
per-cell "combined" rule whose threshold is measured on the fold's own training cells
(`training.nucseg_shift`). Training never sees those fixed shifts; with config
`robust_augment` it sees random ones of the same families.

The served model trains on all wbc-seg images plus the synthetic training cells. Without
`--data` (the folder is absent on a fresh machine) the job trains and reports on synthetic
cells only and says so. Augmentation (training only): flips, 90-degree turns, zoom/shift,
and stain jitter (per-channel gain/gamma, a random near-identity colour mix: another
scanner's colours); with `robust_augment` also `nucseg_shift.random_scanner`. Loss:
cross-entropy + soft Dice on the cell and the nucleus.

`--cv-only --folds N` is the measurement mode: the first N folds of the CV only, no served
model, nothing registered.

Registered metrics (gated by `training.promote`): `cell_dice`, `nucleus_dice` (worst
domain's median) and `nc_abs_err` (worst domain's median |N:C error|), plus the same per
domain (`wbcseg_cv_*`, `synth_*`) and the classical split's (`classical_*`).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from training.cli import JobConfig, UsageError, job_config, job_parser, run_main
from training.engine import AmpStep, device_and_amp, progress, seed_everything
from training.tracking import finish, mlflow_run

log = logging.getLogger(__name__)
JOB = "nucseg"
KIND = "nucseg"
SERVICE_MARGIN = 0.15


class Cells:
    """Cell crops with ground truth: `crops` uint8 [h, w, 3], `labels` uint8 [h, w] (0 bg,
    1 cytoplasm, 2 nucleus), `centres` (y, x) of the wanted cell or None, `ids`, `classes`."""

    def __init__(self) -> None:
        self.crops: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.centres: list[tuple[float, float] | None] = []
        self.ids: list[str] = []
        self.classes: list[str] = []

    def add(self, crop, label, centre, cell_id, cls) -> None:
        self.crops.append(crop)
        self.labels.append(label)
        self.centres.append(centre)
        self.ids.append(cell_id)
        self.classes.append(cls)

    def subset(self, index) -> Cells:
        out = Cells()
        for i in index:
            out.add(self.crops[i], self.labels[i], self.centres[i], self.ids[i], self.classes[i])
        return out

    def __len__(self) -> int:
        return len(self.crops)


def load_wbc_seg(data_dir: Path) -> Cells:
    """Every image of the wbc-seg folder with its expert mask (255 nucleus, 128 cytoplasm)."""
    from PIL import Image

    from training.evaluate_morphometrics import NUCLEUS_VALUE, wbc_seg_labels

    labels = wbc_seg_labels(data_dir)
    cells = Cells()
    images = sorted((data_dir / "images").glob("*.png"))
    if not images:
        raise UsageError(f"no images/*.png under {data_dir} (expected the wbc-seg folder)")
    for path in images:
        with Image.open(path) as im:
            crop = np.asarray(im.convert("RGB"))
        with Image.open(data_dir / "masks" / path.name) as im:
            mask = np.asarray(im.convert("L"))
        label = np.where(mask == NUCLEUS_VALUE, 2, np.where(mask > 0, 1, 0)).astype(np.uint8)
        cells.add(crop, label, None, path.stem, labels.get(path.stem, "unknown"))
    return cells


def synthetic_cells(
    *, seed: int, cases: int, crowding: float, rbc_contact: float, train: bool, rng=None
) -> Cells:
    """Nucleated cells of `cases` generator cases rendered in memory (SYNTHETIC).

    train: random margin (0.05-0.35) and box jitter (+-8 % of the size), as a detector's
    boxes vary; else the service's margin and the true box.
    """
    from marrowscope.morphometrics import box_window
    from marrowscope.taxonomy import NON_NUCLEATED_DETECTOR_LABELS
    from training.data.synth_cohort import SynthConfig, case_rng, sample_cohort
    from training.data.synth_render import render_image

    config = SynthConfig(crowding=crowding, rbc_contact=rbc_contact)
    rng = rng or np.random.default_rng(seed)
    cells = Cells()
    for k, spec in enumerate(sample_cohort(seed, cases, config)):
        image, instances = render_image(case_rng(seed, k, 7), spec, config)
        height, width = hw = image.shape[:2]
        for j, inst in enumerate(instances):
            if inst.nucleus_mask is None or inst.code in NON_NUCLEATED_DETECTOR_LABELS:
                continue
            x, y, w, h = inst.bbox
            box = np.array([x, y, x + w, y + h], dtype=np.float64)
            margin = SERVICE_MARGIN
            if train:
                box += rng.uniform(-0.08, 0.08, 4) * np.array([w, h, w, h])
                margin = float(rng.uniform(0.05, 0.35))
            window = box_window(hw, box, margin)
            if window is None:
                continue
            (y0, y1, x0, x1), centre = window
            cell = inst.full_mask(height, width)[y0:y1, x0:x1]
            nucleus = inst.full_mask(height, width, nucleus=True)[y0:y1, x0:x1]
            label = np.where(nucleus, 2, np.where(cell, 1, 0)).astype(np.uint8)
            cells.add(image[y0:y1, x0:x1], label, centre, f"{seed}-{k}-{j}", inst.code)
    return cells


def to_tensors(cells: Cells, size: tuple[int, int]):
    """(FloatTensor[N, 3, *size] in [0, 1], LongTensor[N, *size] labels, nearest)."""
    import torch
    from torch.nn import functional as F

    from marrowscope.models.nucseg import crops_to_batch

    x = crops_to_batch(cells.crops, size)
    y = torch.stack(
        [
            F.interpolate(torch.from_numpy(lab)[None, None].float(), size=size, mode="nearest")[
                0, 0
            ]
            for lab in cells.labels
        ]
    ).long()
    return x, y


def augment(x, y, gen, *, scanner: bool = False):
    """Flips, 90-degree turns, zoom/shift (labels nearest) and stain jitter, per batch;
    `scanner`: random other-scanner shifts on top (`nucseg_shift.random_scanner`)."""
    import torch
    from torch.nn import functional as F

    b = x.shape[0]
    if torch.rand(1, generator=gen) < 0.5:
        x, y = x.flip(-1), y.flip(-1)
    if torch.rand(1, generator=gen) < 0.5:
        x, y = x.flip(-2), y.flip(-2)
    k = int(torch.randint(0, 4, (1,), generator=gen))
    x, y = torch.rot90(x, k, (-2, -1)), torch.rot90(y, k, (-2, -1))
    scale = torch.empty(b).uniform_(0.8, 1.2, generator=gen)
    shift = torch.empty(b, 2).uniform_(-0.08, 0.08, generator=gen)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    y = F.grid_sample(
        y[:, None].float(), grid, mode="nearest", padding_mode="border", align_corners=False
    )[:, 0].long()
    # stain: gamma, per-channel gain, a near-identity colour mix, brightness
    gamma = torch.empty(b, 1, 1, 1).uniform_(0.7, 1.4, generator=gen)
    x = x.clamp_min(1e-4) ** gamma
    mix = torch.eye(3) + torch.empty(b, 3, 3).uniform_(-0.12, 0.12, generator=gen)
    x = torch.einsum("bij,bjhw->bihw", mix, x)
    gain = torch.empty(b, 3, 1, 1).uniform_(0.85, 1.15, generator=gen)
    bias = torch.empty(b, 1, 1, 1).uniform_(-0.06, 0.06, generator=gen)
    x = (x * gain + bias).clamp(0, 1)
    if scanner:
        from training.nucseg_shift import random_scanner

        x = random_scanner(x, gen)
    return x, y


def loss_fn(logits, y):
    """Cross-entropy + soft Dice of the cell (classes 1+2) and of the nucleus (class 2)."""
    from torch.nn import functional as F

    ce = F.cross_entropy(logits, y)
    p = logits.softmax(1)
    terms = []
    for prob, truth in ((p[:, 1] + p[:, 2], (y > 0).float()), (p[:, 2], (y == 2).float())):
        inter = (prob * truth).sum((1, 2))
        terms.append(1 - ((2 * inter + 1) / (prob.sum((1, 2)) + truth.sum((1, 2)) + 1)).mean())
    return ce + sum(terms) / 2


def train_model(cfg: JobConfig, train_cells: Cells, device, *, seed: int):
    """A `NucSegNet` trained for `epochs` x `steps_per_epoch` AdamW steps (cosine LR).
    Returns (module in eval mode, model config, seconds)."""
    import torch

    from marrowscope.models import build_model, make_config

    seed_everything(seed)
    model_config = make_config(
        "nucseg",
        "unet",
        input_size=list(cfg["input_size"]),
        base_channels=cfg["base_channels"],
        depth=cfg["depth"],
    )
    model = build_model(model_config).to(device)
    x_all, y_all = to_tensors(train_cells, tuple(cfg["input_size"]))
    gen = torch.Generator().manual_seed(seed)
    steps = cfg["epochs"] * cfg["steps_per_epoch"]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], total_steps=steps)
    optimizer_step = AmpStep(opt, amp=False)
    t0 = time.perf_counter()
    model.train()
    running = 0.0
    for step in progress(range(steps), desc="nucseg steps"):
        idx = torch.randint(0, len(x_all), (cfg["batch_size"],), generator=gen)
        x, y = augment(x_all[idx], y_all[idx], gen, scanner=cfg.get("robust_augment", False))
        value = optimizer_step(loss_fn(model(x.to(device)), y.to(device)))
        sched.step()
        running = 0.9 * running + 0.1 * value if step else value
        if (step + 1) % cfg["steps_per_epoch"] == 0:
            log.info("step %d/%d loss %.4f", step + 1, steps, running)
    model.eval()
    return model, model_config, time.perf_counter() - t0


def score(cells: Cells, splitter=None) -> list[dict]:
    """One record per cell (`training.evaluate_morphometrics.compare` keys + `class`) for
    the learned split (`splitter`) or the classical one (None)."""
    from training.evaluate_morphometrics import compare

    out = []
    for i in range(len(cells)):
        lab = cells.labels[i]
        rec = compare(cells.crops[i], lab > 0, lab == 2, cells.centres[i], splitter=splitter)
        out.append({"id": cells.ids[i], "class": cells.classes[i], **rec})
    return out


def _summary(records: list[dict], dataset: str, synthetic: bool) -> dict:
    from training.evaluate_morphometrics import summarise

    return summarise(records, dataset=dataset, synthetic=synthetic)


NUCLEUS_SOURCES = ("learned", "classical", "combined")


def _splitter(module, model_config, nucleus_source: str = "learned"):
    from marrowscope.models.nucseg import LearnedSplitter

    config = {**model_config, "nucleus_source": nucleus_source}
    return LearnedSplitter(module, config, device="cpu")


def _calibrate(cells: Cells, module, model_config, *, seed: int) -> dict:
    """Measure the combined rule's threshold on `cells` (the model's training cells) and
    set it in `model_config`; returns the measurement."""
    from training.nucseg_shift import calibrate_confidence

    threshold, by_threshold = calibrate_confidence(
        cells, _splitter(module, model_config), seed=seed
    )
    model_config["nucleus_confidence_min"] = threshold
    log.info("combined nucleus: confidence threshold %.2f (%s)", threshold, by_threshold)
    return {"threshold": threshold, "nucleus_dice_by_threshold": by_threshold}


def _score_all(cells: Cells, module, model_config) -> dict[str, list[dict]]:
    """Records of every split on the same cells: learned cell with each nucleus source,
    and the classical split."""
    out = {
        f"learned_{n}": score(cells, _splitter(module, model_config, n)) for n in NUCLEUS_SOURCES
    }
    out["classical"] = score(cells)
    return out


def get_args_parser() -> argparse.ArgumentParser:
    p = job_parser(JOB, __doc__)
    p.add_argument(
        "--no-cv", action="store_true", help="skip the wbc-seg cross-validation (faster)"
    )
    p.add_argument(
        "--folds",
        type=int,
        default=None,
        help="train and score only the first N folds of the CV (a quicker measurement)",
    )
    p.add_argument(
        "--cv-only",
        action="store_true",
        help="a measurement: stop after the CV (no served model, no synthetic domain, "
        "nothing registered; needs --data and --no-register)",
    )
    return p


def _check_flags(args: argparse.Namespace) -> None:
    if args.hpo_trials:
        raise UsageError("--hpo-trials is not supported by the nucseg job")
    if args.data is not None and not (args.data / "masks").is_dir():
        raise UsageError(f"--data {args.data} has no masks/ (expected the wbc-seg folder)")
    if args.folds is not None and args.folds < 1:
        raise UsageError(f"--folds must be at least 1, got {args.folds}")
    if args.cv_only and (args.data is None or args.no_cv or not args.no_register):
        raise UsageError("--cv-only needs --data, the CV (no --no-cv) and --no-register")


def main(args: argparse.Namespace) -> dict[str, float]:
    cfg = job_config(JOB, args, needs_data=False, check=_check_flags)
    device, _ = device_and_amp(args.device, False)
    if cfg["threads"] > 0:
        import torch

        # one thread trains ~8x faster than two on a CPU shared with other jobs (measured)
        torch.set_num_threads(cfg["threads"])
    t_start = time.perf_counter()
    synth = dict(crowding=cfg["synth_crowding"], rbc_contact=cfg["synth_rbc_contact"])
    synth_train = synthetic_cells(
        seed=cfg["synth_seed"], cases=cfg["synth_train_cases"], train=True, **synth
    )
    synth_test = synthetic_cells(
        seed=cfg["synth_seed"] + 1000, cases=cfg["synth_test_cases"], train=False, **synth
    )
    wbc = load_wbc_seg(args.data) if args.data is not None else None
    if wbc is None:
        log.warning("no --data: wbc-seg absent, training and reporting on synthetic cells only")
    log.info(
        "cells: synthetic train %d, synthetic test %d, wbc-seg %d",
        len(synth_train),
        len(synth_test),
        0 if wbc is None else len(wbc),
    )
    results: dict[str, Any] = {"domains": {}, "seconds": {}, "calibration": {}}
    with mlflow_run(args, JOB, cfg) as run:
        if wbc is not None and not args.no_cv:
            _cross_validate(cfg, args, wbc, synth_train, device, results)
        module = model_config = None
        if not args.cv_only:
            train_cells = synth_train if wbc is None else _concat(wbc, synth_train)
            module, model_config, secs = train_model(cfg, train_cells, device, seed=cfg["seed"])
            results["seconds"]["final"] = round(secs, 1)
            results["calibration"]["final"] = _calibrate(
                synth_train if wbc is None else wbc, module, model_config, seed=cfg["seed"]
            )
            results["domains"]["synth_crowded"] = {
                split: _summary(recs, "synthetic crowded test cells", True)
                for split, recs in _score_all(synth_test, module, model_config).items()
            }
        results["seconds"]["total"] = round(time.perf_counter() - t_start, 1)
        source = _pick_nucleus_source(results["domains"], results.get("shifted"))
        results["nucleus_source"] = source
        metrics = _metrics(results["domains"], source, results.get("shifted"))
        results["metrics"] = metrics
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / "nucseg_results.json").write_text(json.dumps(results, indent=2))
        import mlflow

        mlflow.log_dict(results, "nucseg_results.json")
        if module is not None and model_config is not None:
            model_config["nucleus_source"] = source
            model_config["training"] = {
                "data": "wbc-seg + synthetic crowded" if wbc is not None else "synthetic crowded",
                "trained_on": "wbc-seg+synthetic" if wbc is not None else "synthetic",
                "cv_folds": cfg["cv_folds"] if wbc is not None and not args.no_cv else 0,
                "seconds": results["seconds"],
            }
            finish(
                kind=KIND,
                args=args,
                run=run,
                model=module,
                model_config=model_config,
                metrics=metrics,
                config=cfg,
                data_digest=_data_digest(args.data, cfg),
            )
    print(json.dumps({"metrics": metrics, "nucleus_source": source, "seconds": results["seconds"]}))
    return metrics


def _cross_validate(
    cfg: JobConfig,
    args: argparse.Namespace,
    wbc: Cells,
    synth_train: Cells,
    device,
    results: dict[str, Any],
) -> None:
    """wbc-seg k-fold CV by image (the first `--folds` folds when given): per fold, train,
    measure the combined rule's threshold on the fold's training cells, score the held-out
    cells with every split, unshifted and under every shift. Fills `results`."""
    from sklearn.model_selection import KFold

    from training.nucseg_shift import shifted_records, summarise_shifts

    pooled: dict[str, list[dict]] = {}
    shifted: dict[str, dict[str, list[dict]]] = {}
    folds = KFold(cfg["cv_folds"], shuffle=True, random_state=cfg["split_seed"])
    run_folds = list(folds.split(np.arange(len(wbc))))[: args.folds or cfg["cv_folds"]]
    for f, (tr, te) in enumerate(run_folds):
        train_cells = _concat(wbc.subset(tr), synth_train)
        module, mcfg, secs = train_model(cfg, train_cells, device, seed=cfg["seed"] + f)
        results["seconds"][f"fold{f}"] = round(secs, 1)
        calibration = _calibrate(wbc.subset(tr), module, mcfg, seed=cfg["seed"] + f)
        results["calibration"][f"fold{f}"] = calibration
        if args.cv_only:  # a measurement keeps its fold models, to score them again later
            from marrowscope.models import save_model

            save_model(
                module,
                {**mcfg, "nucleus_confidence_min": calibration["threshold"]},
                args.output / f"fold{f}",
            )
        for split, recs in _score_all(wbc.subset(te), module, mcfg).items():
            pooled.setdefault(split, []).extend(recs)
        by_split = shifted_records(
            wbc.subset(te), _splitter(module, mcfg), calibration["threshold"]
        )
        for split, by_shift in by_split.items():
            for name, recs in by_shift.items():
                shifted.setdefault(split, {}).setdefault(name, []).extend(recs)
        log.info("fold %d/%d trained in %.0f s", f + 1, len(run_folds), secs)
    dataset = f"wbc-seg {cfg['cv_folds']}-fold CV by image"
    if len(run_folds) < cfg["cv_folds"]:
        dataset += f", first {len(run_folds)} fold(s) only"
    results["domains"]["wbcseg_cv"] = {
        split: _summary(recs, dataset, False) for split, recs in pooled.items()
    }
    results["shifted"] = {
        "wbcseg_cv": {
            split: summarise_shifts(by_shift, dataset) for split, by_shift in shifted.items()
        }
    }


def _concat(a: Cells, b: Cells) -> Cells:
    out = Cells()
    for c in (a, b):
        for i in range(len(c)):
            out.add(c.crops[i], c.labels[i], c.centres[i], c.ids[i], c.classes[i])
    return out


#: how far below the best unshifted nucleus Dice a source may be and still be served for
#: its figures under shifts (about the fold-to-fold noise of the median on 300 cells)
UNSHIFTED_SLACK = 0.005


def _pick_nucleus_source(
    domains: dict[str, dict[str, dict]], shifted: dict[str, dict[str, dict]] | None = None
) -> str:
    """The nucleus source to serve. Without shifted figures: the better worst-domain median
    nucleus Dice (the bar is "nucleus Dice no worse than the classical split"). With them:
    among the sources within `UNSHIFTED_SLACK` of that best (another scanner must not cost
    the unshifted figures), the one with the best sum of the mean and the worst over the
    shifts of the median nucleus Dice (a typical other scanner and the hardest one count
    alike). Ties keep the learned nucleus."""

    def worst(source: str) -> float:
        return min(d[f"learned_{source}"]["nucleus_dice_median"] for d in domains.values())

    if not shifted:
        return max(NUCLEUS_SOURCES, key=lambda s: (worst(s), s == "learned"))
    best = max(worst(s) for s in NUCLEUS_SOURCES)
    keep = [s for s in NUCLEUS_SOURCES if worst(s) >= best - UNSHIFTED_SLACK]

    def under_shifts(source: str) -> tuple[float, bool]:
        over = [d[f"learned_{source}"]["over_shifts"]["nucleus_dice"] for d in shifted.values()]
        total = min(o["mean"] for o in over) + min(o["worst"] for o in over)
        return round(total, 4), source == "learned"

    return max(keep, key=under_shifts)


def _metrics(
    domains: dict[str, dict[str, dict]],
    source: str,
    shifted: dict[str, dict[str, dict]] | None = None,
) -> dict[str, float]:
    """Per-domain medians of the served split (`learned_<source>`) and the classical one,
    and the worst domain's as the gated `cell_dice`, `nucleus_dice`, `nc_abs_err` (a model
    must be good on every domain, not on average); with shifted figures also their mean
    and worst over the shifts (`wbcseg_cv_shift_mean_*`, `wbcseg_cv_shift_worst_*`)."""
    metrics: dict[str, float] = {}
    for name, by_split in (shifted or {}).items():
        for split, prefix in ((f"learned_{source}", ""), ("classical", "classical_")):
            for key, fold in by_split[split]["over_shifts"].items():
                for stat in ("mean", "worst"):
                    metrics[f"{prefix}{name}_shift_{stat}_{key}"] = fold[stat]
    short = {"wbcseg_cv": "wbcseg_cv", "synth_crowded": "synth"}
    for name, by_split in domains.items():
        for split, prefix in ((f"learned_{source}", ""), ("classical", "classical_")):
            for key in ("cell_dice", "nucleus_dice", "nc_abs_err"):
                metrics[f"{prefix}{short[name]}_{key}"] = by_split[split][f"{key}_median"]
    learned = [n for n in domains]
    metrics["cell_dice"] = min(metrics[f"{short[n]}_cell_dice"] for n in learned)
    metrics["nucleus_dice"] = min(metrics[f"{short[n]}_nucleus_dice"] for n in learned)
    metrics["nc_abs_err"] = max(metrics[f"{short[n]}_nc_abs_err"] for n in learned)
    return metrics


def _data_digest(data_dir: Path | None, cfg: JobConfig) -> str:
    """sha256 over the wbc-seg masks (names and bytes) and the synthetic settings."""
    import hashlib

    h = hashlib.sha256(
        json.dumps({k: cfg[k] for k in cfg.values if k.startswith("synth_")}).encode()
    )
    if data_dir is not None:
        for p in sorted((data_dir / "masks").glob("*.png")):
            h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


if __name__ == "__main__":
    run_main(main, get_args_parser())
