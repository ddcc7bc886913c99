"""Whether `genlab train` into a directory starts afresh, resumes, or is refused.

Asked by the command line before Hydra starts (cli), by a job before it takes the lock (job)
and by the loop's main process before anyone writes status.json (loop): one answer for all three.
It reads the directory through RunDir and imports nothing of the loop.
"""

from __future__ import annotations

from genlab.run_dir import RunDir


def resume_decision(run: RunDir) -> str:
    """For a `genlab train` into `run`: "fresh", "resume" (a requeued job that was interrupted),
    or the sentence refusing to train over an existing run.

    A scheduler requeues a pre-empted job with the same command in the same directory; that
    is the only case where training into a directory that holds a run goes on.
    """
    if not run.holds_run():
        return "fresh"
    status = run.read_status()
    if status["status"] == "interrupted":
        return "resume"
    what = f"{status['status']} at step {status.get('step', '?')}" if status["status"] == "finished" else status["status"]
    return (f"{run.path} already holds a run ({what}); nothing was changed. Continue it with "
            f"`genlab resume {run.path} trainer.max_steps=N`, or train into another directory.")
