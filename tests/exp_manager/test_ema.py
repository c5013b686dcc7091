"""EMA: the update rule step by step, evaluation with the average, ``-EMA.ckpt`` twins and resume."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from expbus.sinks import ConfigError
from expbus.trainer_bridge.ema import EMA
from expbus.trainer_bridge.exp_manager import exp_manager

from .conftest import TinyData, TinyModel

Weights = list[torch.Tensor]

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*exists and is not empty.*"),
    pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint.*"),
]


def _weights(module: pl.LightningModule) -> Weights:
    return [p.detach().clone() for p in module.parameters()]


def _close(a: Weights, b: Weights) -> bool:
    return len(a) == len(b) and all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a, b, strict=True))


class Recorder(pl.Callback):
    """Placed after the EMA: the weights and the average at train start and after every batch."""

    def __init__(self, ema: EMA) -> None:
        self.ema = ema
        self.start: tuple[Weights, Weights] | None = None
        self.batches: list[tuple[int, Weights, Weights]] = []
        self.evaluated: list[tuple[Weights, Weights]] = []  # (weights seen by evaluation, trained weights after)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        average = self.ema.ema_weights
        assert average is not None
        self.start = (_weights(pl_module), [t.clone() for t in average])

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        average = self.ema.ema_weights
        assert average is not None
        self.batches.append((trainer.global_step, _weights(pl_module), [t.clone() for t in average]))

    def _seen(self, pl_module: pl.LightningModule) -> None:
        self.evaluated.append((_weights(pl_module), []))

    def _after(self, pl_module: pl.LightningModule) -> None:
        self.evaluated[-1] = (self.evaluated[-1][0], _weights(pl_module))

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._seen(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._after(pl_module)

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._seen(pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._after(pl_module)


class EvaluatedModel(TinyModel):
    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_loss", torch.nn.functional.mse_loss(self.layer(x), y))


@pytest.mark.parametrize("decay", [-0.1, 1.5, float("nan")])
def test_decay_outside_unit_interval_is_an_error_naming_it(decay: float,
                                                           make_trainer: Callable[..., pl.Trainer]) -> None:
    with pytest.raises(ValueError, match=str(decay)):
        EMA(decay=decay)
    with pytest.raises(ConfigError) as info:
        exp_manager(make_trainer(), {"ema": {"enable": True, "decay": decay}})
    assert info.value.path == "exp_manager.ema.decay" and str(decay) in str(info.value)
    assert list(Path.cwd().iterdir()) == []


@pytest.mark.parametrize(("accumulate", "every", "offload"), [(1, 1, False), (2, 1, False), (1, 2, False),
                                                              (2, 2, True)])
def test_update_rule_step_by_step(accumulate: int, every: int, offload: bool,
                                  make_trainer: Callable[..., pl.Trainer],
                                  tiny: Callable[..., tuple[TinyModel, TinyData]]) -> None:
    decay = 0.75
    ema = EMA(decay=decay, every_n_steps=every, cpu_offload=offload)
    recorder = Recorder(ema)
    model, data = tiny(train_batches=8)
    trainer = make_trainer(max_steps=-1, max_epochs=1, limit_val_batches=0, accumulate_grad_batches=accumulate,
                           callbacks=[ema, recorder])
    trainer.fit(model, data)

    assert recorder.start is not None
    initial, average = recorder.start
    assert _close(average, initial)  # the weights at train start
    expected = [t.clone() for t in initial]
    previous_step = 0
    for index, (step, weights, recorded) in enumerate(recorder.batches):
        # Only a real optimizer step moves the average: accumulated micro-batches do not.
        assert step == (index + 1) // accumulate
        if step != previous_step and (step - 1) % every == 0:
            expected = [decay * e + (1 - decay) * w for e, w in zip(expected, weights, strict=True)]
        previous_step = step
        assert _close(recorded, expected), f"batch {index}, step {step}"
    assert trainer.global_step == 8 // accumulate
    assert not _close(expected, _weights(model))  # the model keeps its trained weights


@pytest.mark.parametrize("original", [False, True])
def test_validation_and_test_use_ema_weights_unless_validate_original_weights(
        original: bool, make_trainer: Callable[..., pl.Trainer],
        tiny: Callable[..., tuple[TinyModel, TinyData]]) -> None:
    ema = EMA(decay=0.5, validate_original_weights=original)
    recorder = Recorder(ema)
    torch.manual_seed(0)
    model, data = EvaluatedModel(), TinyData(4)
    trainer = make_trainer(max_steps=-1, max_epochs=2, callbacks=[ema, recorder])
    trainer.fit(model, data)
    trained = _weights(model)
    average = ema.ema_weights
    assert average is not None and not _close(average, trained)
    trainer.test(model, data.val_dataloader(), verbose=False)

    assert len(recorder.evaluated) == 3  # two validations, one test
    for seen, after in recorder.evaluated[:2]:
        assert _close(seen, after) is original  # the average differs from the trained weights
    seen, after = recorder.evaluated[-1]
    assert _close(seen, trained if original else average)
    assert _close(after, trained) and _close(_weights(model), trained)  # swapped back
    # During training validation: the weights that training continued from are the trained ones.
    first_seen, first_after = recorder.evaluated[0]
    step_weights = recorder.batches[3][1]  # after the last step of epoch 0
    assert _close(first_after, step_weights)
    assert _close(first_seen, step_weights) is original


def _ema_run(root: Path, make_trainer: Callable[..., pl.Trainer], epochs: int, *, resume: bool = False,
             **options: Any) -> tuple[pl.Trainer, TinyModel, EMA]:
    torch.manual_seed(0)
    model, data = TinyModel(), TinyData(4)
    trainer = make_trainer(max_steps=-1, max_epochs=epochs, **options)
    exp_manager(trainer, {
        "explicit_log_dir": str(root), "resume_if_exists": resume, "resume_ignore_no_checkpoint": resume,
        "create_tensorboard_logger": False, "ema": {"enable": True, "decay": 0.8},
        "checkpoint_callback_params": {"save_top_k": 2, "monitor": "val_loss", "always_save_nemo": False},
    })
    ema = next(cb for cb in trainer.callbacks if isinstance(cb, EMA))  # type: ignore[attr-defined]
    trainer.fit(model, data)
    return trainer, model, ema


def test_twins_beside_every_checkpoint_and_last_with_top_k(tmp_path: Path,
                                                           make_trainer: Callable[..., pl.Trainer]) -> None:
    _, model, ema = _ema_run(tmp_path / "run", make_trainer, 5)
    folder = tmp_path / "run" / "checkpoints"
    ckpts = sorted(p.name for p in folder.glob("*.ckpt"))
    bases = [name for name in ckpts if not name.endswith("-EMA.ckpt")]
    assert len(bases) == 3 and sum(name.endswith("-last.ckpt") for name in bases) == 1  # top 2 and -last
    assert sorted(ckpts) == sorted(bases + [b.removesuffix(".ckpt") + "-EMA.ckpt" for b in bases])
    assert not list(folder.glob("*-unfinished"))

    last = next(folder.glob("*-last.ckpt"))
    average = ema.ema_weights
    assert average is not None
    base = torch.load(last, weights_only=False)
    twin = torch.load(str(last).removesuffix(".ckpt") + "-EMA.ckpt", weights_only=False)
    assert _close(list(base["state_dict"].values()), _weights(model))
    assert _close(list(twin["state_dict"].values()), average)
    assert base["global_step"] == twin["global_step"] == 20


@pytest.mark.parametrize("sanity", [0, 1])
def test_resume_continues_the_average_exactly(sanity: int, tmp_path: Path,
                                              make_trainer: Callable[..., pl.Trainer]) -> None:
    # With a sanity check, the resumed average is already in place (and swapped in) before train start.
    _, straight_model, straight = _ema_run(tmp_path / "straight", make_trainer, 4, num_sanity_val_steps=sanity)
    _ema_run(tmp_path / "split", make_trainer, 2, num_sanity_val_steps=sanity)
    trainer, resumed_model, resumed = _ema_run(tmp_path / "split", make_trainer, 4, resume=True,
                                               num_sanity_val_steps=sanity)
    assert trainer.ckpt_path is not None and str(trainer.ckpt_path).endswith("-last.ckpt")
    a, b = straight.ema_weights, resumed.ema_weights
    assert a is not None and b is not None
    assert _close(a, b)
    assert _close(_weights(straight_model), _weights(resumed_model))


def test_resume_from_ema_twin_trains_on_the_ema_weights(tmp_path: Path,
                                                        make_trainer: Callable[..., pl.Trainer]) -> None:
    _ema_run(tmp_path / "run", make_trainer, 2)
    twin = next((tmp_path / "run" / "checkpoints").glob("*-last-EMA.ckpt"))
    ema_weights = list(torch.load(twin, weights_only=False)["state_dict"].values())

    ema = EMA(decay=0.8)
    recorder = Recorder(ema)
    torch.manual_seed(0)
    trainer = make_trainer(max_steps=-1, max_epochs=3, callbacks=[ema, recorder])
    trainer.fit(TinyModel(), TinyData(4), ckpt_path=str(twin))
    assert recorder.start is not None
    weights, average = recorder.start
    assert _close(weights, ema_weights) and _close(average, ema_weights)  # a new average from the EMA weights
    assert trainer.global_step == 12


def test_resume_without_ema_state_and_without_twin_is_a_clear_error(
        tmp_path: Path, make_trainer: Callable[..., pl.Trainer]) -> None:
    torch.manual_seed(0)
    trainer = make_trainer(max_steps=2)
    trainer.fit(TinyModel(), TinyData(4))
    path = tmp_path / "plain.ckpt"
    trainer.save_checkpoint(path)
    trainer = make_trainer(max_steps=4, callbacks=[EMA(decay=0.9)])
    with pytest.raises(FileNotFoundError, match=r"plain-EMA\.ckpt"):
        trainer.fit(TinyModel(), TinyData(4), ckpt_path=str(path))


def test_standalone_checkpoint_holds_the_average(tmp_path: Path, make_trainer: Callable[..., pl.Trainer]) -> None:
    ema = EMA(decay=0.9)
    torch.manual_seed(0)
    trainer = make_trainer(max_steps=3, callbacks=[ema])
    trainer.fit(TinyModel(), TinyData(4))
    path = tmp_path / "x.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["callbacks"]
    saved = next(value for key, value in state.items() if key.startswith("EMA"))
    average = ema.ema_weights
    assert average is not None and _close(saved["ema"], average) and saved["last_step"] == 3


def test_test_from_a_checkpoint_uses_its_average(tmp_path: Path, make_trainer: Callable[..., pl.Trainer]) -> None:
    _, _, ema = _ema_run(tmp_path / "run", make_trainer, 2)
    average = ema.ema_weights
    assert average is not None
    last = next((tmp_path / "run" / "checkpoints").glob("*-last.ckpt"))
    tester = EMA(decay=0.8)
    recorder = Recorder(tester)
    torch.manual_seed(0)
    model, data = EvaluatedModel(), TinyData(4)
    make_trainer(callbacks=[tester, recorder]).test(model, data.val_dataloader(), ckpt_path=str(last), verbose=False)
    seen, after = recorder.evaluated[-1]
    assert _close(seen, average) and not _close(after, average)
