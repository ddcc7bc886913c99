"""`RunDir`: one run directory's layout and every read and write of it (see the package docstring)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterator

import yaml
from omegaconf import DictConfig, OmegaConf

from genlab.errors import GenlabError
from genlab.run_dir.lock import RunLock, held_by_a_live_process
from genlab.run_dir.trust import check_targets

log = logging.getLogger(__name__)
_held: dict[str, RunLock] = {}  # run directories whose lock this process holds
#: Folders whose links belong to another program: W&B links its `latest-run` and `debug*.log` by
#: absolute path (so a copied run's links point at the original) and replaces them itself.
#: genlab never reads or writes through them; the folder itself must still stay inside the run.
FOREIGN_LINKS = ("wandb",)


def atomic_write(path: Path, text: str) -> None:
    """Replace `path` with `text` so that a reader (or a kill) sees the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _shell_quote(word: str) -> str:
    """A word as a shell needs it; plain `key=value` overrides stay unquoted, as people type them."""
    import shlex

    return word if all(c.isalnum() or c in "_-+=.,/:@" for c in word) else shlex.quote(word)


class RunDir:
    """One run directory (see the module docstring).

    Args:
        path: the directory (it need not exist yet).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ---- layout ------------------------------------------------------------------------
    config_file = property(lambda self: self.path / ".hydra" / "config.yaml")
    overrides_file = property(lambda self: self.path / ".hydra" / "overrides.yaml")
    hydra_file = property(lambda self: self.path / ".hydra" / "hydra.yaml")
    status_file = property(lambda self: self.path / "status.json")
    metrics_file = property(lambda self: self.path / "metrics.jsonl")
    log_file = property(lambda self: self.path / "train.log")
    lock_file = property(lambda self: self.path / ".lock")
    checkpoints = property(lambda self: self.path / "checkpoints")
    samples = property(lambda self: self.path / "samples")
    export = property(lambda self: self.path / "export")
    posthoc_ema = property(lambda self: self.path / "posthoc_ema")  # snapshots of trainer.posthoc_ema's profiles
    eval_dir = property(lambda self: self.path / "eval")
    eval_file = property(lambda self: self.path / "eval" / "metrics.json")
    report_file = property(lambda self: self.path / "report.html")

    def is_run(self) -> bool:
        """A genlab run directory: it has a saved config."""
        return self.config_file.is_file()

    def holds_run(self) -> bool:
        """Training has written here (status, metrics or checkpoints), so training again would overwrite it."""
        return self.status_file.exists() or self.metrics_file.exists() or self.checkpoints.is_dir()

    def require(self) -> "RunDir":
        """This run directory, or a GenlabError saying what the path is instead (see `refuse_links_out`)."""
        if not self.path.exists():
            raise GenlabError(f"{self.path} does not exist; pass a run directory (see `genlab runs`).")
        if not self.path.is_dir():
            raise GenlabError(f"{self.path} is a file, not a run directory; pass a directory printed by "
                              "`genlab train` (see `genlab runs`).")
        if not self.is_run():
            raise GenlabError(f"{self.path} is not a genlab run directory (no .hydra/config.yaml); "
                              "pass a directory printed by `genlab train` (see `genlab runs`).")
        self.refuse_links_out()
        return self

    def inside(self, path: str | Path) -> bool:
        """Does `path` (absolute, or relative to the run) lead into this run once every link is followed?"""
        return Path(os.path.realpath(self.path / path)).is_relative_to(os.path.realpath(self.path))

    def links_out(self) -> list[tuple[Path, str]]:
        """Every symbolic link in the run that leads outside it, as (link, where it points).

        A copied run is someone else's data: `checkpoints` linked to another run's folder would
        make retention delete there, `.lock` or `train.log` linked to a file would write into it,
        a linked sample grid would be copied into export/ and embedded in a report. A link
        within the run is harmless. W&B's own links are left to W&B (FOREIGN_LINKS).
        """
        found = []
        for top, dirs, files in os.walk(self.path):
            here = Path(top)
            if here == self.path:
                dirs[:] = [d for d in dirs if d not in FOREIGN_LINKS or (here / d).is_symlink()]
            for name in dirs + files:
                entry = here / name
                if entry.is_symlink() and not self.inside(entry.relative_to(self.path)):
                    found.append((entry, os.readlink(entry)))
        return found

    def refuse_links_out(self) -> None:
        """One sentence when a link in the run leads outside it: nothing is read, written or deleted through it."""
        found = self.links_out()
        if found:
            entry, target = found[0]
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            raise GenlabError(f"a link leads out of the run ({entry} -> {target}{more}), so nothing was read or "
                              "changed; replace the link with a copy of what it points to.")

    def check_writable(self) -> None:
        """Fail at start-up, not at the first checkpoint, when the directory cannot be written."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write_test.{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as error:
            raise GenlabError(f"cannot write to the run directory {self.path} ({error.strerror}); "
                              "choose another with hydra.run.dir=... or GENLAB_RUNS=...") from None

    # ---- config ------------------------------------------------------------------------
    def read_config(self, allow: tuple[str, ...] = ()) -> DictConfig:
        """The resolved config the run was trained with, its `_target_`s checked (see `check_targets`).

        Args:
            allow: extra trusted `_target_` prefixes (the user's `--allow-target`).
        """
        self.require()
        try:
            cfg = OmegaConf.load(self.config_file)
        except (OSError, ValueError, yaml.YAMLError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise GenlabError(f"{self.config_file} cannot be read ({first}); restore it from a copy of the run.") from None
        if not isinstance(cfg, DictConfig) or "model" not in cfg or "trainer" not in cfg:
            raise GenlabError(f"{self.config_file} is not a genlab run config (no model/trainer sections); "
                              "restore it from a copy of the run.")
        check_targets(cfg, str(self.config_file), allow)
        return cfg

    def write_config(self, cfg: DictConfig) -> None:
        atomic_write(self.config_file, OmegaConf.to_yaml(cfg))

    def write_overrides(self, overrides: list[str]) -> None:
        """Record the overrides a run starts with (Hydra writes this file for `genlab train`)."""
        atomic_write(self.overrides_file, yaml.safe_dump(list(overrides)))

    def read_overrides(self) -> list[str]:
        """The overrides the run was started with (Hydra's overrides.yaml); [] when absent or unreadable."""
        try:
            overrides = yaml.safe_load(self.overrides_file.read_text()) or []
        except (OSError, yaml.YAMLError):
            return []
        return [str(o) for o in overrides] if isinstance(overrides, list) else []

    def add_resume_overrides(self, overrides: list[str]) -> None:
        """Record a resume's overrides after the original ones, marked `(resume)`."""
        self.write_overrides(self.read_overrides() + [f"(resume) {o}" for o in overrides])

    def read_config_data(self) -> dict[str, Any]:
        """The saved config as plain data, for display only (reports, model cards): nothing is instantiated.

        Raises:
            GenlabError: the file is missing or is not a YAML mapping.
        """
        try:
            data = yaml.safe_load(self.config_file.read_text())
        except (OSError, yaml.YAMLError) as error:
            raise GenlabError(f"{self.config_file} cannot be read ({type(error).__name__}); "
                              "restore it from a copy of the run.") from None
        if not isinstance(data, dict):
            raise GenlabError(f"{self.config_file} is not a genlab run config; restore it from a copy of the run.")
        return data

    def command(self) -> list[str]:
        """The command lines that made the run: `genlab <job> <overrides>`, then one `genlab resume` per resume.

        From .hydra/overrides.yaml (its `(resume) key=value` lines) and hydra.yaml's job name.
        """
        try:
            job = yaml.safe_load(self.hydra_file.read_text())["hydra"]["job"]["name"] or "train"
        except (OSError, yaml.YAMLError, KeyError, TypeError):
            job = "train"
        first, resumes = [], []
        for line in self.read_overrides():
            if line.startswith("(resume) "):
                resumes.append(line.removeprefix("(resume) "))
            else:
                first.append(line)
        lines = [" ".join(["genlab", str(job), *map(_shell_quote, first)])]
        if resumes:
            lines.append(" ".join(["genlab", "resume", _shell_quote(str(self.path)), *map(_shell_quote, resumes)]))
        return lines

    def sample_grids(self) -> list[tuple[int | None, Path]]:
        """The training's sample grids, [(step, path)] by step: samples/step_N.png, then final.png (step None)."""
        grids = []
        for path in self.samples.glob("step_*.png"):
            if not self.inside(path.relative_to(self.path)) or not path.is_file():
                continue  # a link out of the run is never copied or embedded; a FIFO is never opened
            try:
                grids.append((int(path.stem.removeprefix("step_")), path))
            except ValueError:
                continue
        grids.sort()
        final = self.samples / "final.png"
        return grids + ([(None, final)] if final.is_file() and self.inside("samples/final.png") else [])

    def choices(self) -> dict[str, str]:
        """Hydra's config group choices (model, data, ...) from hydra.yaml; {} when absent."""
        try:
            return dict(yaml.safe_load(self.hydra_file.read_text())["hydra"]["runtime"]["choices"])
        except (OSError, yaml.YAMLError, KeyError, TypeError):
            return {}

    # ---- status ------------------------------------------------------------------------
    def read_status(self) -> dict[str, Any]:
        """status.json, with "running" turned into "interrupted" when its process is gone.

        Missing: {"status": "unknown"}; unreadable: {"status": "unreadable"}.
        """
        try:
            status = json.loads(self.status_file.read_text())
            status["status"]  # noqa: B018  (a status without one is unreadable)
        except FileNotFoundError:
            return {"status": "unknown"}
        except (OSError, ValueError, KeyError, TypeError):
            return {"status": "unreadable"}
        if status["status"] == "running" and not self._alive(status):
            status["status"] = "interrupted"  # killed without a chance to say so (kill -9, node lost)
        return status

    def _alive(self, status: dict[str, Any]) -> bool:
        """Is the run that wrote `status` still going? The lock says so across hosts; the pid on this one."""
        if str(self.path.resolve()) in _held:
            # This process holds the lock, so the lock says nothing about the process that wrote
            # `status`: a job rerun after a kill -9 takes the lock over, then asks about the old run.
            return status.get("pid") == os.getpid() and status.get("host") == socket.gethostname()
        if self.lock_file.exists():
            return held_by_a_live_process(self.lock_file)
        pid = status.get("pid")
        if not pid or status.get("host", socket.gethostname()) != socket.gethostname():
            return False
        try:
            os.kill(int(pid), 0)
            return True
        except (OSError, ValueError):
            return False

    def write_status(self, status: str, **extra: Any) -> None:
        """running / finished / failed / interrupted, with the time, pid and host."""
        atomic_write(self.status_file, json.dumps({"status": status, "time": time.time(), "pid": os.getpid(),
                                                   "host": socket.gethostname(), **extra}))

    # ---- metrics -----------------------------------------------------------------------
    def append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(row) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every logged row; a line torn by a kill in mid-write (or otherwise unreadable) is skipped."""
        rows = []
        try:
            text = self.metrics_file.read_text(errors="replace")
        except OSError:
            return []
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
        return rows

    def truncate_metrics(self, step: int) -> int:
        """Keep the rows up to `step` (the checkpoint being resumed): steps never go backwards.

        Returns the last step the interrupted attempt had logged (W&B already holds those).
        """
        if not self.metrics_file.exists():
            return step
        rows = self.read_metrics()
        kept = [row for row in rows if row["step"] <= step]
        original = self.metrics_file.read_text(errors="replace")
        text = "".join(json.dumps(row) + "\n" for row in kept)
        if text != original:
            dropped = len(original.splitlines()) - len(kept)
            log.info("metrics.jsonl: dropped %d line(s) after step %d (they will be logged again)", dropped, step)
            atomic_write(self.metrics_file, text)
        return max([step, *(row["step"] for row in rows)])

    def write_eval(self, report: dict[str, Any]) -> None:
        """eval/metrics.json: `genlab eval`'s report (checkpoint, EMA, seconds and every metric)."""
        atomic_write(self.eval_file, json.dumps(report, indent=2))

    def read_eval(self) -> dict[str, Any]:
        """eval/metrics.json of `genlab eval`; {} when absent or unreadable."""
        try:
            metrics = json.loads(self.eval_file.read_text())
        except (OSError, ValueError):
            return {}
        return metrics if isinstance(metrics, dict) else {}

    # ---- lock --------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the run's lock for the block; another process gets `RunLocked`.

        Re-entrant within a process (`genlab resume` saves its overrides and trains under one lock).
        """
        key = str(self.path.resolve())
        if key in _held:
            yield
            return
        self.refuse_links_out()  # every writer of a run takes the lock first: nothing leaves the run
        lock = RunLock(self.lock_file)
        lock.acquire()
        _held[key] = lock
        try:
            yield
        finally:
            del _held[key]
            lock.release()

    # ---- checkpoints -------------------------------------------------------------------
    def checkpoint(self, which: str = "latest") -> Path | None:
        """The complete checkpoint `which` (latest | best | step_N), or None."""
        from genlab.train.checkpoint import find_checkpoint

        return find_checkpoint(self.checkpoints, which)
