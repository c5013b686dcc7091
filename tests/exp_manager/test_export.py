"""The weights-only export (NeMo's .nemo): when it is written, what it holds, one kept, the best weights restored."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import exp_manager_test_models as M  # registered by conftest.py
import pytest
import torch
import yaml

from expbus.trainer_bridge.exp_manager._export import export_weights, restore_weights

pytestmark = [pytest.mark.filterwarnings(w) for w in M.QUIET]


def _restored(path: Path) -> Any:
    model = M.ExampleModel()
    with torch.no_grad():
        model.l1.weight.fill_(7.0)
    return restore_weights(path, model)


def _fit(tmp_path: Path, max_epochs: int = 4, **params: Any) -> Any:
    trainer = M.make_trainer(tmp_path, max_epochs=max_epochs)
    callback = M.checkpointing(trainer, tmp_path, **params)
    model = M.ExampleModel()
    trainer.fit(model)
    return model, callback


def test_save_best_model_exports_and_keeps_the_best_weights(tmp_path: Path) -> None:
    """NeMo's test_nemo_checkpoint_save_best_model_1, comparing state dicts too."""
    model, callback = _fit(tmp_path, save_best_model=True)
    export = tmp_path / "checkpoints" / "default.nemo"
    assert export.is_file()
    assert _restored(export).output_on_ones() == 0.0
    best = torch.load(callback.best_model_path, weights_only=False)["state_dict"]
    exported = _restored(export).state_dict()
    assert exported.keys() == best.keys()
    assert all(torch.equal(exported[k], best[k]) for k in best)
    # As in NeMo, the module itself is left with the best weights.
    assert all(torch.equal(model.state_dict()[k], best[k]) for k in best)


def test_the_export_holds_the_last_weights_by_default(tmp_path: Path) -> None:
    """NeMo's test_nemo_checkpoint_save_best_model_2."""
    model, _ = _fit(tmp_path)
    restored = _restored(tmp_path / "checkpoints" / "default.nemo")
    assert abs(restored.output_on_ones() - 0.03) < 1e-5
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in model.state_dict().items())


def test_always_save_nemo_with_save_best_model(tmp_path: Path) -> None:
    """NeMo's test_nemo_checkpoint_always_save_nemo and ..._doesnt_produce_too_many_nemo_ckpts."""
    _fit(tmp_path, save_best_model=True, always_save_nemo=True, save_top_k=2)
    folder = tmp_path / "checkpoints"
    assert len(list(folder.glob("default*.nemo"))) == 1
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no staging left
    assert _restored(folder / "default.nemo").output_on_ones() == 0.0


def test_always_save_nemo_exports_during_training(tmp_path: Path) -> None:
    seen: list[float] = []

    class Probe(M.pl.Callback):  # type: ignore[misc,name-defined]
        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            path = tmp_path / "checkpoints" / "default.nemo"
            if path.exists():
                seen.append(_restored(path).output_on_ones())

    trainer = M.make_trainer(tmp_path, max_epochs=3, callbacks=[Probe()])
    M.checkpointing(trainer, tmp_path, always_save_nemo=True, save_nemo_on_train_end=False)
    trainer.fit(M.ExampleModel())
    # Validation (and so the save) runs before the epoch-end hook: each epoch's export is its weights.
    assert [round(v, 4) for v in seen] == [0.3, 0.0, 0.03]


def test_no_validation_run_still_exports(tmp_path: Path) -> None:
    """NeMo's test_nemo_checkpoint_make_checkpoint_dir: validation never runs within max_epochs."""
    trainer = M.make_trainer(tmp_path, max_epochs=4, check_val_every_n_epoch=5)
    M.checkpointing(trainer, tmp_path, save_best_model=True, always_save_nemo=True)
    trainer.fit(M.ExampleModel())
    assert (tmp_path / "checkpoints" / "default.nemo").exists()


def test_prefix_and_postfix_name_the_export(tmp_path: Path) -> None:
    _fit(tmp_path, max_epochs=1, prefix="mine", postfix=".weights")
    assert M.names(tmp_path / "checkpoints", "*.weights") == {"mine.weights"}
    _fit(tmp_path / "b", max_epochs=1, save_nemo_on_train_end=False)
    assert M.names(tmp_path / "b" / "checkpoints", "*.nemo") == set()


def test_the_archive_holds_hparams_and_the_plain_state_dict(tmp_path: Path) -> None:
    model = M.ExampleModel(train_len=6, batch_size=3)
    path = export_weights(model, tmp_path / "x.nemo")
    with tarfile.open(path) as archive:
        assert sorted(archive.getnames()) == ["model_config.yaml", "model_weights.ckpt"]
        config = yaml.safe_load(archive.extractfile("model_config.yaml").read())  # type: ignore[union-attr]
        weights = torch.load(io.BytesIO(archive.extractfile("model_weights.ckpt").read()),  # type: ignore[union-attr]
                             weights_only=True)
    assert config == {"train_len": 6, "batch_size": 3}
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_a_module_with_save_to_writes_its_own_export(tmp_path: Path) -> None:
    class WithSaveTo(M.ExampleModel):  # type: ignore[misc,name-defined]
        def save_to(self, save_path: str) -> None:
            Path(save_path).write_text("custom")

    trainer = M.make_trainer(tmp_path, max_epochs=1)
    M.checkpointing(trainer, tmp_path)
    trainer.fit(WithSaveTo())
    assert (tmp_path / "checkpoints" / "default.nemo").read_text() == "custom"


def test_restore_weights_reads_a_lightning_checkpoint(tmp_path: Path) -> None:
    _, callback = _fit(tmp_path, save_top_k=1)
    assert _restored(Path(callback.best_model_path)).output_on_ones() == 0.0


def test_restore_weights_reads_a_nemo_style_archive(tmp_path: Path) -> None:
    source = M.ExampleModel()
    data = io.BytesIO()
    torch.save(source.state_dict(), data)
    path = tmp_path / "nemo_made.nemo"
    with tarfile.open(path, "w:gz") as archive:  # NeMo's older archives: gzip, "./" member names
        info = tarfile.TarInfo("./model_weights.ckpt")
        info.size = len(data.getvalue())
        archive.addfile(info, io.BytesIO(data.getvalue()))
    restored = _restored(path)
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in source.state_dict().items())


def test_restore_weights_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        restore_weights(tmp_path / "nope.nemo", M.ExampleModel())
    empty = tmp_path / "empty.nemo"
    with tarfile.open(empty, "w:"):
        pass
    with pytest.raises(ValueError, match=r"no model_weights\.ckpt"):
        restore_weights(empty, M.ExampleModel())
    (tmp_path / "folder.ckpt").mkdir()
    with pytest.raises(ValueError, match="directory checkpoint"):
        restore_weights(tmp_path / "folder.ckpt", M.ExampleModel())


def test_an_export_replaces_the_previous_one_only_when_complete(tmp_path: Path) -> None:
    target = tmp_path / "default.nemo"
    target.write_text("old")

    class Broken(M.ExampleModel):  # type: ignore[misc,name-defined]
        def save_to(self, save_path: str) -> None:
            Path(save_path).write_text("partial")
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        export_weights(Broken(), target)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["default.nemo"]
    export_weights(M.ExampleModel(), target)
    assert tarfile.is_tarfile(target)
