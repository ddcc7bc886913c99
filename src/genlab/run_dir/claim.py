"""Naming a new run directory: the start time, unique among simultaneous starts."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from genlab.errors import GenlabError
from genlab.run_dir.directory import RunDir

_claimed: dict[str, str] = {}


def _group() -> tuple[str, float]:
    """Who starts together: this process, or under a multi-process launcher (torchrun,
    accelerate) the launcher, so that every rank of one job claims the same directory."""
    import psutil

    pid = os.getpid()
    if int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))) > 1:
        pid = os.getppid()
    started = psutil.Process(pid).create_time()
    return f"{socket.gethostname()}:{pid}:{started:.3f}", started


def claim_new_dir(parent: str | Path, fmt: str = "%Y-%m-%d_%H-%M-%S") -> str:
    """A new directory under `parent` named by the start time, unique among simultaneous starts.

    Two jobs started in the same second get `<time>` and `<time>_2`: the first to create
    `<dir>/.claim` (an atomic hard link of a file holding its group id) owns the name. Ranks
    of one launched job share a group, so they agree on one directory. The answer is
    remembered for the process: Hydra resolves its run directory several times.
    """
    parent = str(parent)
    if parent in _claimed:
        return _claimed[parent]
    group, started = _group()
    stamp = time.strftime(fmt, time.localtime(started))
    for i in range(1, 10_000):
        candidate = Path(parent) / (stamp if i == 1 else f"{stamp}_{i}")
        claim, mine = candidate / ".claim", candidate / f".claim.{os.getpid()}"
        try:
            candidate.mkdir(parents=True, exist_ok=True)
            mine.write_text(group)
        except OSError as error:
            raise GenlabError(f"cannot make a run directory under {parent} ({error.strerror}); choose another "
                              "folder with runs_root=... or GENLAB_RUNS=...") from None
        try:
            os.link(mine, claim)
            owner = group
        except FileExistsError:
            owner = claim.read_text()
        finally:
            mine.unlink()
        if owner == group and not RunDir(candidate).holds_run():
            _claimed[parent] = str(candidate)
            return _claimed[parent]
    raise GenlabError(f"could not find a free run directory name under {parent}")
