"""A runnable demo: a small regression model trained on CPU with the bridge attached and no Lightning logger."""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import msgspec
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from expbus.bus import format_health
from expbus.sinks import ExpbusConfig, load_config

from .callback import BridgeCallback

__all__ = ["DemoRegressor", "SyntheticRegression", "DEFAULT_SINKS", "demo_config", "run_demo"]

DEMO_NAME = "expbus_demo"
DEFAULT_EXP_DIR = "./nemo_experiments"

DEFAULT_SINKS: dict[str, dict[str, Any]] = {
    "jsonl": {"type": "jsonl"},
    "dllogger": {"type": "dllogger"},
    "csv": {"type": "csv"},
    # TensorBoard event files in the run directory, and MLflow in a sqlite database in the
    # experiment directory (exp_dir/mlflow.db): `mlflow ui --backend-store-uri sqlite:///...`.
    "tensorboard": {"type": "tensorboard"},
    "mlflow": {"type": "mlflow"},
}
"""The sinks of ``expbus demo`` without ``--config`` (the journal is always written)."""


class DemoRegressor(pl.LightningModule):
    """A two-layer MLP regressor; logs ``train_loss`` per step and epoch, ``val_loss`` per epoch.

    Args:
        in_features: input width.
        hidden: hidden width.
        lr: Adam learning rate.
    """

    def __init__(self, in_features: int = 8, hidden: int = 32, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predict one value per row."""
        return self.net(x)  # type: ignore[no-any-return]

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Mean squared error on one batch."""
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Validation error, averaged over the epoch."""
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam."""
        return torch.optim.Adam(self.parameters(), lr=self.hparams["lr"])


class SyntheticRegression(pl.LightningDataModule):
    """A noisy, slightly non-linear function of Gaussian inputs, generated in memory.

    Args:
        in_features: input width.
        train_size: training rows.
        val_size: validation rows.
        batch_size: rows per batch.
        noise: standard deviation of the target noise.
        seed: seed of the generator (the data are the same on every run).
    """

    def __init__(self, in_features: int = 8, train_size: int = 1024, val_size: int = 256, batch_size: int = 32,
                 noise: float = 0.1, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str) -> None:
        """Generate both splits."""
        hp = self.hparams
        gen = torch.Generator().manual_seed(hp["seed"])
        weights = torch.randn(hp["in_features"], 1, generator=gen)

        def split(rows: int) -> TensorDataset:
            x = torch.randn(rows, hp["in_features"], generator=gen)
            y = x @ weights + 0.5 * torch.sin(3 * x[:, :1]) + hp["noise"] * torch.randn(rows, 1, generator=gen)
            return TensorDataset(x, y)

        self.train_set, self.val_set = split(hp["train_size"]), split(hp["val_size"])

    def train_dataloader(self) -> DataLoader[Any]:
        """Shuffled training batches."""
        assert self.train_set is not None
        gen = torch.Generator().manual_seed(self.hparams["seed"])
        return DataLoader(self.train_set, batch_size=self.hparams["batch_size"], shuffle=True, generator=gen)

    def val_dataloader(self) -> DataLoader[Any]:
        """Validation batches, in order."""
        assert self.val_set is not None
        return DataLoader(self.val_set, batch_size=self.hparams["batch_size"])


def demo_config(config_path: str | os.PathLike[str] | None = None,
                out_dir: str | os.PathLike[str] | None = None) -> ExpbusConfig:
    """The configuration of a demo run.

    Without ``config_path``: sinks :data:`DEFAULT_SINKS`, name ``expbus_demo``. With it: the
    file's keys (its ``sinks:`` map replaces the defaults), and ``name`` ``expbus_demo``
    unless the file sets one. ``out_dir``, when given, replaces ``exp_dir``; otherwise the
    file's ``exp_dir`` or ``./nemo_experiments`` is used.

    Raises:
        ConfigError: the file is missing or invalid.
    """
    if config_path is None:
        config = load_config({"name": DEMO_NAME, "exp_dir": DEFAULT_EXP_DIR, "sinks": DEFAULT_SINKS})
        set_keys: set[str] = {"name", "exp_dir"}
    else:
        config = load_config(config_path)
        set_keys = _top_level_keys(config_path)
    changes: dict[str, Any] = {}
    if "name" not in set_keys:
        changes["name"] = DEMO_NAME
    if out_dir is not None:
        changes["exp_dir"] = os.fspath(out_dir)
    return msgspec.structs.replace(config, **changes) if changes else config


def _top_level_keys(config_path: str | os.PathLike[str]) -> set[str]:
    from omegaconf import DictConfig, OmegaConf

    loaded = OmegaConf.load(Path(config_path))  # load_config has validated the file already
    if isinstance(loaded, DictConfig) and isinstance(loaded.get("expbus"), DictConfig):
        loaded = loaded["expbus"]
    return {str(k) for k in loaded.keys()} if isinstance(loaded, DictConfig) else set()


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    # The demo prints its own report; Lightning's start-up notices and its advice about
    # DataLoader workers (irrelevant for in-memory tensors) would bury it.
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*number of training batches.*")
            yield
    finally:
        logger.setLevel(level)


def run_demo(
    config_path: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    max_steps: int = 200,
    verbose: bool = True,
) -> Path:
    """Train :class:`DemoRegressor` for ``max_steps`` steps on CPU with the bridge, then report where everything went.

    The Trainer runs with ``logger=False``: every metric reaches the sinks through the
    bridge. A ``ModelCheckpoint`` (``val_loss``, top 2, plus ``last``) writes into
    ``<run dir>/checkpoints``.

    Args:
        config_path: an expbus YAML file; see :func:`demo_config`.
        out_dir: root of experiments (default: the file's ``exp_dir``, else ``./nemo_experiments``).
        max_steps: optimizer steps to train.
        verbose: print the report.

    Returns:
        The run directory.

    Raises:
        ConfigError: the configuration is invalid.
    """
    if config_path is not None and _has_exp_manager_block(config_path):
        return _run_with_exp_manager(Path(config_path), out_dir, max_steps=max_steps, verbose=verbose)
    config = demo_config(config_path, out_dir)
    bridge = BridgeCallback(config)
    checkpoint = ModelCheckpoint(
        dirpath=bridge.run_dir / "checkpoints",
        filename="demo-{epoch:02d}-{step:04d}",
        monitor="val_loss",
        save_top_k=2,
        save_last=True,
    )
    torch.manual_seed(0)
    model = DemoRegressor()
    data = SyntheticRegression()
    started = time.monotonic()
    with _quiet_lightning():
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=max_steps,
            log_every_n_steps=10,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[bridge, checkpoint],
            default_root_dir=bridge.run_dir,
        )
        trainer.fit(model, datamodule=data)
    if verbose:
        print(_report(bridge, checkpoint, trainer, time.monotonic() - started))
    return bridge.run_dir


def _has_exp_manager_block(config_path: str | os.PathLike[str]) -> bool:
    from omegaconf import DictConfig, OmegaConf

    path = Path(config_path)
    if not path.is_file():
        return False  # demo_config reports the missing file
    loaded = OmegaConf.load(path)
    return isinstance(loaded, DictConfig) and "exp_manager" in loaded


def _run_with_exp_manager(
    config_path: Path, out_dir: str | os.PathLike[str] | None, *, max_steps: int, verbose: bool
) -> Path:
    """The demo as a NeMo script runs: a Trainer from ``trainer:``, then ``exp_manager(trainer, cfg.exp_manager)``."""
    from omegaconf import OmegaConf

    from .exp_manager import exp_manager

    cfg = OmegaConf.load(config_path)
    if out_dir is not None:
        cfg.exp_manager.exp_dir = os.fspath(out_dir)
    trainer_kwargs: dict[str, Any] = dict(OmegaConf.to_container(cfg.get("trainer", {}), resolve=True))  # type: ignore[arg-type]
    trainer_kwargs["max_steps"] = max_steps
    torch.manual_seed(0)
    started = time.monotonic()
    with _quiet_lightning():
        trainer = pl.Trainer(
            **{"accelerator": "cpu", "devices": 1, **trainer_kwargs},
            logger=False,  # exp_manager's loggers are expbus sinks
            enable_checkpointing=False,  # exp_manager adds its own ModelCheckpoint
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        log_dir = exp_manager(trainer, cfg.exp_manager)
        trainer.fit(DemoRegressor(), datamodule=SyntheticRegression())
    if verbose:
        bridge = next(cb for cb in trainer.callbacks if isinstance(cb, BridgeCallback))  # type: ignore[attr-defined]
        checkpoint = trainer.checkpoint_callback
        assert isinstance(checkpoint, ModelCheckpoint)
        print(_report(bridge, checkpoint, trainer, time.monotonic() - started))
    assert log_dir is not None
    return log_dir


def _size(num: int) -> str:
    value = float(num)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _report(bridge: BridgeCallback, checkpoint: ModelCheckpoint, trainer: pl.Trainer, seconds: float) -> str:
    run_dir = bridge.run_dir
    lines = [
        f"expbus demo: {trainer.global_step} steps in {seconds:.1f} s",
        f"  run dir:  {run_dir}",
        f"  run id:   {bridge.run_id}",
    ]
    journal = bridge.last_journal_stats
    if journal is not None and journal.path:
        lines.append(f"  journal:  {journal.path} ({journal.records} records, {journal.errors} errors)")
    lines.append("  sinks:" if bridge.last_stats else "  sinks:    none configured (journal only)")
    lines += [f"    {format_health(health)}" for health in bridge.last_stats.values()]
    lines.append("  files:")
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file() and ".expbus" not in p.parts):
        lines.append(f"    {path.relative_to(run_dir)}  ({_size(path.stat().st_size)})")
    if checkpoint.best_model_path:
        score = checkpoint.best_model_score
        lines.append(f"  best checkpoint: {checkpoint.best_model_path}"
                     + (f" (val_loss={float(score):.4f})" if score is not None else ""))
    if journal is not None and journal.path:
        lines.append(f"  read the journal back: expbus journal {journal.path}")
    return "\n".join(lines)
