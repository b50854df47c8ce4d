"""The training engine: time-based progress lines, one line per epoch, the optimiser step."""

from __future__ import annotations

import io
import logging

import pytest

from training.engine import AmpStep, epoch_generator, fit, progress, train_batches


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _progress_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("load:")]


def test_progress_logs_a_line_once_the_interval_has_passed_without_a_terminal(caplog):
    clock = FakeClock()
    caplog.set_level(logging.INFO, logger="training.engine")
    seen = []
    for item in progress(range(5), desc="load", interval=30.0, clock=clock, stream=io.StringIO()):
        seen.append(item)
        clock.now += 20.0  # each item takes 20 s
    assert seen == [0, 1, 2, 3, 4]
    # lines after item 2 (40 s since the start) and item 4 (80 s, 40 s since the last line)
    assert _progress_lines(caplog) == ["load: 2/5 items, 40 s", "load: 4/5 items, 80 s"]


def test_progress_is_silent_before_the_interval(caplog):
    clock = FakeClock()
    caplog.set_level(logging.INFO, logger="training.engine")
    for _ in progress(range(5), desc="load", interval=30.0, clock=clock, stream=io.StringIO()):
        clock.now += 5.0  # 25 s in all
    assert _progress_lines(caplog) == []


def test_progress_on_a_terminal_draws_a_bar_and_logs_nothing(caplog):
    clock = FakeClock()
    caplog.set_level(logging.INFO, logger="training.engine")
    tty = Tty()
    seen = []
    for item in progress(range(5), desc="load", interval=30.0, clock=clock, stream=tty):
        seen.append(item)
        clock.now += 100.0
    assert seen == [0, 1, 2, 3, 4]
    assert _progress_lines(caplog) == []
    assert "load" in tty.getvalue()  # tqdm's bar went to the terminal


def test_fit_logs_one_line_per_epoch_and_train_batches_steps_each_batch(tmp_path, caplog):
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    step = AmpStep(torch.optim.SGD(model.parameters(), lr=0.1), amp=False)
    x, y = torch.randn(10, 3), torch.randn(10, 1)

    def train_epoch(epoch: int) -> float:
        order = torch.randperm(len(x), generator=epoch_generator(0, epoch)).split(4)
        return train_batches(
            order,
            lambda idx: torch.nn.functional.mse_loss(model(x[idx]), y[idx]),
            step,
            desc=f"epoch {epoch + 1}",
            limit=2,
        )

    caplog.set_level(logging.INFO, logger="training.engine")
    result = fit(
        model=model,
        step=step,
        scheduler=None,
        epochs=3,
        train_epoch=train_epoch,
        validate=None,
        output=tmp_path,
        config={"epochs": 3},
        checkpoint=False,
    )
    assert step.steps == 6  # 2 of the 3 batches per epoch (limit=2)
    assert [h["epoch"] for h in result.history] == [0, 1, 2]
    epoch_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert [line.split()[1] for line in epoch_lines] == ["1/3", "2/3", "3/3"]
    assert all("train_loss=" in line for line in epoch_lines)


def test_epoch_generator_depends_on_seed_and_epoch_only():
    import torch

    a = torch.randperm(8, generator=epoch_generator(3, 1))
    assert torch.equal(a, torch.randperm(8, generator=epoch_generator(3, 1)))
    assert not torch.equal(a, torch.randperm(8, generator=epoch_generator(3, 2)))


@pytest.mark.parametrize("total", [None, 7])
def test_progress_names_the_total_when_known(caplog, total):
    clock = FakeClock()
    caplog.set_level(logging.INFO, logger="training.engine")
    for _ in progress(iter(range(3)), desc="load", total=total, clock=clock, stream=io.StringIO()):
        clock.now += 31.0
    of = "" if total is None else f"/{total}"
    assert _progress_lines(caplog)[0] == f"load: 1{of} items, 31 s"


def test_amp_step_goes_through_the_grad_scaler_and_fit_checkpoints_its_state(tmp_path):
    """The GradScaler branch (CUDA in production); without CUDA the scaler disables itself
    and passes the loss through, which is enough to run the branch and the checkpoint."""
    import warnings

    import torch

    from training.engine import CHECKPOINT_FILE

    model = torch.nn.Linear(2, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available. Disabling" on CPU
        step = AmpStep(torch.optim.SGD(model.parameters(), lr=0.1), amp=True)
    assert step.scaler is not None
    before = model.weight.detach().clone()
    value = step(model(torch.ones(4, 2)).pow(2).mean())
    assert value > 0 and step.steps == 1
    assert not torch.equal(before, model.weight)

    fit(
        model=model,
        step=step,
        scheduler=None,
        epochs=1,
        train_epoch=lambda epoch: step(model(torch.ones(4, 2)).pow(2).mean()),
        validate=None,
        output=tmp_path,
        config={"epochs": 1},
    )
    state = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    assert state["scaler"] is not None and state["epoch"] == 0


def test_weight_ema_averages_every_step_and_fit_validates_and_ends_on_the_average(tmp_path):
    """The average follows lerp(shadow, w, 1 - d) with the ramped decay d; validation sees
    the average and the raw weights come back for training; the model ends on the average
    and the checkpoint carries it (for resume)."""
    import torch

    from training.engine import CHECKPOINT_FILE, WeightEMA

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = WeightEMA(model, decay=0.5)
    step = AmpStep(torch.optim.SGD(model.parameters(), lr=0.5), amp=False, ema=ema)
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    expected = {k: v.clone() for k, v in ema.shadow.items()}
    seen: list[torch.Tensor] = []

    def train_epoch(epoch: int) -> float:
        loss = train_batches(
            [0, 1], lambda _: torch.nn.functional.mse_loss(model(x), y), step, desc="e"
        )
        return loss

    def validate(epoch: int) -> dict[str, float]:
        seen.append(model[0].weight.detach().clone())
        return {}

    def track(n_updates_before: int) -> None:  # what the average must hold after one step
        d = min(0.5, (1 + n_updates_before) / (10 + n_updates_before))
        for k, v in model.state_dict().items():
            if k in expected:
                expected[k] = expected[k] * d + v.detach() * (1 - d)

    # one epoch by hand, checking the rule after each step
    for n in range(2):
        with step.autocast():
            loss = torch.nn.functional.mse_loss(model(x), y)
        step(loss)
        track(n)
        for k in expected:
            torch.testing.assert_close(ema.shadow[k], expected[k])
    raw = model[0].weight.detach().clone()
    with ema.averaged():
        torch.testing.assert_close(model[0].weight, ema.shadow["0.weight"])
    torch.testing.assert_close(model[0].weight, raw)  # training continues on the raw weights
    assert not torch.equal(raw, ema.shadow["0.weight"])

    fit(
        model=model,
        step=step,
        scheduler=None,
        epochs=1,
        train_epoch=train_epoch,
        validate=validate,
        output=tmp_path,
        config={"epochs": 1},
    )
    state = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    assert state["ema"]["updates"] == 4
    torch.testing.assert_close(state["ema"]["shadow"]["0.weight"], ema.shadow["0.weight"])
    torch.testing.assert_close(seen[0], ema.shadow["0.weight"])  # validated on the average
    torch.testing.assert_close(model[0].weight, ema.shadow["0.weight"])  # ends on it
    assert not torch.equal(state["model"]["0.weight"], ema.shadow["0.weight"])  # raw saved


def test_weight_ema_refuses_a_decay_outside_0_1():
    import torch

    from training.cli import UsageError
    from training.engine import WeightEMA

    with pytest.raises(UsageError, match="weight_ema"):
        WeightEMA(torch.nn.Linear(2, 2), decay=1.0)
