"""Sweeps on SLURM through submitit, made to finish: job states without accounting, and a summary.

Hydra's submitit launcher waits on each job with `sacct`. Many small clusters run without an
accounting database, where `sacct` fails on every poll: submitit then warns three times a poll
and never learns that a job died without writing its result (a job cancelled outside genlab, a
requeue budget spent), so the sweep waits forever. Here:

- `QueueWatcher` asks `sacct` once; where it fails, it says so in one line and follows the jobs
  with `squeue` instead (a job that has left the queue has ended).
- `launch` waits for every job of the batch, reads each run directory's `status.json` for the
  jobs that ended without a result, and logs one summary line per job (its status and, for a
  failure, its error line) instead of raising at the first failure.
"""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path
from typing import Any

from hydra.errors import CompactHydraException
from submitit.slurm.slurm import SlurmInfoWatcher

log = logging.getLogger("genlab")

#: How often (seconds) a job that has no result yet is looked up in the queue.
POLL_S = 15


class QueueWatcher(SlurmInfoWatcher):
    """submitit's job-state watcher, with `squeue` where `sacct` has no accounting to read."""

    def __init__(self, delay_s: int = POLL_S):
        super().__init__(delay_s=delay_s)
        self.use_squeue: bool | None = None  # decided by the first poll

    def _make_command(self) -> list[str] | None:
        command = super()._make_command()
        if command is None or not self.use_squeue:
            return command
        return ["squeue", "--me", "--noheader", "--array", "--format=%i|%T|%N"]

    def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
        if not self.use_squeue:
            return super().read_info(string)
        text = string.decode() if isinstance(string, bytes) else string
        queued = {}
        for line in text.splitlines():
            job_id, state, nodes = (line.split("|") + ["", ""])[:3]
            queued[job_id.strip()] = {"JobID": job_id.strip(), "State": state.strip(), "NodeList": nodes.strip()}
        # A job no longer in the queue has ended; its result file (or its absence) says how.
        gone = {j: {"JobID": j, "State": "LEFT_QUEUE", "NodeList": ""} for j in self._registered if j not in queued}
        return {**gone, **queued}

    def update(self) -> None:
        if self.use_squeue is None and self._make_command() is not None:
            probe = subprocess.run(["sacct", "--noheader", "-j", "1"], capture_output=True, text=True)
            self.use_squeue = probe.returncode != 0
            if self.use_squeue:
                reason = (probe.stderr.strip().splitlines() or ["sacct failed"])[0]
                log.info("sacct is not usable here (%s): following the jobs with squeue", reason)
        super().update()


class SweepJobsFailed(CompactHydraException):
    """Some jobs of a sweep batch failed; Hydra prints this one sentence instead of a traceback."""

    def __init__(self, failed: list[tuple[int, str, str]], total: int, sweep_dir: Path):
        i, status, error = failed[0]
        super().__init__(f"{len(failed)} of {total} jobs {'was' if len(failed) == 1 else 'were'} not finished "
                         f"(#{i} {status}: {error}); the others ran to their end: `genlab runs {sweep_dir}` lists them all.")


def job_summary(job: Any, run_dir: Path) -> tuple[str, str]:
    """(status, error line) of a finished submitit job, read from its result or its run directory."""
    from genlab.run_dir import RunDir

    try:
        ret = job.results()[0]
    except Exception:  # the job ended without writing its result (killed, cancelled, out of requeues)
        run = RunDir(run_dir)
        status = run.read_status() if run.status_file.exists() else {}
        why = f"the job ended without a result (cancelled, killed or out of requeues); its log: {job.paths.stderr}"
        return status.get("status", "lost"), status.get("error") or why
    if ret.status.name == "COMPLETED":
        return "finished", ""
    error = ret._return_value  # the task's exception (JobReturn.return_value would raise it)
    return "failed", f"{type(error).__name__}: {error}".splitlines()[0]


def wait_all(jobs: list[Any], poll_s: float = 1.0) -> None:
    """Wait until every job has ended (the watcher looks each up at most every POLL_S seconds)."""
    pending = set(range(len(jobs)))
    while pending:
        pending = {i for i in pending if not jobs[i].done()}
        if pending:
            time.sleep(poll_s)


def log_summary(overrides: list[list[str]], first_idx: int, summaries: list[tuple[str, str]]) -> None:
    """One line per job: its number, the overrides that tell it from the others, status and error line."""
    shared = set.intersection(*map(set, overrides)) if len(overrides) > 1 else set()
    overrides = [[o for o in job if o not in shared] for job in overrides]
    failed = sum(status != "finished" for status, _ in summaries)
    log.info("sweep batch: %d job(s), %d finished, %d not", len(summaries), len(summaries) - failed, failed)
    for idx, (job_overrides, (status, error)) in enumerate(zip(overrides, summaries), start=first_idx):
        line = f"  #{idx} {status}" + (f": {' '.join(job_overrides)}" if job_overrides else "")
        (log.warning if status != "finished" else log.info)("%s%s", line, f" -- {error}" if error else "")
