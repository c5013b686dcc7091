"""Preemption under DDP: two real gloo processes on CPU, the signal reaches one rank, every rank stops at one step.

The processes are started here as a launcher such as ``torchrun`` or SLURM's ``srun`` does (``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT`` in the environment; Lightning's ``ddp`` strategy joins them),
so each rank's pid and exit status are the test's to see.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from expbus.bus import Metrics, RunFinished, RunStarted, read_journal

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

STEPS_PER_EPOCH = 100  # 800 rows, batches of 4, two ranks

SCRIPT = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path

    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from expbus.trainer_bridge.exp_manager import exp_manager
    from expbus.trainer_bridge.preemption import PreemptionCallback

    log_dir, max_steps, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    rank = int(os.environ["LOCAL_RANK"])


    class Slow(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.layer(x), y)
            self.log("train_loss", loss)
            time.sleep(0.02)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

        def on_train_start(self):
            (out / f"start.rank{rank}").write_text(str(self.trainer.global_step))

        def on_train_batch_end(self, outputs, batch, batch_idx):
            with (out / f"steps.rank{rank}").open("a") as f:
                f.write(f"{self.trainer.global_step}\\n")


    torch.manual_seed(0)
    x = torch.randn(800, 4)
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=max_steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         log_every_n_steps=1)
    exp_manager(trainer, {
        "explicit_log_dir": log_dir, "resume_if_exists": True, "resume_ignore_no_checkpoint": True,
        "create_tensorboard_logger": False, "seconds_to_sleep": 0, "ema": {"enable": True, "decay": 0.9},
        "sinks": {"events": {"type": "jsonl"}},
        "checkpoint_callback_params": {"monitor": None, "filename": "{step}", "every_n_epochs": 1},
    })
    trainer.fit(Slow(), data)
    (callback,) = [c for c in trainer.callbacks if isinstance(c, PreemptionCallback)]
    (out / f"end.rank{rank}").write_text(f"{trainer.global_step} {callback.preempted}")
""")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def launched() -> Iterator[list[subprocess.Popen[str]]]:
    """Every rank process a test starts; any still running at the end (a failure, a timeout) is killed."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        elif proc.stdout is not None and not proc.stdout.closed:
            proc.stdout.close()


def _launch(launched: list[subprocess.Popen[str]], tmp_path: Path, log_dir: Path, max_steps: int,
            out: Path) -> list[subprocess.Popen[str]]:
    """Both ranks, as ``torchrun --nproc-per-node=2`` starts them."""
    out.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT)
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NEMO_EXPM", "SLURM_"))}
        env.update(PYTHONWARNINGS="ignore", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
                   NODE_RANK="0", LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo")
        procs.append(subprocess.Popen([sys.executable, str(script), str(log_dir), str(max_steps), str(out)],
                                      cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    launched.extend(procs)
    return procs


def _finish(procs: list[subprocess.Popen[str]], timeout: float) -> list[str]:
    """Every rank's output, once all have exited within ``timeout`` seconds (else the test fails)."""
    deadline = time.monotonic() + timeout
    try:
        outputs = [proc.communicate(timeout=max(deadline - time.monotonic(), 0.1))[0] for proc in procs]
    except subprocess.TimeoutExpired:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        outputs = [proc.communicate()[0] for proc in procs]
        pytest.fail(f"the ranks did not all exit within {timeout} s:\n" + "\n".join(o[-3000:] for o in outputs))
    return outputs


def _wait_for_steps(out: Path, procs: list[subprocess.Popen[str]], steps: int, timeout: float) -> None:
    progress = out / "steps.rank0"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(proc.poll() is not None for proc in procs):
            outputs = _finish(procs, 10)
            pytest.fail("training ended early:\n" + "\n".join(o[-3000:] for o in outputs))
        if progress.is_file() and len(progress.read_text().split()) >= steps:
            return
        time.sleep(0.05)
    for proc in procs:
        proc.kill()
    outputs = [proc.communicate()[0] for proc in procs]
    pytest.fail(f"training did not reach step {steps} in {timeout} s:\n" + "\n".join(o[-3000:] for o in outputs))


def _train_steps(events: list[object]) -> list[int]:
    return [e.step for e in events if isinstance(e, Metrics) and "train_loss" in e.values]


def _ends(out: Path) -> list[str]:
    return [(out / f"end.rank{rank}").read_text() for rank in (0, 1)]


@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.parametrize("signalled", [0, 1], ids=["rank0", "rank1"])
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path: Path, signalled: int,
                                                                 launched: list[subprocess.Popen[str]]) -> None:
    """Rank 0 (the case the broadcast covered) or only rank 1: both ranks save, record and stop at one step.

    With rank 1 only (a launcher or node that signals some ranks), the old broadcast of rank 0's
    flag lost the signal: the handler had replaced the default one, so training just went on.
    Rank 0's case then resumes on two ranks at exactly the next step (about 12 s idle, 25 s with
    the resume; the rank 1 case skips the resume, which is the same path).
    """
    log_dir, out = tmp_path / "run", tmp_path / "out"
    procs = _launch(launched, tmp_path, log_dir, 10_000, out)
    _wait_for_steps(out, procs, 10, timeout=35)
    procs[signalled].send_signal(signal.SIGTERM)
    outputs = _finish(procs, 20)
    # Documented: fit returns normally on every rank, so each process exits 0 (as NeMo's sys.exit(0)).
    assert [proc.returncode for proc in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    end0, end1 = _ends(out)
    assert end0 == end1, (end0, end1)  # the same step on both ranks, and both know they were preempted
    stopped = int(end0.split()[0])
    assert end0.split()[1] == "True"
    assert 10 <= stopped < STEPS_PER_EPOCH  # mid-epoch
    for rank in (0, 1):
        assert (out / f"steps.rank{rank}").read_text().split() == [str(s) for s in range(1, stopped + 1)]

    folder = log_dir / "checkpoints"
    last = folder / f"step={stopped}-last.ckpt"
    assert last.is_file() and (folder / f"step={stopped}-last-EMA.ckpt").is_file(), sorted(os.listdir(folder))
    state = torch.load(last, weights_only=False)
    assert state["global_step"] == stopped and "optimizer_states" in state

    for journal in (read_journal(log_dir), read_journal(log_dir / "journal.rank1.msgpack")):
        finished = [e for e in journal if isinstance(e, RunFinished)]
        assert [(e.status, e.step) for e in finished] == [("interrupted", stopped)]
        assert _train_steps(journal) == list(range(stopped))  # one train_loss per step, none lost
    if signalled != 0:
        return

    # Requeued with the same config, on two ranks again: both continue at exactly the next step.
    for path in out.iterdir():
        path.unlink()
    outputs = _finish(_launch(launched, tmp_path, log_dir, stopped + 3, out), 30)
    assert _ends(out) == [f"{stopped + 3} False"] * 2, "\n".join(o[-3000:] for o in outputs)
    for rank in (0, 1):
        assert int((out / f"start.rank{rank}").read_text()) == stopped
        assert (out / f"steps.rank{rank}").read_text().split() == [str(stopped + i) for i in (1, 2, 3)]
    for journal in (read_journal(log_dir), read_journal(log_dir / "journal.rank1.msgpack")):
        second = journal[max(i for i, e in enumerate(journal) if isinstance(e, RunStarted)):]
        assert _train_steps(second) == [stopped, stopped + 1, stopped + 2]
        assert [e.status for e in second if isinstance(e, RunFinished)] == ["completed"]
