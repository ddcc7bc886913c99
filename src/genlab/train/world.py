"""Which process of which run this is, when no launcher said so: SLURM's tasks as one run's ranks.

`accelerate launch` / torchrun (what `genlab train --processes P` and `--nodes N` use) set
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for every process they start. Under
SLURM, `srun` (and submitit, which starts each task through `srun`) starts the processes
itself and says who is who in its own variables; `world_from_slurm` translates them, as
PyTorch Lightning's SLURMEnvironment and submitit's JobEnvironment do, so that each SLURM task
is one process of one run. Call it before anything asks for the rank (the run directory's
lock, `Accelerator()`): `genlab.train.entry.hydra_train` does, first thing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import MutableMapping

LAUNCHED = ("RANK", "LOCAL_RANK")  # set by a launcher: it knows better than SLURM's task variables


def hostnames(nodelist: str) -> list[str]:
    """SLURM's compact host list (`node[01-03,07],gpu5`) as host names, in SLURM's order.

    `scontrol show hostnames` when SLURM's tools are installed (it knows every form); else the
    forms SLURM writes for one-level brackets: `a,b`, `node[01-02]`, `rack1-node[1-2,5]`.
    """
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            out = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.split()
            if out:
                return out
        except (OSError, subprocess.SubprocessError):
            pass  # a node without a working scontrol: parse it ourselves
    hosts = []
    for prefix, ranges, suffix in re.findall(r"([^,\[]+)(?:\[([^\]]*)\])?([^,\[]*)", nodelist):
        if not ranges:
            hosts.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            first, _, last = part.partition("-")
            for number in range(int(first), int(last or first) + 1):
                hosts.append(f"{prefix}{number:0{len(first)}d}{suffix}")  # node[01-02]: keep the zero padding
    return hosts


def tasks_on_node(tasks_per_node: str, node: int) -> int:
    """The number of tasks on node `node` from SLURM_TASKS_PER_NODE's `2(x3),1` form (3 nodes with 2, then 1)."""
    counts = []
    for count, times in re.findall(r"(\d+)(?:\(x(\d+)\))?", tasks_per_node):
        counts += [int(count)] * int(times or 1)
    return counts[node] if node < len(counts) else counts[-1]


def world_from_slurm(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, NODE_RANK, MASTER_ADDR and MASTER_PORT
    in `environ` from a SLURM job step of several tasks; returns what it set ({} otherwise).

    Nothing is set outside an `srun` step (a batch script's own shell runs one process, whatever
    SLURM_NTASKS says), for a step of one task, or when a launcher already set the ranks.
    MASTER_ADDR is the step's first host (task 0 runs there under SLURM's default block
    distribution); MASTER_PORT is 15000 + the job id's last 4 digits, the same on every node
    and different for jobs sharing a node (Lightning's choice); both can be set by hand first.
    """
    tasks = int(environ.get("SLURM_STEP_NUM_TASKS") or 1)  # set by srun only, for the tasks of this step
    if tasks <= 1 or "SLURM_PROCID" not in environ or any(k in environ for k in LAUNCHED):
        return {}
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    node = int(environ.get("SLURM_NODEID", 0))
    per_node = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE") or str(tasks)
    world = {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": str(tasks),
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": str(tasks_on_node(per_node, node)),
        "NODE_RANK": str(node),
        "MASTER_ADDR": environ.get("MASTER_ADDR") or (hostnames(nodelist)[0] if nodelist else "127.0.0.1"),
        "MASTER_PORT": environ.get("MASTER_PORT") or str(15000 + int(environ.get("SLURM_JOB_ID", "0")[-4:] or 0)),
    }
    environ.update(world)
    return world
