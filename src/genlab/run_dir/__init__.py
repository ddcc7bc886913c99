"""The run directory: its layout and every read and write of it, in one package.

A run directory is a user's data and, once copied, untrusted input (DESIGN.md, "Trust and
ownership"). Everything genlab reads from or writes to one goes through `RunDir`:

    RUN_DIR/
      .hydra/config.yaml     resolved config; `_target_`s checked against an allowlist on read
      .hydra/overrides.yaml  the command-line overrides (Hydra), plus `(resume) key=value` lines
      .lock                  held (flock) by the live run; pid and host inside, for the message
      status.json            running / finished / failed / interrupted
      metrics.jsonl          one JSON object per logged step; a torn last line is skipped
      train.log, samples/, checkpoints/ (see train/checkpoint.py), export/, eval/, wandb/, tensorboard/
      export/README.md       the model card (genlab.model_card), refreshed by `genlab eval`
      report.html            `genlab report RUN_DIR` (genlab.report)

Files are replaced atomically (write a temporary file, fsync, rename), so a kill never
leaves half a config or half a status. A symbolic link that leads out of the run refuses it
when it is opened (`require`) or locked (`locked`): nothing outside is read, written or deleted. Nothing here imports torch at module level: `genlab
runs` and argument errors stay fast.

The parts: `directory` (RunDir: layout, config, status, metrics, lock, checkpoint lookup),
`lock` (the flock), `trust` (the `_target_` allowlist), `claim` (naming new run directories)
and `load` (finding runs, rebuilding a family from one). Import from here.
"""

from genlab.run_dir.claim import claim_new_dir
from genlab.run_dir.directory import RunDir, atomic_write
from genlab.run_dir.load import find_runs, load_family, newest_finished_run
from genlab.run_dir.lock import RunLocked
from genlab.run_dir.trust import ALLOWED_TARGETS, ALLOWED_TARGETS_ENV, UntrustedConfig, check_targets

__all__ = ["ALLOWED_TARGETS", "ALLOWED_TARGETS_ENV", "RunDir", "RunLocked", "UntrustedConfig", "atomic_write",
           "check_targets", "claim_new_dir", "find_runs", "load_family", "newest_finished_run"]
