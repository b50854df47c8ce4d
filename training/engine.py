"""The training engine shared by the jobs: seeding, device and mixed precision, the
optimiser step, checkpoint/resume, the epoch loop and progress logging.

A job builds its data, model, loss and metrics and hands them here (as torchvision's
detection references keep `engine.py` beside `train.py`):

    seed_everything(seed)
    device, amp = device_and_amp(args.device, config["amp"])
    model = build_for_training(model_config, device)
    step = AmpStep(optimizer, amp=amp)

    def train_epoch(epoch: int) -> float:
        loader = epoch_loader(dataset, batch_size=8, seed=seed, epoch=epoch)
        return train_batches(loader, loss_of, step, desc=f"epoch {epoch + 1}")

    fit(model=model, step=step, scheduler=scheduler, epochs=n, train_epoch=train_epoch, ...)

`fit` resumes from `<output>/checkpoint.pt` and logs one line per epoch; `progress` (used
by `train_batches`) adds a line inside a long loop once `PROGRESS_INTERVAL_S` seconds have
passed since the last one, when stderr is not a terminal (Kubernetes Job logs, CI).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

import numpy as np

from training.cli import UsageError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
PROGRESS_INTERVAL_S = 30.0
"""Seconds between progress lines of a loop wrapped in `progress` (stderr not a terminal)."""

T = TypeVar("T")
P = TypeVar("P")

# ---------------------------------------------------------------- seeding


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) global generators."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator that orders (shuffles, samples) epoch `epoch`'s batches: a function of
    the seed and the epoch only, so a resumed run draws the same batches."""
    import torch

    return torch.Generator().manual_seed(seed * 7919 + epoch)


# ---------------------------------------------------------------- device and the step


def device_and_amp(setting: str, amp: bool) -> tuple[torch.device, bool]:
    """(device, use mixed precision): AMP only on CUDA and only when the config asks."""
    from marrowscope.inference import select_device

    device = select_device(setting)
    return device, bool(amp) and device.type == "cuda"


class WeightEMA:
    """An exponential moving average of a module's floating-point weights and buffers,
    updated after every optimiser step (`AmpStep(..., ema=...)`).

    Why: the last weights of a run carry the noise of its last batches; their average over
    the last few hundred steps is a flatter, steadier model (Polyak averaging, as timm's
    ModelEmaV2). The decay ramps up as `min(decay, (1 + n) / (10 + n))` after n updates, so
    the average does not remember the random initialisation. Validation and the saved
    model use the average (`fit`); the optimiser keeps training the raw weights."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise UsageError(f"weight_ema must be in (0, 1), got {decay}")
        self.model = model
        self.decay = decay
        self.updates = 0
        self.shadow = {
            k: v.detach().clone()
            for k, v in model.state_dict().items()
            if v.dtype.is_floating_point
        }

    def update(self) -> None:
        import torch

        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                if k in self.shadow:
                    self.shadow[k].lerp_(v.detach(), 1.0 - d)
        self.updates += 1

    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        """The module holds the average inside the block, its raw weights again after."""
        state = self.model.state_dict()
        raw = {k: state[k].detach().clone() for k in self.shadow}
        self.model.load_state_dict(self.shadow, strict=False)
        try:
            yield
        finally:
            self.model.load_state_dict(raw, strict=False)

    def apply(self) -> None:
        """Leave the average in the module (the end of training)."""
        self.model.load_state_dict(self.shadow, strict=False)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)


class AmpStep:
    """One optimiser step per loss: fp16 autocast + GradScaler when `amp` (CUDA), plain
    backward/step otherwise. `steps` counts the steps taken by this object; with `ema`
    (a `WeightEMA` of the trained module), the average is updated after each step."""

    def __init__(self, optimizer: Any, *, amp: bool, ema: WeightEMA | None = None) -> None:
        import torch

        self.optimizer = optimizer
        self.amp = amp
        self.scaler = torch.amp.GradScaler("cuda") if amp else None
        self.steps = 0
        self.ema = ema

    def autocast(self):
        """The context the forward pass and the loss run in (fp16 on CUDA with `amp`)."""
        import torch

        from marrowscope.inference import autocast_context

        if self.amp:
            return autocast_context(torch.device("cuda"), "fp16")
        return autocast_context(torch.device("cpu"), "none")

    def __call__(self, loss: torch.Tensor) -> float:
        """Backward and optimiser step on `loss` (a scalar tensor); returns its value."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.steps += 1
        if self.ema is not None:
            self.ema.update()
        return loss.item()


def build_for_training(
    model_config: dict[str, Any], device: torch.device, init_weights: str | None = None
) -> torch.nn.Module:
    """The module of `model_config` on `device`; with `init_weights` (a weights file, e.g.
    ImageNet), its backbone starts from those tensors (`load_initial_weights`)."""
    from marrowscope.models import build_model

    model = build_model(model_config)
    if init_weights:
        from marrowscope.models.weights import load_initial_weights

        load_initial_weights(model, model_config, init_weights, scope="backbone")
    return model.to(device)


def unsaved_predictor(
    cls: Callable[..., P],
    model: torch.nn.Module,
    model_config: dict[str, Any],
    device: torch.device,
    amp: bool,
) -> P:
    """A serving predictor class (`Detector`, `CellTyper`, `Npm1Predictor`) around the model
    being trained, so validation runs the serving code path; it has no saved digest."""
    from marrowscope.models import LoadedModel

    loaded = LoadedModel(module=model, config=model_config, digest="0" * 64, directory=Path("."))
    return cls(loaded, device=device.type, autocast="fp16" if amp else "none")


def epoch_loader(
    dataset: Any, *, batch_size: int, seed: int, epoch: int, **kwargs: Any
) -> torch.utils.data.DataLoader[Any]:
    """A DataLoader over a map-style `dataset` shuffled by `epoch_generator(seed, epoch)`;
    `kwargs` go to the DataLoader (collate_fn, num_workers, drop_last)."""
    import torch

    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        generator=epoch_generator(seed, epoch),
        **kwargs,
    )


def train_batches(
    batches: Iterable[T],
    loss_of: Callable[[T], torch.Tensor],
    step: AmpStep,
    *,
    desc: str,
    limit: int = 0,
    total: int | None = None,
) -> float:
    """Mean loss over the batches (at most `limit`, 0 = all): `loss_of(batch)` under the
    step's autocast, then `step`. Work that must not run in fp16 (augmentation) belongs in
    the `batches` iterable, which is advanced outside the autocast context. `total`
    (for progress) defaults to the batches' length, capped at `limit`."""
    if total is None and hasattr(batches, "__len__"):
        total = min(limit, len(batches)) if limit else len(batches)  # type: ignore[arg-type]
    loss_sum, n = 0.0, 0
    for batch in progress(batches, desc=desc, total=total):
        if limit and n >= limit:
            break
        with step.autocast():
            loss = loss_of(batch)
        loss_sum += step(loss)
        n += 1
    return loss_sum / max(n, 1)


# ---------------------------------------------------------------- checkpoints


def _rng_state() -> dict[str, Any]:
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],  # type: ignore[attr-defined]
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import torch

    random.setstate(tuple(tuple(v) if isinstance(v, list) else v for v in state["python"]))
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    path: Path,
    *,
    epoch: int,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    scaler: Any,
    history: list[dict[str, float]],
    config: dict[str, Any],
    ema: WeightEMA | None = None,
) -> None:
    """Everything needed to continue after `epoch` (0-based, completed), written atomically.
    Loaded with `torch.load(weights_only=True)`: tensors and plain containers only."""
    import torch

    state = {
        "ema": ema.state_dict() if ema is not None else None,
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": _rng_state(),
        "history": history,
        "config": json.dumps(config, sort_keys=True),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, config: dict[str, Any]) -> dict[str, Any]:
    import torch

    if not path.is_file():
        raise UsageError(f"--resume: no checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = json.loads(state["config"])
    changed = sorted(
        k for k in set(saved) | set(config) if k != "epochs" and saved.get(k) != config.get(k)
    )
    if changed:
        raise UsageError(f"--resume: config differs from the checkpoint's in {changed}")
    return state


# ---------------------------------------------------------------- the epoch loop


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)
    start_epoch: int = 0
    seconds: float = 0.0


def fit(
    *,
    model: torch.nn.Module,
    step: AmpStep,
    scheduler: Any,
    epochs: int,
    train_epoch: Callable[[int], float],
    validate: Callable[[int], dict[str, float]] | None,
    output: Path,
    config: dict[str, Any],
    resume: bool = False,
    trial: Any = None,
    monitor: str | None = None,
    checkpoint: bool = True,
) -> FitResult:
    """Run epochs `start..epochs-1`: `train_epoch(epoch)` -> mean loss, `validate(epoch)` ->
    metrics (logged to the active MLflow run at step=epoch), scheduler step, checkpoint, and
    one log line per epoch.

    With `resume`, model/optimizer/scheduler/scaler/RNG (and weight-average) states come
    from the checkpoint, so the continued run equals an uninterrupted one. When the step
    keeps a `WeightEMA`, validation runs on the average and the model ends holding it.
    With an Optuna `trial`, `monitor` is reported each epoch and `optuna.TrialPruned`
    raised when the pruner says so.
    """
    from training.tracking import log_epoch

    optimizer, scaler = step.optimizer, step.scaler
    output.mkdir(parents=True, exist_ok=True)
    ckpt_path = output / CHECKPOINT_FILE
    result = FitResult()
    if resume:
        state = load_checkpoint(ckpt_path, config)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state["scheduler"] is not None:
            scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        if step.ema is not None and state.get("ema") is not None:
            step.ema.load_state_dict(state["ema"])
        _set_rng_state(state["rng"])
        result.history = list(state["history"])
        result.start_epoch = state["epoch"] + 1
        log.info("resumed from %s after epoch %d", ckpt_path, state["epoch"])
    t0 = time.perf_counter()
    for epoch in range(result.start_epoch, epochs):
        t_epoch = time.perf_counter()
        model.train()
        loss = float(train_epoch(epoch))
        row = {"epoch": epoch, "train_loss": loss}
        if validate is not None:
            model.eval()
            with step.ema.averaged() if step.ema is not None else contextlib.nullcontext():
                row.update(validate(epoch))
        if scheduler is not None:
            scheduler.step()
        result.history.append(row)
        log_epoch(row, epoch)
        log.info(
            "epoch %d/%d %s (%.1f s)",
            epoch + 1,
            epochs,
            " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"),
            time.perf_counter() - t_epoch,
        )
        if checkpoint:
            save_checkpoint(
                ckpt_path,
                epoch=epoch,
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                scaler=scaler,
                history=result.history,
                config=config,
                ema=step.ema,
            )
        if trial is not None and monitor is not None and monitor in row:
            import optuna

            trial.report(row[monitor], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch} ({monitor}={row[monitor]:.4g})")
    if step.ema is not None:  # the trained model is the average (validated as such)
        step.ema.apply()
    result.seconds = time.perf_counter() - t0
    return result


# ---------------------------------------------------------------- progress


def progress(
    iterable: Iterable[T],
    *,
    desc: str,
    total: int | None = None,
    interval: float = PROGRESS_INTERVAL_S,
    clock: Callable[[], float] = time.monotonic,
    stream: IO[str] | None = None,
) -> Iterable[T]:
    """The items of `iterable`, with progress on `stream` (default stderr).

    On a terminal: a tqdm bar. Otherwise (Kubernetes Job logs, CI, a file) a log line
    `<desc>: <done>/<total> items, <s> s` after the first item that finishes `interval`
    seconds or more after the previous line (by `clock`), so a long loop is never silent
    for longer than `interval` plus one item.
    """
    stream = sys.stderr if stream is None else stream
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if _is_terminal(stream):
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, total=total, leave=False, file=stream)
    return _timed(iterable, desc, total, interval, clock)


def _is_terminal(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty is not None and isatty())


def _timed(
    iterable: Iterable[T],
    desc: str,
    total: int | None,
    interval: float,
    clock: Callable[[], float],
) -> Iterator[T]:
    start = last = clock()
    of = f"/{total}" if total is not None else ""
    for done, item in enumerate(iterable, start=1):
        yield item
        now = clock()
        if now - last >= interval:
            log.info("%s: %d%s items, %.0f s", desc, done, of, now - start)
            last = now
