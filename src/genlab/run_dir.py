"""The run directory: its layout and every read and write of it.

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
leaves half a config or half a status. Nothing here imports torch at module level: `genlab
runs` and argument errors stay fast.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterator

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from genlab.errors import ConfigError, GenlabError

log = logging.getLogger(__name__)

#: `_target_` prefixes a saved config may name: genlab's own classes and the library
#: classes genlab's configs use. Anything else needs the user's explicit `--allow-target`.
ALLOWED_TARGETS = ("genlab.", "torch.optim.", "bitsandbytes.optim.")
#: Extra trusted prefixes, comma-separated (e.g. a user's own family package).
ALLOWED_TARGETS_ENV = "GENLAB_ALLOW_TARGETS"


_held: dict[str, "RunLock"] = {}  # run directories whose lock this process holds


class RunLocked(GenlabError):
    """Another live process holds the run directory."""


class UntrustedConfig(GenlabError):
    """A saved config names a `_target_` outside the allowlist."""


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


def allowed_targets(extra: tuple[str, ...] | list[str] = ()) -> tuple[str, ...]:
    """The allowlist: genlab's, then $GENLAB_ALLOW_TARGETS, then `extra` (--allow-target)."""
    from_env = [p.strip() for p in os.environ.get(ALLOWED_TARGETS_ENV, "").split(",") if p.strip()]
    return (*ALLOWED_TARGETS, *from_env, *extra)


def check_targets(cfg: DictConfig | ListConfig | dict | list, source: str, allow: tuple[str, ...] = ()) -> None:
    """Refuse a config naming any `_target_` outside the allowlist, before anything is instantiated.

    Hydra's instantiate imports and calls whatever `_target_` names; its own blocklist stops
    `os.system` but not, e.g., a pickle loader. A config read from a run directory may have
    been written by anyone, so only known prefixes pass.

    Raises:
        UntrustedConfig: naming the key, the target and how to trust a prefix on purpose.
    """
    prefixes = allowed_targets(allow)

    def visit(node: Any, path: str) -> None:
        if isinstance(node, (dict, DictConfig)):
            items = node.items_ex(resolve=False) if isinstance(node, DictConfig) else node.items()
            for key, value in items:
                where = f"{path}.{key}" if path else str(key)
                if key == "_target_":
                    target = str(value)
                    if not any(target == p or target.startswith(p if p.endswith(".") else p + ".") for p in prefixes):
                        raise UntrustedConfig(
                            f"{source}: {where}={target!r} is not a class genlab trusts, so nothing was loaded. "
                            f"If you trust this run, allow that prefix on purpose: --allow-target {target.rsplit('.', 1)[0]} "
                            f"(or {ALLOWED_TARGETS_ENV}={target.rsplit('.', 1)[0]}).")
                else:
                    visit(value, where)
        elif isinstance(node, (list, ListConfig)):
            for i, value in enumerate(node):
                visit(value, f"{path}[{i}]")

    visit(cfg, "")


class RunLock:
    """An exclusive lock on a run directory, held by the live run (`flock` on RUN_DIR/.lock).

    The kernel drops an flock when its process dies (kill -9, node lost), so a lock left
    behind is simply taken over; the pid and host written into the file only serve the
    message of a refused second process.
    """

    def __init__(self, path: Path):
        self.path, self.fd = path, None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip()
            os.close(fd)
            try:
                info = json.loads(holder)
                holder = f"pid {info['pid']} on {info['host']} since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info['since']))}"
            except (ValueError, KeyError, TypeError):
                holder = "another process"
            raise RunLocked(f"{self.path.parent} is in use by {holder}; wait for it to end (or stop it), "
                            "or train into another directory.") from None
        previous = os.read(fd, 4096).decode(errors="replace").strip()
        if previous:
            log.info("took over the lock of %s (that process is gone)", self.path.parent)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


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
    eval_dir = property(lambda self: self.path / "eval")
    report_file = property(lambda self: self.path / "report.html")

    def is_run(self) -> bool:
        """A genlab run directory: it has a saved config."""
        return self.config_file.is_file()

    def holds_run(self) -> bool:
        """Training has written here (status, metrics or checkpoints), so training again would overwrite it."""
        return self.status_file.exists() or self.metrics_file.exists() or self.checkpoints.is_dir()

    def require(self) -> "RunDir":
        """This run directory, or a GenlabError saying what the path is instead."""
        if not self.path.exists():
            raise GenlabError(f"{self.path} does not exist; pass a run directory (see `genlab runs`).")
        if not self.is_run():
            raise GenlabError(f"{self.path} is not a genlab run directory (no .hydra/config.yaml); "
                              "pass a directory printed by `genlab train` (see `genlab runs`).")
        return self

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
            try:
                grids.append((int(path.stem.removeprefix("step_")), path))
            except ValueError:
                continue
        grids.sort()
        final = self.samples / "final.png"
        return grids + ([(None, final)] if final.is_file() else [])

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
        if self.lock_file.exists():
            try:
                fd = os.open(self.lock_file, os.O_RDONLY)
            except OSError:
                return False
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
                return False
            except BlockingIOError:
                return True
            finally:
                os.close(fd)
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

    def read_eval(self) -> dict[str, Any]:
        """eval/metrics.json of `genlab eval`; {} when absent or unreadable."""
        try:
            metrics = json.loads((self.eval_dir / "metrics.json").read_text())
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

        return find_checkpoint(self.path, which)


# ---- claiming a new run directory --------------------------------------------------------
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
        candidate.mkdir(parents=True, exist_ok=True)
        claim, mine = candidate / ".claim", candidate / f".claim.{os.getpid()}"
        mine.write_text(group)
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


# ---- finding runs and loading one ---------------------------------------------------------
def find_runs(root: str | Path) -> list[RunDir]:
    """Every run directory under `root` that training has written to, sorted by path."""
    found = (RunDir(p.parent.parent) for p in Path(root).rglob(".hydra/config.yaml"))
    return sorted((r for r in found if r.holds_run()), key=lambda r: str(r.path))


def newest_finished_run(root: str | Path) -> RunDir:
    """The most recently finished run under `root` (by the time in its status.json)."""
    finished = [(status.get("time", 0), str(r.path)) for r in find_runs(root)
                if (status := r.read_status())["status"] == "finished"]
    if not finished:
        raise GenlabError(f"no finished run under {root}/; pass a run directory (see `genlab runs`).")
    return RunDir(max(finished)[1])


def load_family(run: RunDir | str | Path, checkpoint: str = "latest", use_ema: bool = True, device: str | None = None,
                allow: tuple[str, ...] = (), trust_run: bool = False) -> tuple[Any, DictConfig]:
    """(family, cfg) rebuilt from a run's saved config, with the weights of `checkpoint`.

    Nothing in the run runs code: the config's `_target_`s pass the allowlist first, weights
    are safetensors and the EMA state loads with weights_only=True. A damaged newest
    checkpoint falls back to the previous complete one, with a warning.

    Args:
        checkpoint: latest | best | step_N.
        use_ema: the EMA weights, when the run has them.
        allow: extra trusted `_target_` prefixes; trust_run: see checkpoint.load_file_of.

    Raises:
        GenlabError: saying what is wrong with the run or the request.
    """
    import torch
    from diffusers.training_utils import EMAModel

    from genlab.config import build
    from genlab.train import checkpoint as ckpt

    run = run if isinstance(run, RunDir) else RunDir(run)
    cfg = run.require().read_config(allow)
    if checkpoint == "latest":
        candidates = ckpt.complete_checkpoints(run.checkpoints, warn=True)
    else:
        try:
            found = run.checkpoint(checkpoint)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        candidates = [found] if found else []
    if not candidates:
        raise GenlabError(f"{run.path} has no complete checkpoint '{checkpoint}' (it may still be starting, or "
                          "have failed before the first save); see `genlab runs`.")
    family = build("model", cfg.model)
    networks = family.networks()

    def load(path: Path) -> Path:
        ckpt.load_networks(path, networks)
        if use_ema and family.ema_network:
            ema_state = ckpt.load_file_of(path, "ema.pt", trust_run)
            if ema_state is not None:
                target = networks[family.ema_network]
                ema = EMAModel(target.parameters())
                ema.load_state_dict(ema_state)
                ema.copy_to(target.parameters())
                log.info("loaded %s (EMA weights)", path)
                return path
        log.info("loaded %s", path)
        return path

    ckpt.newest_loadable(candidates, load)
    family.to(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    for network in networks.values():
        network.eval()
    return family, cfg
