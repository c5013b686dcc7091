"""A tiny stand-in for NeMo's ASR adapter script, to run NeMo's multirun configs (``nemo_launcher``) on expbus."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn import functional as F

from expbus import exp_manager
from expbus.trainer_bridge.demo import DemoRegressor, SyntheticRegression
from expbus.trainer_bridge.hydra_runner import hydra_runner


class StandInAdapterModel(DemoRegressor):
    """The demo regressor, sized by the adapter's ``dim``; it logs ``val_wer`` (NeMo's monitor) as its error."""

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Mean squared error, logged under NeMo's ASR monitor name."""
        x, y = batch
        self.log("val_wer", F.mse_loss(self(x), y))


def _trainer(cfg: DictConfig) -> pl.Trainer:
    """The Trainer from the config's ``trainer:`` block (a ``strategy`` with ``_target_`` is instantiated)."""
    kwargs: dict[str, Any] = OmegaConf.to_container(cfg.trainer, resolve=True)  # type: ignore[assignment]
    if isinstance(kwargs.get("strategy"), dict):
        from hydra.utils import instantiate

        kwargs["strategy"] = instantiate(kwargs["strategy"])
    kwargs.setdefault("enable_progress_bar", False)
    kwargs.setdefault("enable_model_summary", False)
    return pl.Trainer(**kwargs)


@hydra_runner(config_path=".", config_name="multirun_asr_adaptation_hp")
def main(cfg: DictConfig) -> None:
    """Train the stand-in with the swept ``model.optim.lr``, ``model.adapter.linear.dim`` and stochastic depth."""
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.manual_seed(0)
    trainer = _trainer(cfg)
    log_dir = exp_manager(trainer, cfg.exp_manager)
    adapter = cfg.model.adapter.linear
    model = StandInAdapterModel(hidden=int(adapter.dim), lr=float(cfg.model.optim.lr))
    trainer.fit(model, datamodule=SyntheticRegression(train_size=256, batch_size=32))
    print(f"finished {cfg.exp_manager.name}: global_step={trainer.global_step} "
          f"stochastic_depth={adapter.adapter_strategy.stochastic_depth} log_dir={log_dir}")


if __name__ == "__main__":
    main()
