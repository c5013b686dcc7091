"""clean_exp_ckpt: removes a run's .ckpt and/or .nemo files, from Python and from the command line (``expbus clean``)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import pytest

from expbus._cli import main as cli_main
from expbus.trainer_bridge.exp_manager import exp_manager
from expbus.trainer_bridge.exp_manager._clean import clean_exp_ckpt, main
from expbus.trainer_bridge.exp_manager._dirs import detach_log_files


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


def test_dry_run_lists_and_removes_nothing(tmp_path: Path) -> None:
    log_dir = _run(tmp_path)
    before = sorted(p.name for p in (log_dir / "checkpoints").iterdir())
    listed = clean_exp_ckpt(log_dir, remove_nemo=True, dry_run=True)
    assert sorted(p.name for p in listed) == ["a--val_loss=0.1-epoch=1-last.ckpt", "a--val_loss=0.1-epoch=1.ckpt",
                                              "default.nemo", "sharded.ckpt"]
    assert sorted(p.name for p in (log_dir / "checkpoints").iterdir()) == before


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


# -- `expbus clean`: the same through the expbus command, on real runs -------------------------------------


@pytest.fixture
def trained_runs(tmp_path: Path, make_trainer: Callable[..., pl.Trainer],
                 tiny: Callable[..., tuple[pl.LightningModule, pl.LightningDataModule]]) -> list[Path]:
    """Two real runs under ``tmp_path/exps`` (2 epochs: a top-1 .ckpt, a -last .ckpt, the .nemo, sinks, journal)."""
    runs = []
    for name in ("a", "b"):
        trainer = make_trainer(max_steps=8)
        log_dir = exp_manager(trainer, {
            "exp_dir": str(tmp_path / "exps"), "name": name, "version": "v0", "create_tensorboard_logger": False,
            "checkpoint_callback_params": {"save_top_k": 1}, "sinks": {"events": {"type": "jsonl"}},
        })
        model, data = tiny()
        trainer.fit(model, datamodule=data)
        detach_log_files()
        runs.append(Path(log_dir))
    for run in runs:
        assert len(list((run / "checkpoints").glob("*.ckpt"))) == 2
        assert (run / "checkpoints" / f"{run.parent.name}.nemo").is_file()
    return runs


def _files(run: Path) -> list[str]:
    """Every file left in a run, relative to it (checkpoint folders and the .expbus state omitted)."""
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and ".expbus" not in p.parts)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_expbus_clean_command_on_real_runs(trained_runs: list[Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    run_a, run_b = trained_runs
    before_a, before_b = _files(run_a), _files(run_b)
    ckpts_a = sorted(str(run_a / "checkpoints" / p.name) for p in (run_a / "checkpoints").glob("*.ckpt"))

    # --dry-run lists what would go and removes nothing.
    assert cli_main(["clean", str(run_a), "--dry-run"]) == 0
    out = capsys.readouterr()
    assert out.out.splitlines() == ckpts_a
    assert "would remove 2 file(s)" in out.err and "in 1 run(s)" in out.err
    assert _files(run_a) == before_a

    # The defaults, as clean_exp_ckpt(log_dir): every .ckpt goes; the .nemo, sinks, journal and logs stay.
    assert cli_main(["clean", str(run_a)]) == 0
    assert capsys.readouterr().out.splitlines() == ckpts_a
    kept_a = [f for f in before_a if not f.endswith(".ckpt")]
    assert _files(run_a) == kept_a
    assert "checkpoints/a.nemo" in kept_a and "journal.msgpack" in kept_a and "events.jsonl" in kept_a
    assert _files(run_b) == before_b  # another run is not touched

    # A folder of runs needs --recursive (and says so); --keep-ckpt --remove-nemo takes only the .nemo files.
    assert cli_main(["clean", str(tmp_path / "exps"), "--keep-ckpt", "--remove-nemo"]) == 2
    assert "add --recursive" in capsys.readouterr().err
    assert cli_main(["clean", str(tmp_path / "exps"), "-r", "--no-remove-ckpt", "--remove-nemo"]) == 0
    assert capsys.readouterr().out.splitlines() == [str(run_a / "checkpoints" / "a.nemo"),
                                                    str(run_b / "checkpoints" / "b.nemo")]
    assert _files(run_a) == [f for f in kept_a if f != "checkpoints/a.nemo"]
    assert _files(run_b) == [f for f in before_b if f != "checkpoints/b.nemo"]

    # Nothing asked, or no run there: usage errors.
    assert cli_main(["clean", str(run_b), "--no-remove-ckpt"]) == 2
    assert "nothing to do" in capsys.readouterr().err
    assert cli_main(["clean", str(tmp_path / "missing")]) == 2
    capsys.readouterr()

    # The installed command itself, in a fresh process: the rest of run b's checkpoints.
    result = subprocess.run([sys.executable, "-m", "expbus", "clean", str(tmp_path / "exps"), "--recursive"],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2 and all(line.endswith(".ckpt") for line in result.stdout.splitlines())
    assert "removed 2 file(s)" in result.stderr and "in 2 run(s)" in result.stderr
    assert not list(run_b.rglob("*.ckpt")) and (run_b / "events.jsonl").stat().st_size > 0
