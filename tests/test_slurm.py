"""Sweeps on a real one-node SLURM cluster (`bash scripts/slurm_local.sh up`; `make test-slurm`).

Everything here goes through `genlab train -m hydra/launcher=slurm`: sbatch, job arrays, SLURM's
own signals, `scontrol requeue`, time limits, and no accounting database (`sacct` fails on this
cluster, as on many small ones). The tiny DDPM of the other tests trains on one CPU per job.

SLURM holds a requeued job for about two minutes before it may start again (Reason=BeginTime);
`released` lets such jobs start at once, so that each test takes one minute instead of several.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import GENLAB, TINY_DDPM, genlab

pytestmark = pytest.mark.slurm

ON_SLURM = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=1"]
QUIET = ["trainer.sample_every=0", "trainer.eval_every=0", "trainer.log_every=10"]
#: Long enough that a signal sent after the first checkpoint lands while the job trains (~20 steps/s).
LONG = ["trainer.max_steps=400", "trainer.checkpoint_every=40", *QUIET]


@pytest.fixture(scope="module", autouse=True)
def cluster() -> None:
    if shutil.which("sinfo") is None or subprocess.run(["sinfo", "-h"], capture_output=True).returncode != 0:
        pytest.skip("no SLURM cluster is running here: `bash scripts/slurm_local.sh up` starts one (needs root)")


def squeue() -> list[tuple[str, str, str]]:
    """(job id, state, reason) of every job in the queue; array tasks as `JOB_TASK`."""
    out = subprocess.run(["squeue", "-h", "--array", "-o", "%i|%T|%r"], capture_output=True, text=True).stdout
    return [tuple(line.split("|")) for line in out.splitlines() if line.strip()]


@contextmanager
def released() -> Iterator[list[int]]:
    """Let requeued jobs start at once; yields the most jobs seen RUNNING at the same time (so far)."""
    most, stop = [0], threading.Event()

    def watch() -> None:
        while not stop.wait(0.3):
            jobs = squeue()
            most[0] = max(most[0], sum(state == "RUNNING" for _, state, _ in jobs))
            for job, state, reason in jobs:
                if state == "PENDING" and reason == "BeginTime":
                    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], capture_output=True)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield most
    finally:
        stop.set()
        thread.join()


def sweep(sweep_dir: Path, *overrides: str) -> subprocess.Popen:
    command = [GENLAB, "train", "-m", *ON_SLURM, *TINY_DDPM, *overrides, f"hydra.sweep.dir={sweep_dir}"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def finish(process: subprocess.Popen, timeout: float = 420) -> str:
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        subprocess.run(["scancel", "--user", os.environ.get("USER", "root")])
        raise AssertionError(f"the sweep did not return within {timeout:.0f} s")
    return out


def train_here(run: Path, *overrides: str) -> subprocess.Popen:
    """The straight run, on this machine outside SLURM, beside the sweep (the same code, one thread)."""
    return subprocess.Popen([GENLAB, "train", *TINY_DDPM, *overrides, f"hydra.run.dir={run}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})


def job_of_task(task: int) -> str:
    """The SLURM id (`JOB_TASK`) of array task `task` in the queue now."""
    return next(job for job, _, _ in squeue() if job.endswith(f"_{task}") or job == str(task))


def wait_for(condition, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def has_checkpoint(run: Path) -> bool:
    return any((run / "checkpoints").glob("step_*"))


def losses(run: Path) -> list[dict]:
    """metrics.jsonl without the timings: what a resumed run must log exactly as the straight run."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "images_per_s"} for row in rows]


def test_a_sweep_runs_at_most_array_parallelism_jobs_at_once_and_reports_the_jobs_that_did_not_finish(tmp_path):
    """5 jobs, `array_parallelism: 2`; the third has a value no job can train with, and the last is
    cancelled outside genlab (`scancel`, no checkpoint, no result): the sweep still returns, and
    says what became of each."""
    with released() as most_running:
        process = sweep(tmp_path / "s", "hydra.launcher.array_parallelism=2", "trainer.max_steps=60", *QUIET,
                        "trainer.lr=1e-3,2e-3,-1,3e-3,4e-3")
        wait_for(lambda: any(job.endswith("_4") and state == "RUNNING" for job, state, _ in squeue()), "job 4")
        subprocess.run(["scancel", job_of_task(4)], check=True)
        out = finish(process)
    assert process.returncode == 1, out
    assert "2 of 5 jobs were not finished (#2 failed: ConfigError: trainer.lr=-1 must be a number > 0" in out, out
    assert "  #4 " in out and "#4 finished" not in out, out
    assert "Traceback" not in out and out.count("sacct is not usable") == 1, out
    assert most_running[0] == 2, f"at most {most_running[0]} jobs ran at once"
    for i in (0, 1, 3):
        assert json.loads((tmp_path / "s" / f"{i}_ddpm" / "status.json").read_text())["status"] == "finished"
    listed = genlab("runs", str(tmp_path / "s")).stdout
    assert "failed: trainer.lr=-1 must be a number > 0" in listed and listed.count("finished") == 3, listed


def test_jobs_preempted_on_slurm_resume_and_log_what_the_straight_run_logs(tmp_path):
    """Job 0 gets USR2 on its steps (a pre-emption: submitit requeues it), job 1 `scontrol requeue`
    (SIGTERM to the steps), job 2 `scancel --full --signal=USR2` (the batch shell too, which the
    launcher's `trap '' USR2` keeps alive). Each then resumes from its newest checkpoint and ends
    with the straight run's losses, bitwise (the same operations on the same CPU)."""
    straight = tmp_path / "straight"
    here = train_here(straight, *LONG)
    runs = [tmp_path / "s" / f"{i}_ddpm" for i in range(3)]
    signals = [["scancel", "--signal=USR2"], ["scontrol", "requeue"], ["scancel", "--full", "--signal=USR2"]]
    with released():
        process = sweep(tmp_path / "s", "hydra.launcher.array_parallelism=2", *LONG, "trainer.seed=0,0,0")
        for task, (run, command) in enumerate(zip(runs, signals)):
            wait_for(lambda: has_checkpoint(run) or process.poll() is not None, f"job {task}'s first checkpoint")
            subprocess.run([*command, job_of_task(task)], check=True)
        out = finish(process)
    assert process.returncode == 0 and here.wait() == 0, out
    for run in runs:
        log = (run / "train.log").read_text()
        assert "resumed from" in log and "received: checkpointing" in log, f"{run.name} was not interrupted:\n{log}"
        assert losses(run) == losses(straight), run.name


def steps_per_second(tmp_path: Path) -> float:
    """This machine's optimizer steps per second on TINY_DDPM, from a short run's logged images/s."""
    from omegaconf import OmegaConf

    run = tmp_path / "probe"
    subprocess.run([GENLAB, "train", *TINY_DDPM, "trainer.max_steps=200", *QUIET, f"hydra.run.dir={run}"],
                   check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    images_per_s = [row["images_per_s"] for row in rows if "images_per_s" in row][-1]
    return images_per_s / OmegaConf.load(run / ".hydra" / "config.yaml").trainer.batch_size


def test_a_job_warned_before_its_time_limit_checkpoints_requeues_and_finishes(tmp_path):
    """`timeout_min: 2`, `signal_delay_s: 60`: SLURM sends USR2 about 60 s before the limit (its
    timer ticks every 30 s); the job checkpoints, submitit requeues it, and it ends as straight."""
    # About 100 s of training on this machine, so the job is still running when the warning comes
    # 60 to 90 s in (a fixed 1,600 steps finished in 31 s on a quiet fast machine and was never warned).
    steps = 100 * min(60, max(16, round(steps_per_second(tmp_path))))
    long = [f"trainer.max_steps={steps}", "trainer.checkpoint_every=100", *QUIET]
    straight = tmp_path / "straight"
    here = train_here(straight, *long)
    with released():
        process = sweep(tmp_path / "s", "hydra.launcher.timeout_min=2", "hydra.launcher.signal_delay_s=60",
                        "hydra.launcher.max_num_timeout=6", *long)
        out = finish(process, timeout=540)
    assert process.returncode == 0 and here.wait() == 0, out
    run = tmp_path / "s" / "0_ddpm"
    log = (run / "train.log").read_text()
    assert "SIGUSR2 received: checkpointing" in log and "Job has timed out" in log, log
    assert losses(run) == losses(straight)


def test_optuna_trials_run_two_at_a_time_on_slurm(tmp_path):
    """`hydra.sweeper.n_jobs=2`: the study asks for two trials at once and the launcher runs them as
    one job array; 4 trials in all, each a finished run, the best one named."""
    with released() as most_running:
        process = sweep(tmp_path / "s", "sweep=ddpm_optuna", "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2",
                        "sweep_objective=loss", "trainer.max_steps=40", *QUIET)
        out = finish(process)
    assert process.returncode == 0, out
    assert most_running[0] == 2, f"at most {most_running[0]} trials ran at once"
    results = (tmp_path / "s" / "optimization_results.yaml").read_text()
    assert "best_value" in results and "best_run" in results, results
    assert sorted(p.name for p in (tmp_path / "s").glob("*_ddpm")) == [f"{i}_ddpm" for i in range(4)]


def test_two_tasks_of_one_job_train_one_run_on_two_processes(tmp_path):
    """`tasks_per_node: 2`: SLURM starts two tasks; their ranks, world size and main address come
    from SLURM's environment (genlab.train.world), so they train one run with batch 4 each, which
    is the run of one process with batch 8 (to float rounding: the gradients are summed in
    another order), logged once by rank 0."""
    run_overrides = ["trainer.max_steps=20", "trainer.log_every=5", *QUIET[:2]]
    here = train_here(tmp_path / "one", *run_overrides, "trainer.batch_size=8")
    process = sweep(tmp_path / "s", "hydra.launcher.tasks_per_node=2", *run_overrides, "trainer.batch_size=4")
    out = finish(process)
    assert process.returncode == 0 and here.wait() == 0, out
    two = [json.loads(line) for line in (tmp_path / "s" / "0_ddpm" / "metrics.jsonl").read_text().splitlines()]
    one = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in two] == [r["step"] for r in one] == [5, 10, 15, 20]
    for a, b in zip(two, one):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * max(1.0, abs(b["loss"])), (a, b)
    assert len(list((tmp_path / "s" / ".submitit").rglob("*_1_log.out"))) == 1  # really a second task
