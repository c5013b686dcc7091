"""The rolling pool: each job a subprocess on a free slot, the next one started as soon as a slot frees."""

from __future__ import annotations

import logging
import subprocess
import time
from collections import deque
from collections.abc import Iterable, Sequence
from typing import IO

from ._jobs import Job
from ._report import StatusLine
from ._slots import Slot

__all__ = ["run_pool"]

log = logging.getLogger(__name__)

# A started job: the job, its slot, its process, its open log file, its start time.
_Running = tuple[Job, Slot, "subprocess.Popen[bytes]", IO[bytes], float]

_POLL_SECONDS = 0.2
_TERMINATE_GRACE = 10.0


def run_pool(jobs: Sequence[Job], slots: Sequence[Slot], status: StatusLine) -> None:
    """Run every job, at most one per slot at a time, and fill in each job's exit code and duration.

    A failing job does not stop the others. On ``KeyboardInterrupt`` the running jobs are
    terminated (then killed after a grace period) before the interrupt propagates.

    Args:
        jobs: the jobs, started in order.
        slots: where they may run; a job's ``CUDA_VISIBLE_DEVICES`` follows its slot.
        status: the live status line.
    """
    queue = deque(jobs)
    free = deque(slots)
    running: dict[int, _Running] = {}
    try:
        while queue or running:
            while queue and free:
                job, slot = queue.popleft(), free.popleft()
                running[job.num] = _start(job, slot, status, jobs)
            for num, (job, slot, proc, out, started) in list(running.items()):
                if proc.poll() is None:
                    continue
                out.close()
                job.returncode = proc.returncode
                job.seconds = time.monotonic() - started
                del running[num]
                free.append(slot)
                status.clear()
                log.info("#%d %s on %s: %s (rc=%d, %.1fs)", job.num, job.shown_overrides, slot.label,
                         "done" if job.returncode == 0 else "FAILED", job.returncode, job.seconds)
            status.update(jobs)
            if running:
                time.sleep(_POLL_SECONDS)
    except BaseException:
        _stop(running.values())
        raise
    finally:
        status.clear()


def _start(job: Job, slot: Slot, status: StatusLine, jobs: Sequence[Job]) -> _Running:
    job.slot = slot.label
    job.env = dict(job.env)
    if slot.gpu is not None:
        job.env["CUDA_VISIBLE_DEVICES"] = slot.gpu
    job.log_path.parent.mkdir(parents=True, exist_ok=True)
    out = open(job.log_path, "wb")
    out.write(("$ " + " ".join(job.command) + "\n").encode())
    out.flush()
    status.clear()
    log.info("#%d %s on %s: started (log: %s)", job.num, job.shown_overrides, slot.label, job.log_path)
    proc = subprocess.Popen(job.command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=job.env)
    status.update(jobs, force=True)
    return job, slot, proc, out, time.monotonic()


def _stop(running: Iterable[_Running]) -> None:
    """Terminate the running jobs, then kill those still alive after the grace period."""
    entries = list(running)
    for _, _, proc, _, _ in entries:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + _TERMINATE_GRACE
    for _, _, proc, out, _ in entries:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        out.close()
