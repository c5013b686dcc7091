"""clean_exp_ckpt: removes a run's .ckpt and/or .nemo files, from Python and from the command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from expbus.trainer_bridge.exp_manager._clean import clean_exp_ckpt, main


def _run(tmp_path: Path) -> Path:
    folder = tmp_path / "checkpoints"
    folder.mkdir(parents=True)
    for name in ("a--val_loss=0.1-epoch=1.ckpt", "a--val_loss=0.1-epoch=1-last.ckpt", "default.nemo", "notes.txt"):
        (folder / name).write_text("x")
    (folder / "sharded.ckpt").mkdir()  # a checkpoint stored as a folder
    (folder / "sharded.ckpt" / "part0").write_text("x")
    return tmp_path


def test_removes_ckpt_files_and_keeps_nemo_by_default(tmp_path: Path) -> None:
    log_dir = _run(tmp_path)
    removed = clean_exp_ckpt(log_dir)
    assert sorted(p.name for p in removed) == ["a--val_loss=0.1-epoch=1-last.ckpt", "a--val_loss=0.1-epoch=1.ckpt",
                                               "sharded.ckpt"]
    assert sorted(p.name for p in (log_dir / "checkpoints").iterdir()) == ["default.nemo", "notes.txt"]


def test_removes_nemo_files_when_asked(tmp_path: Path) -> None:
    log_dir = _run(tmp_path)
    clean_exp_ckpt(str(log_dir), remove_ckpt=False, remove_nemo=True)
    names = sorted(p.name for p in (log_dir / "checkpoints").iterdir())
    assert "default.nemo" not in names and "a--val_loss=0.1-epoch=1.ckpt" in names
    clean_exp_ckpt(log_dir, remove_ckpt=True, remove_nemo=True)
    assert sorted(p.name for p in (log_dir / "checkpoints").iterdir()) == ["notes.txt"]


def test_a_missing_folder_removes_nothing(tmp_path: Path) -> None:
    assert clean_exp_ckpt(tmp_path / "nothing", remove_nemo=True) == []


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log_dir = _run(tmp_path)
    assert main([str(log_dir), "--keep-ckpt", "--remove-nemo"]) == 0
    assert capsys.readouterr().out.strip().endswith("default.nemo")
    assert not (log_dir / "checkpoints" / "default.nemo").exists()
    assert main([str(log_dir)]) == 0
    assert not list((log_dir / "checkpoints").glob("*.ckpt"))
    assert main([str(tmp_path / "missing")]) == 2
