"""Log directory rules (NeMo's test_exp_manager: default dir, overrides, versions), rank agreement, files, run_N moves."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest

from expbus.trainer_bridge.exp_manager import exp_manager
from expbus.trainer_bridge.exp_manager._dirs import (
    ENV_VERSION,
    LogDir,
    LogDirAgreement,
    _installed,
    attach_rank_log,
    detach_log_files,
    move_previous_run,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DATETIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}_[0-9]{2}-[0-9]{2}-[0-9]{2}")
QUIET = {"create_tensorboard_logger": False, "create_checkpoint_callback": False}


def test_default_log_dir(make_trainer: Callable[..., pl.Trainer]) -> None:
    log_dir = exp_manager(make_trainer(), QUIET)
    assert log_dir is not None and log_dir.is_absolute()
    assert log_dir.parent == Path.cwd() / "nemo_experiments" / "default"
    sub_dirs = [x for x in log_dir.parent.iterdir() if x.is_dir()]
    assert sub_dirs == [log_dir] and DATETIME.fullmatch(log_dir.name)
    assert os.environ[ENV_VERSION] == log_dir.name  # rank 0 tells the ranks started later


def test_log_dir_overrides(make_trainer: Callable[..., pl.Trainer], tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    # explicit_log_dir is verbatim
    log_dir = exp_manager(make_trainer(), {"explicit_log_dir": str(tmp_path / "explicit"), **QUIET})
    assert log_dir == tmp_path / "explicit" and log_dir.is_dir()
    # exp_dir, the default name and an explicit (int) version
    log_dir = exp_manager(make_trainer(), {"exp_dir": str(tmp_path / "test_no_name"), "version": 957, **QUIET})
    assert log_dir == tmp_path / "test_no_name" / "default" / "957" and log_dir.is_dir()
    # use_datetime_version: false counts version_N up
    for expected in ("version_0", "version_1"):
        monkeypatch.delenv(ENV_VERSION, raising=False)
        log_dir = exp_manager(make_trainer(), {"exp_dir": str(tmp_path / "test_no_name"),
                                               "use_datetime_version": False, **QUIET})
        assert log_dir == tmp_path / "test_no_name" / "default" / expected and log_dir.is_dir()


def test_explicit_log_dir_ignores_exp_dir_and_version_with_an_error_log(
        make_trainer: Callable[..., pl.Trainer], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="expbus.exp_manager"):
        log_dir = exp_manager(make_trainer(), {"explicit_log_dir": "salm_results/", "exp_dir": "ignored",
                                               "version": "v", **QUIET})
    assert log_dir == tmp_path / "salm_results"
    assert "exp_dir, name, and version will be ignored" in caplog.text
    assert not (tmp_path / "ignored").exists()


def test_version_from_environment(make_trainer: Callable[..., pl.Trainer], tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VERSION, "from_env")
    log_dir = exp_manager(make_trainer(), {"exp_dir": "e", "name": "n", **QUIET})
    assert log_dir == tmp_path / "e" / "n" / "from_env"
    # An explicit version wins over the environment.
    log_dir = exp_manager(make_trainer(), {"exp_dir": "e", "name": "n", "version": "mine", **QUIET})
    assert log_dir == tmp_path / "e" / "n" / "mine"


def test_a_rank_started_later_takes_rank_zeros_version(make_trainer: Callable[..., pl.Trainer],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    config = {"exp_dir": "e", "use_datetime_version": False, "seconds_to_sleep": 0, **QUIET}
    first = exp_manager(make_trainer(), config)
    # What Lightning's launcher does for rank 1: a new process with rank 0's environment.
    monkeypatch.setenv("LOCAL_RANK", "1")
    second = exp_manager(make_trainer(), config)
    assert first == second
    # Rank 1 logs into the same folder, under its own name (the file opens at its first record).
    files = [Path(h.baseFilename) for _, h in _installed if isinstance(h, logging.FileHandler)]
    assert second / "nemo_log_globalrank-1_localrank-1.txt" in files
    assert not any(f.name.startswith("nemo_error_log") for f in files)  # rank 0's files only on rank 0


def test_resume_if_exists_has_no_version_folder(make_trainer: Callable[..., pl.Trainer], tmp_path: Path) -> None:
    log_dir = exp_manager(make_trainer(), {"exp_dir": "e", "name": "n", "resume_if_exists": True,
                                           "resume_ignore_no_checkpoint": True, **QUIET})
    assert log_dir == tmp_path / "e" / "n"
    assert ENV_VERSION not in os.environ


def test_exp_dir_values(make_trainer: Callable[..., pl.Trainer], tmp_path: Path,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    # NeMo: exp_dir "" is the current directory; exp_dir ??? is dropped (None: ./nemo_experiments).
    log_dir = exp_manager(make_trainer(), {"exp_dir": "", "name": "n", "version": "v", **QUIET})
    assert log_dir == tmp_path / "n" / "v"
    log_dir = exp_manager(make_trainer(), {"exp_dir": "???", "name": "n", "version": "v", **QUIET})
    assert log_dir == tmp_path / "nemo_experiments" / "n" / "v"


def test_rank_zero_files(make_trainer: Callable[..., pl.Trainer], tmp_path: Path) -> None:
    source = tmp_path / "model_config.yaml"
    source.write_text("a: 1\n")
    log_dir = exp_manager(make_trainer(), {"explicit_log_dir": "run", "files_to_copy": [str(source)], **QUIET})
    assert log_dir is not None
    assert (log_dir / "cmd-args.log").read_text() == " ".join(sys.argv)
    assert (log_dir / "model_config.yaml").read_text() == "a: 1\n"
    assert not (log_dir / "git-info.log").exists()  # not inside a git repository
    logging.getLogger("user.code").warning("something odd")
    logging.getLogger("lightning.pytorch").info("lightning says hi")
    for _, handler in _installed:
        handler.flush()
    assert "something odd" in (log_dir / "nemo_error_log.txt").read_text()
    assert "something odd" in (log_dir / "nemo_log_globalrank-0_localrank-0.txt").read_text()
    assert "lightning says hi" in (log_dir / "lightning_logs.txt").read_text()
    assert "lightning says hi" not in (log_dir / "nemo_error_log.txt").read_text()


def test_git_info_inside_a_repository(make_trainer: Callable[..., pl.Trainer], tmp_path: Path) -> None:
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "train.py").write_text("print(1)\n")
    subprocess.run([*git, "add", "train.py"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "first"], check=True)
    (tmp_path / "train.py").write_text("print(2)\n")
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout
    log_dir = exp_manager(make_trainer(), {"explicit_log_dir": "run", **QUIET})
    assert log_dir is not None
    info = (log_dir / "git-info.log").read_text()
    assert info.startswith(f"commit hash: {head}") and "+print(2)" in info


def test_a_reused_log_dir_moves_earlier_files_into_run_n(make_trainer: Callable[..., pl.Trainer],
                                                         tmp_path: Path) -> None:
    log_dir = tmp_path / "run"
    config = {"explicit_log_dir": str(log_dir), "create_checkpoint_callback": False,
              "create_dllogger_logger": True, "sinks": {"events": {"type": "jsonl"}}}
    assert exp_manager(make_trainer(), config) == log_dir
    detach_log_files()
    for name in ("events.out.tfevents.1.host.1.0", "journal.msgpack", "journal.rank1.msgpack", "events.jsonl",
                 "dllogger.json", "hparams.yaml", "notes.txt"):
        (log_dir / name).write_text("x")
    (log_dir / "some_folder").mkdir()
    exp_manager(make_trainer(), config)
    run_0 = log_dir / "run_0"
    moved = sorted(p.name for p in run_0.iterdir())
    assert moved == ["cmd-args.log", "lightning_logs.txt", "nemo_error_log.txt",
                     "nemo_log_globalrank-0_localrank-0.txt", "notes.txt"]
    # Continued on resume: TensorBoard files, journals, the sinks' files; folders never move.
    for name in ("events.out.tfevents.1.host.1.0", "journal.msgpack", "journal.rank1.msgpack", "events.jsonl",
                 "dllogger.json", "hparams.yaml", "some_folder", "cmd-args.log"):
        assert (log_dir / name).exists(), name
    exp_manager(make_trainer(), config)
    assert (log_dir / "run_1" / "cmd-args.log").is_file()


def test_move_previous_run_numbers_after_the_largest(tmp_path: Path) -> None:
    (tmp_path / "run_0").mkdir()
    (tmp_path / "run_3").mkdir()
    (tmp_path / "a.txt").write_text("a")
    assert move_previous_run(tmp_path, []) == tmp_path / "run_4"
    assert move_previous_run(tmp_path, []) is None  # nothing left to move
    assert move_previous_run(tmp_path / "missing", []) is None


def test_rank_log_files_follow_the_rank_zero_only_switches(tmp_path: Path) -> None:
    from expbus.trainer_bridge.exp_manager import load_exp_manager_config

    for config, rank, expected in (({"log_global_rank_0_only": True}, (1, 1), False),
                                   ({"log_global_rank_0_only": True}, (0, 0), True),
                                   ({"log_local_rank_0_only": True}, (3, 1), False),
                                   ({"log_local_rank_0_only": True}, (2, 0), True),
                                   ({}, (5, 1), True)):
        detach_log_files()
        attach_rank_log(tmp_path, global_rank=rank[0], local_rank=rank[1], config=load_exp_manager_config(config))
        assert bool(_installed) is expected, (config, rank)
    detach_log_files()


def test_log_files_of_an_earlier_call_are_detached(make_trainer: Callable[..., pl.Trainer]) -> None:
    root = logging.getLogger()
    before = len(root.handlers)
    exp_manager(make_trainer(), {"explicit_log_dir": "a", **QUIET})
    added = len(root.handlers) - before
    exp_manager(make_trainer(), {"explicit_log_dir": "b", **QUIET})
    assert len(root.handlers) - before == added  # replaced, not accumulated (NeMo keeps adding them)
    detach_log_files()
    assert len(root.handlers) == before


def test_agreement_at_setup_moves_a_rank_to_rank_zeros_dir(tmp_path: Path) -> None:
    mine = LogDir(path=tmp_path / "e" / "n" / "2024-01-01_00-00-01", exp_dir=tmp_path / "e", name="n",
                  version="2024-01-01_00-00-01", auto_version=True)
    agreed = tmp_path / "e" / "n" / "2024-01-01_00-00-00"
    mine.path.mkdir(parents=True)
    from expbus.trainer_bridge.exp_manager import load_exp_manager_config

    attach_rank_log(mine.path, global_rank=1, local_rank=1, config=load_exp_manager_config({}))
    logging.getLogger("user").warning("before the agreement")
    trainer = SimpleNamespace(world_size=2, global_rank=1, _default_root_dir=str(mine.path),
                              strategy=SimpleNamespace(broadcast=lambda obj, src=0: str(agreed)))
    agreement = LogDirAgreement(mine)
    agreement.setup(trainer, None, "fit")  # type: ignore[arg-type]
    logging.getLogger("user").warning("after the agreement")
    for _, handler in _installed:
        handler.flush()
    text = (agreed / "nemo_log_globalrank-1_localrank-1.txt").read_text()
    assert "before the agreement" in text and "after the agreement" in text
    assert not mine.path.exists()  # the folder this rank made alone is gone
    assert trainer._default_root_dir == str(agreed)
    assert os.environ[ENV_VERSION] == agreed.name
    assert agreement.log_dir.path == agreed


_RANK_SCRIPT = """
import os, sys, time
import torch.distributed as dist
rank, exp_dir, init_file = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=2)
if rank == 1:
    # This process's clock is an hour ahead: left alone, it would pick another version.
    real = time.strftime
    time.strftime = lambda fmt, *args: real(fmt, time.localtime(time.time() + 3600))
import lightning.pytorch as pl
from expbus.trainer_bridge.exp_manager import exp_manager
trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)
print("LOGDIR", exp_manager(trainer, {"exp_dir": exp_dir, "create_tensorboard_logger": False}))
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.timeout(110)
def test_ranks_agree_by_broadcast_when_torch_distributed_is_up(tmp_path: Path) -> None:
    script = tmp_path / "ranks.py"
    script.write_text(_RANK_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != ENV_VERSION}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), str(tmp_path / "exps"),
                               str(tmp_path / "init")], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [proc.communicate(timeout=100) for proc in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    dirs = [next(line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("LOGDIR")) for out, _ in outputs]
    assert dirs[0] == dirs[1]
    versions = list((tmp_path / "exps" / "default").iterdir())
    assert [v.name for v in versions] == [Path(dirs[0]).name]
