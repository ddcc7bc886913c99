"""Where a run reports: metrics.jsonl, the trackers of `logger=` (W&B, TensorBoard; never fatal) and a progress display.

`logger=wandb`, `logger=tensorboard`, `logger=[wandb,tensorboard]` or `logger=none`: each
chosen file of configs/logger/ adds its own section (`logger.wandb`, `logger.tensorboard`)
with `enabled: true`. metrics.jsonl is written whatever the choice.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from genlab.families.logged import losses
from genlab.run_dir import RunDir

log = logging.getLogger(__name__)
#: Where W&B keeps its caches; each run points them into its own directory unless the user set them.
WANDB_DIR_VARS = ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR")
_USER_WANDB_DIRS = {var: os.environ.get(var) for var in WANDB_DIR_VARS}


class ConsoleHandler(logging.StreamHandler):
    """Logs to whatever sys.stderr is when a record is written, not when the handler was made.

    Hydra builds its console handler once per job; a caller that swaps sys.stderr (a test
    runner, a notebook) and closes it would otherwise leave a handler writing to a closed file.
    """

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


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


def chosen_trackers(logger: DictConfig | dict) -> dict[str, dict[str, Any]]:
    """{"wandb": settings, "tensorboard": settings} for the trackers `logger` turns on.

    Runs saved before genlab had several trackers have one flat section with `name: wandb|none`;
    they resume with the tracker they had.
    """
    logger = OmegaConf.to_container(logger, resolve=True) if isinstance(logger, DictConfig) else dict(logger)
    if "name" in logger:  # the old, single-tracker layout
        return {"wandb": logger} if logger["name"] == "wandb" else {}
    return {name: section for name, section in logger.items()
            if isinstance(section, dict) and section.get("enabled")}


class WandbTracker:
    """One W&B run in RUN_DIR/wandb (offline unless logged in); keeps its id across resumes."""

    def __init__(self, run_dir: Path, cfg: DictConfig, settings: dict[str, Any], run_id: str | None):
        import wandb

        # Keep every W&B file inside this run's directory, not in ~/.cache, ~/.local or the
        # directory of the previous job of a multirun in the same process.
        for var in WANDB_DIR_VARS:
            os.environ[var] = _USER_WANDB_DIRS[var] or str(run_dir / "wandb" / ".cache")
        self.run = wandb.init(
            project=settings.get("project"), entity=settings.get("entity"), group=settings.get("group"),
            tags=list(settings.get("tags") or []), name=f"{run_dir.parent.name}/{run_dir.name}", dir=str(run_dir),
            config=OmegaConf.to_container(cfg, resolve=True), id=run_id, resume="allow" if run_id else None,
            mode=wandb_mode(settings.get("mode", "auto")), settings=wandb.Settings(console="off", silent=True),
        )
        self.id = self.run.id

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def log_image(self, step: int, key: str, path: Path) -> None:
        import wandb

        self.run.log({key: wandb.Image(str(path))}, step=step)

    def finish(self, exit_code: int) -> None:
        self.run.finish(exit_code=exit_code)


class TensorBoardTracker:
    """Event files in RUN_DIR/<logger.tensorboard.dir>, written by torch's SummaryWriter."""

    def __init__(self, run_dir: Path, settings: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.dir = run_dir / settings.get("dir", "tensorboard")
        self.writer = SummaryWriter(log_dir=str(self.dir), flush_secs=int(settings.get("flush_secs", 30)))
        self.id = None

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, global_step=step)

    def log_image(self, step: int, key: str, path: Path) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
        self.writer.add_image(key, pixels, global_step=step, dataformats="HWC")
        self.writer.flush()  # grids are rare and what people open TensorBoard for: make them visible now

    def finish(self, exit_code: int) -> None:
        self.writer.close()


class Tracker:
    """Writes one JSON object per logged step to metrics.jsonl and mirrors it to the chosen trackers.

    A tracker's failure (import, start, or any later call) is logged once as a warning and
    that tracker is switched off for the rest of the run: tracking never stops training.

    On resume, W&B keeps the same run id, and steps up to `logged_until` (what the
    interrupted attempt already sent, past its last checkpoint) go to metrics.jsonl only:
    resume is bitwise, so the trackers already hold those exact values, and their histories
    never step backwards. Offline, each W&B attempt is an `offline-run-*` folder with the same
    id; `wandb sync RUN_DIR/wandb/offline-run-*` uploads them, in order, as one run.
    TensorBoard reads every event file of its folder as one run.
    """

    def __init__(self, run: RunDir, cfg: DictConfig, run_id: str | None = None, enabled: bool = True,
                 logged_until: int = 0):
        self.run, self.enabled, self.logged_until = run, enabled, logged_until
        self.trackers: dict[str, Any] = {}
        self.run_id = run_id  # W&B's run id, kept in checkpoints so that a resume continues the same run
        if not enabled:
            return
        for name, settings in chosen_trackers(cfg.logger).items():
            try:
                if name == "wandb":
                    self.trackers[name] = WandbTracker(run.path, cfg, settings, run_id)
                    self.run_id = self.trackers[name].id
                elif name == "tensorboard":
                    self.trackers[name] = TensorBoardTracker(run.path, settings)
                else:
                    log.warning("logger.%s: genlab knows no such tracker (wandb, tensorboard); it is ignored.", name)
            except Exception as error:
                log.warning("%s is off for this run: it failed to start (%s). Training goes on; metrics.jsonl has "
                            "everything.", name, error)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.run.append_metrics({"step": step, **scalars})
        if step > self.logged_until:
            self._call("log", step, scalars)

    def log_image(self, step: int, key: str, path: Path) -> None:
        if self.enabled and step > self.logged_until:
            self._call("log_image", step, key, path)

    def finish(self, exit_code: int = 0) -> None:
        self._call("finish", exit_code)

    def _call(self, method: str, *args: Any) -> None:
        for name, tracker in list(self.trackers.items()):
            try:
                getattr(tracker, method)(*args)
            except Exception as error:
                log.warning("%s is off from now on: %s failed (%s). metrics.jsonl keeps everything.", name, method, error)
                del self.trackers[name]


def format_eta(seconds: float) -> str:
    """12:34 style time left (h:mm:ss), or "?" before the rate is known."""
    if not seconds == seconds or seconds < 0 or seconds == float("inf"):  # NaN, negative or unknown
        return "?"
    return str(datetime.timedelta(seconds=round(seconds)))


def progress_info(scalars: dict[str, float], declared_losses: tuple[str, ...] = ()) -> str:
    """The losses (`declared_losses`, the family's; see `families.logged.losses`) and images/s of a log
    step, as the progress line shows them."""
    shown = [f"{k}={scalars[k]:.4g}" for k in losses(declared_losses, scalars) if k in scalars]
    if "images_per_s" in scalars:
        shown.append(f"img/s={scalars['images_per_s']:.0f}")
    return "  ".join(shown)


class Progress:
    """Step, loss, images/s and time left: a rich bar on a terminal, plain log lines otherwise.

    Args:
        total: the last step; start: the step training starts from (a resume's checkpoint).
        mode: auto (rich when stderr is a terminal) | rich | plain.
        console: where the rich bar draws (tests record it); default stderr.
        losses: the family's declared losses, the scalars shown (see `progress_info`).
    """

    def __init__(self, total: int, start: int, mode: str = "auto", enabled: bool = True, console: Any = None,
                 losses: tuple[str, ...] = ()):
        self.total, self.enabled, self.losses = total, enabled, tuple(losses)
        use_rich = mode == "rich" or (mode == "auto" and sys.stderr.isatty())
        self.bar = None
        if enabled and use_rich:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(TextColumn("[bold]train step"), MofNCompleteColumn(), BarColumn(),
                                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                    TimeRemainingColumn(), transient=False, console=console)
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()
        self.t0, self.step0 = time.perf_counter(), start

    def update(self, step: int, scalars: dict[str, float] | None = None) -> None:
        """Advance to `step`; with `scalars` (at log steps) also show/print them."""
        if not self.enabled:
            return
        info = progress_info(scalars, self.losses) if scalars else ""
        if self.bar is not None:
            self.bar.update(self.task, completed=step, **({"info": info} if info else {}))
        elif scalars:
            # The rate of this process only: a resumed run's earlier steps took no time here.
            rate = (step - self.step0) / max(1e-9, time.perf_counter() - self.t0)
            eta = (self.total - step) / rate if rate > 0 else float("nan")
            log.info("step %d/%d  %s  eta %s", step, self.total, info, format_eta(eta))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
