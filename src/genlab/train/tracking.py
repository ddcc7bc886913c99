"""Where a run reports: metrics.jsonl, W&B (never fatal) and a progress display."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from genlab.run_dir import RunDir

log = logging.getLogger(__name__)
#: Where W&B keeps its caches; each run points them into its own directory unless the user set them.
WANDB_DIR_VARS = ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR")
_USER_WANDB_DIRS = {var: os.environ.get(var) for var in WANDB_DIR_VARS}


def wandb_mode(requested: str) -> str:
    """"auto" means online when the user is logged in to W&B, offline otherwise."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if requested != "auto":
        return requested
    try:
        import wandb

        return "online" if wandb.api.api_key else "offline"
    except Exception:
        return "offline"


class Tracker:
    """Writes one JSON object per logged step to metrics.jsonl and mirrors it to W&B.

    A W&B failure (import, init, or any log call) is logged once as a warning and W&B is
    switched off for the rest of the run: tracking never stops training.

    On resume, W&B keeps the same run id, and steps up to `logged_until` (what the
    interrupted attempt already sent, past its last checkpoint) go to metrics.jsonl only:
    resume is bitwise, so W&B already holds those exact values, and its history never
    steps backwards. Offline, each attempt is an `offline-run-*` folder with the same id;
    `wandb sync RUN_DIR/wandb/offline-run-*` uploads them, in order, as one run.
    """

    def __init__(self, run: RunDir, cfg: DictConfig, run_id: str | None = None, enabled: bool = True,
                 logged_until: int = 0):
        self.run, run_dir = run, run.path
        self.enabled = enabled
        self.wandb = None
        self.run_id = run_id
        self.logged_until = logged_until
        if not enabled or cfg.logger.name != "wandb":
            return
        try:
            import wandb

            # Keep every W&B file inside this run's directory, not in ~/.cache, ~/.local or the
            # directory of the previous job of a multirun in the same process.
            for var in WANDB_DIR_VARS:
                os.environ[var] = _USER_WANDB_DIRS[var] or str(run_dir / "wandb" / ".cache")
            self.wandb = wandb.init(
                project=cfg.logger.project, entity=cfg.logger.entity, group=cfg.logger.group,
                tags=list(cfg.logger.tags), name=f"{run_dir.parent.name}/{run_dir.name}", dir=str(run_dir),
                config=OmegaConf.to_container(cfg, resolve=True), id=run_id, resume="allow" if run_id else None,
                mode=wandb_mode(cfg.logger.mode), settings=wandb.Settings(console="off", silent=True),
            )
            self.run_id = self.wandb.id
        except Exception as error:
            log.warning("W&B is off for this run: wandb.init failed (%s). Training goes on; metrics.jsonl has everything.", error)
            self.wandb = None

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.run.append_metrics({"step": step, **scalars})
        if step > self.logged_until:
            self._wandb_call("log", scalars, step=step)

    def log_image(self, step: int, key: str, path: Path) -> None:
        if self.wandb is not None and step > self.logged_until:
            import wandb

            self._wandb_call("log", {key: wandb.Image(str(path))}, step=step)

    def _wandb_call(self, method: str, *args: Any, **kwargs: Any) -> None:
        if self.wandb is None:
            return
        try:
            getattr(self.wandb, method)(*args, **kwargs)
        except Exception as error:
            log.warning("W&B is off from now on: %s failed (%s). metrics.jsonl keeps everything.", method, error)
            self.wandb = None

    def finish(self, exit_code: int = 0) -> None:
        self._wandb_call("finish", exit_code=exit_code)


class Progress:
    """A rich progress bar (step, loss, images/s, ETA) on a terminal; plain log lines otherwise."""

    def __init__(self, total: int, start: int, mode: str = "auto", enabled: bool = True):
        self.total, self.enabled = total, enabled
        use_rich = mode == "rich" or (mode == "auto" and sys.stderr.isatty())
        self.bar = None
        if enabled and use_rich:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                    TimeRemainingColumn(), transient=False)
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()
        self.t0, self.step0 = time.perf_counter(), start

    def update(self, step: int, scalars: dict[str, float] | None = None) -> None:
        """Advance to `step`; with `scalars` (at log steps) also show/print them."""
        if not self.enabled:
            return
        info = ""
        if scalars:
            shown = {k: v for k, v in scalars.items() if "loss" in k or k == "images_per_s"}
            info = "  ".join(f"{k}={v:.4g}" for k, v in shown.items())
        if self.bar is not None:
            self.bar.update(self.task, completed=step, **({"info": info} if info else {}))
        elif scalars:
            rate = (step - self.step0) / max(1e-9, time.perf_counter() - self.t0)
            eta = (self.total - step) / rate if rate > 0 else float("nan")
            log.info("step %d/%d  %s  eta %.0fs", step, self.total, info, eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
