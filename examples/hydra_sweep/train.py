"""A tiny sweepable training script: DemoRegressor through exp_manager, run by expbus's hydra_runner."""

from __future__ import annotations

import logging
import warnings

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf

from expbus import clean_exp_ckpt, exp_manager
from expbus.trainer_bridge.demo import DemoRegressor, SyntheticRegression
from expbus.trainer_bridge.hydra_runner import hydra_runner


@hydra_runner(config_path=".", config_name="sweep")
def main(cfg: DictConfig) -> None:
    """Train one job of the sweep, then ``clean_exp_ckpt`` as configured; ``fail_on_name`` makes that job raise."""
    # Lightning's advice about DataLoader workers is noise for in-memory tensors.
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    if cfg.get("fail_on_name") and cfg.exp_manager.name == cfg.fail_on_name:
        raise RuntimeError(f"job {cfg.exp_manager.name} configured to fail (fail_on_name)")
    torch.manual_seed(cfg.seed)
    trainer = pl.Trainer(**OmegaConf.to_container(cfg.trainer, resolve=True),  # type: ignore[arg-type]
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    log_dir = exp_manager(trainer, cfg.exp_manager)
    trainer.fit(DemoRegressor(hidden=cfg.model.hidden, lr=cfg.model.lr),
                datamodule=SyntheticRegression(train_size=cfg.data.train_size, batch_size=cfg.data.batch_size))
    print(f"finished {cfg.exp_manager.name}: global_step={trainer.global_step} log_dir={log_dir}")
    # At the end of each job, as NeMo's multirun docs show: free the checkpoints' disk space once the
    # metrics are in a tracker (clean_exp_ckpt.remove_ckpt=true; then a rerun starts the job afresh).
    clean_exp_ckpt(log_dir, remove_ckpt=cfg.clean_exp_ckpt.remove_ckpt, remove_nemo=cfg.clean_exp_ckpt.remove_nemo)


if __name__ == "__main__":
    main()
