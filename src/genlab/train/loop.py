"""The one training loop. It knows nothing about any family (see families/base.py).

Per optimizer step: for each phase the family names, accumulate `grad_accum`
micro-batches, clip, check for NaN/inf, step the phase's optimizer and LR schedule; then
update the EMA, and at their intervals log, draw fixed-noise samples and checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import json
import logging
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from diffusers.training_utils import EMAModel
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from genlab.data import build_dataset
from genlab.data.batches import BatchOrder, BatchStream, loader_options
from genlab.errors import ConfigError, GenlabError
from genlab.families.base import Family
from genlab.train import checkpoint as ckpt
from genlab.train import micro_batch
from genlab.train.best import BestTracker
from genlab.train.sampling import save_grid, swapped_in_ema, unwrapped_networks
from genlab.train.tracking import Progress, Tracker

log = logging.getLogger(__name__)
WEIGHT_DTYPES = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}


class NonFiniteError(GenlabError):
    """A NaN/inf loss or gradient; raised before the optimizer step so no weight is touched."""


class StopRequested(Exception):
    """A signal (SLURM's pre-emption warning, SIGTERM) asked the run to checkpoint and stop.

    `previous_handler` is whatever handled the signal before genlab (submitit's
    checkpoint-and-requeue under SLURM); it is called once the checkpoint is complete.
    """

    def __init__(self, signum: int, previous_handler: Any = None):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.previous_handler = signum, previous_handler

    def hand_over(self) -> None:
        """Let the previous handler act (submitit requeues the job and exits)."""
        if callable(self.previous_handler):
            self.previous_handler(self.signum, None)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _grad_norm(params: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Global L2 norm of the gradients, clipping them to `max_norm` when given."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if max_norm:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.nn.utils.get_total_norm(grads)


class LogWindow:
    """The logged scalars of the optimizer steps since the last log line.

    Values stay detached device tensors until `means`, so training never waits for the
    device between log steps.
    """

    def __init__(self):
        self.values: dict[str, list[torch.Tensor]] = {}
        self.divisors: dict[str, int] = {}
        self.steps = 0

    def add(self, key: str, value: torch.Tensor, divisor: int = 1) -> None:
        """One value of `key`; `divisor` = grad_accum for per-micro-batch values."""
        self.values.setdefault(key, []).append(value)
        self.divisors[key] = divisor

    def means(self, accelerator: Accelerator) -> dict[str, float]:
        """Per-step means over the window and over all processes (one reduce, one host sync)."""
        keys = sorted(self.values)
        if not keys:
            return {}
        totals = torch.stack([torch.stack(self.values[k]).float().sum().to(accelerator.device) / self.divisors[k]
                              for k in keys])
        # Every process reaches this line; the logged numbers are means over all of them.
        totals = accelerator.reduce(totals, "mean")
        return {k: v / self.steps for k, v in zip(keys, totals.tolist())}


class Trainer:
    """Builds everything a run needs from its config and runs the loop.

    Args:
        cfg: the resolved run config (train.yaml and its groups).
        run_dir: the run directory (created by Hydra, or an existing one to resume).
        resume: continue from the newest complete checkpoint in `run_dir`.
    """

    def __init__(self, cfg: DictConfig, run_dir: Path, resume: bool = False):
        self.cfg, self.t, self.run_dir = cfg, cfg.trainer, Path(run_dir)
        t = self.t
        # Several processes without a GPU (tests, CPU clusters): Accelerate only sets up gloo
        # when told cpu=True; otherwise each process would silently train alone.
        multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
        self.accelerator = Accelerator(mixed_precision=t.mixed_precision, cpu=multi_cpu)
        acc = self.accelerator
        set_seed(t.seed, device_specific=True)
        if t.tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

        dataset = build_dataset(cfg.data, "train")
        if hasattr(dataset, "to") and acc.device.type == "cuda" and cfg.data.get("on_device", True):
            dataset.to(acc.device)  # small in-memory data lives on the GPU: no host-to-device copies
        self.family: Family = instantiate(cfg.model, _convert_="all")
        if t.get("effective_batch_size"):
            self._choose_micro_batch(dataset, resume)  # sets t.batch_size and t.grad_accum
        self.family.to(acc.device, WEIGHT_DTYPES[t.mixed_precision])
        for name, network in self.family.networks().items():
            if t.channels_last:
                network.to(memory_format=torch.channels_last)
            network = acc.prepare(network)
            setattr(self.family, name, torch.compile(network) if t.compile else network)

        self.optimizers, self.lr_schedules = {}, {}
        for phase, optimizer in self._new_optimizers(self.family).items():
            self.optimizers[phase] = acc.prepare(optimizer)
            # Not prepared by Accelerate on purpose: it would step a prepared schedule once per
            # process; we step each schedule exactly once per optimizer step.
            self.lr_schedules[phase] = instantiate(self.cfg.lr_schedule)(self.optimizers[phase].optimizer)
        # Looked up once, not per step: the parameter lists never change during a run.
        self._params = {phase: [p for g in o.param_groups for p in g["params"]] for phase, o in self.optimizers.items()}

        self.ema = None
        if t.ema and self.family.ema_network:
            self._ema_params = list(self._unwrapped(self.family.ema_network).parameters())
            # foreach: a few batched updates instead of several small ones per tensor (same arithmetic).
            self.ema = EMAModel(self._ema_params, decay=t.ema, use_ema_warmup=t.ema_warmup, foreach=True)
            self.ema.to(acc.device)

        order = BatchOrder(len(dataset), t.batch_size, t.seed, acc.process_index, acc.num_processes)
        self.step, position, self.wandb_id, self.logged_until = 0, {}, None, 0
        self.best = BestTracker(t.best_metric, t.early_stop_patience)
        if resume:
            position = self._load_checkpoint()
        self.batches = BatchStream(dataset, order, **loader_options(cfg.data, acc.device), **position)
        self.tracker = Tracker(self.run_dir, cfg, self.wandb_id, enabled=acc.is_main_process,
                               logged_until=self.logged_until)
        self.stop_signal: int | None = None
        self.evaluator = None
        if t.eval_every and acc.is_main_process:
            from genlab.eval.evaluate import Evaluator

            self.evaluator = Evaluator(cfg, acc.device)

    def _unwrapped(self, name: str) -> torch.nn.Module:
        return self.accelerator.unwrap_model(getattr(self.family, name))

    def _new_optimizers(self, family: Family) -> dict[str, torch.optim.Optimizer]:
        """One optimizer per phase; each param group's lr is trainer.lr x its optional lr_scale."""
        make = instantiate(self.cfg.optimizer)
        return {phase: make([{k: v for k, v in g.items() if k != "lr_scale"} | {"lr": self.t.lr * g.get("lr_scale", 1.0)}
                             for g in groups])
                for phase, groups in family.param_groups().items()}

    def _choose_micro_batch(self, dataset: Any, resume: bool) -> None:
        """trainer.effective_batch_size: set batch_size (probed) and grad_accum so that
        batch_size x grad_accum x processes = effective_batch_size."""
        t, acc = self.t, self.accelerator
        sizes = micro_batch.candidates(t.effective_batch_size, acc.num_processes, t.get("max_micro_batch"),
                                       len(dataset))
        latest = ckpt.find_checkpoint(self.run_dir, "latest") if resume else None
        if latest is not None:  # the data position depends on the micro-batch: keep the checkpoint's
            size, how = ckpt.load_state(latest)["batch_size"], f"as in {latest.name}"
            if size not in sizes:
                raise ConfigError(f"trainer.effective_batch_size={t.effective_batch_size} is not a multiple of the "
                                  f"micro-batch {size} x {acc.num_processes} processes of {latest}; resume with a multiple")
        else:
            size, too_big = micro_batch.probe(self.family, self._new_optimizers, dataset, sizes, acc,
                                              WEIGHT_DTYPES[t.mixed_precision], t.channels_last)
            how = f"probed; out of memory at {', '.join(map(str, too_big))}" if too_big else "probed; the largest allowed"
        t.batch_size, t.grad_accum = size, t.effective_batch_size // (size * acc.num_processes)
        if acc.is_main_process:
            log.info("trainer.effective_batch_size=%d: micro-batch %d x grad_accum %d x %d process(es) (%s)",
                     t.effective_batch_size, size, t.grad_accum, acc.num_processes, how)
            saved = self.run_dir / ".hydra" / "config.yaml"  # what `genlab sample` and `genlab resume` read
            if saved.exists():
                run_cfg = OmegaConf.load(saved)
                run_cfg.trainer.batch_size, run_cfg.trainer.grad_accum = t.batch_size, t.grad_accum
                OmegaConf.save(run_cfg, saved)

    # ---- checkpoints -------------------------------------------------------------------
    def save_checkpoint(self, name: str | None = None) -> Path | None:
        """Save the full training state to checkpoints/step_N (or checkpoints/<name>)."""
        self.accelerator.wait_for_everyone()
        path = None
        if self.accelerator.is_main_process:
            training_state = {
                "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "lr_schedules": {k: s.state_dict() for k, s in self.lr_schedules.items()},
                "scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler else None,
                "rng": _rng_state(),
            }
            files = {"training_state.pt": training_state, "ema.pt": self.ema.state_dict() if self.ema else None}
            state = {"step": self.step, "data_position": self.batches.position, "wandb_id": self.tracker.run_id,
                     "batch_size": self.t.batch_size, "grad_accum": self.t.grad_accum,
                     "num_processes": self.accelerator.num_processes, "best": self.best.state_dict()}
            networks = {n: self._unwrapped(n) for n in self.family.networks()}
            path = ckpt.save_checkpoint(self.run_dir / "checkpoints", self.step, networks, files, state,
                                        self.t.keep_checkpoints, name=name)
            log.info("checkpoint %s", path)
        self.accelerator.wait_for_everyone()
        return path

    def _load_checkpoint(self) -> dict[str, int]:
        path = ckpt.find_checkpoint(self.run_dir, "latest")
        if path is None:
            log.warning("no complete checkpoint in %s: starting from step 0", self.run_dir)
            return {}
        if self.accelerator.is_main_process:  # a run killed between a save and its pruning
            ckpt.prune(path.parent, self.t.keep_checkpoints)
        training_state, state = ckpt.load_file_of(path, "training_state.pt"), ckpt.load_state(path)
        global_batch = self.t.batch_size * self.accelerator.num_processes
        if state["batch_size"] * state["num_processes"] != global_batch:
            raise GenlabError(
                f"{path} was written with batch_size {state['batch_size']} x {state['num_processes']} processes; "
                f"this run has {self.t.batch_size} x {self.accelerator.num_processes}. The data position would not "
                "match: resume with the same global micro-batch, or start a new run from this one's weights.")
        if state["grad_accum"] != self.t.grad_accum:
            log.warning("grad_accum changed from %d to %d: the LR schedule (counted in optimizer steps) is unchanged, "
                        "the effective batch is not.", state["grad_accum"], self.t.grad_accum)
        ckpt.load_networks(path, {n: self._unwrapped(n) for n in self.family.networks()})
        for k, o in self.optimizers.items():
            o.load_state_dict(training_state["optimizers"][k])
        for k, s in self.lr_schedules.items():
            s.load_state_dict(training_state["lr_schedules"][k])
        if self.accelerator.scaler and training_state["scaler"]:
            self.accelerator.scaler.load_state_dict(training_state["scaler"])
        if self.ema:
            self.ema.load_state_dict(ckpt.load_file_of(path, "ema.pt"))
            self.ema.to(self.accelerator.device)
        self._resume_rng = training_state["rng"]
        self.logged_until = truncate_metrics(self.run_dir / "metrics.jsonl", state["step"])
        self.step, self.wandb_id = state["step"], state["wandb_id"]
        if state.get("best"):
            self.best.load_state_dict(state["best"])
        log.info("resumed from %s at step %d", path, self.step)
        return state["data_position"]

    # ---- the loop ----------------------------------------------------------------------
    def _next_batch(self) -> dict:
        batch = next(self.batches)
        return {k: v.to(self.accelerator.device, non_blocking=True) if torch.is_tensor(v) else v
                for k, v in batch.items()}

    def _optimizer_step(self, phase: str, window: LogWindow) -> bool:
        """Accumulate, clip, check and step one phase. False if the step was skipped.

        The hot path: the non-finite check is its only host sync, and logged scalars stay
        tensors in `window` until a log step.
        """
        acc, accum, optimizer = self.accelerator, self.grad_accum, self.optimizers[phase]
        for each in self.optimizers.values():  # e.g. G's phase leaves gradients in D: start clean
            each.zero_grad(set_to_none=True)
        checked = []  # the losses and the gradient norm, tested for NaN/inf together
        for micro in range(accum):
            with contextlib.ExitStack() as stack:
                if micro < accum - 1:  # gradients are all-reduced only on the last micro-step
                    for network in self.family.networks().values():
                        stack.enter_context(acc.no_sync(network))
                with self._autocast():
                    loss, logs = self.family.loss(phase, self._next_batch(), self.step)
                acc.backward(loss / accum if accum > 1 else loss)
            checked.append(loss.detach().float())
            for k, v in logs.items():
                window.add(k, v.detach(), accum)
        if acc.scaler is not None:
            acc.scaler.unscale_(optimizer.optimizer)  # clip and check true gradients
        norm = _grad_norm(self._params[phase], self.grad_clip)
        window.add(f"grad_norm_{phase}", norm.detach())
        if acc.scaler is None:  # fp16's scaler finds inf gradients itself (it skips the step)
            checked.append(norm.detach().float())
        # The one host sync per phase, kept on purpose: a NaN/inf must stop the run (or skip the
        # step) before the optimizer touches any weight, and only the host can decide that.
        if not torch.isfinite(torch.stack(checked)).all():
            self._handle_nonfinite(phase, logs, loss)
            optimizer.zero_grad(set_to_none=True)
            return False
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not isinstance(self.lr_schedules[phase], torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.lr_schedules[phase].step()
        return True

    def _handle_nonfinite(self, phase: str, logs: dict[str, torch.Tensor], loss: torch.Tensor) -> None:
        bad = [k for k, v in logs.items() if not torch.isfinite(v).all()] or ["gradients"]
        what = f"non-finite {', '.join(bad)} in phase '{phase}' at step {self.step + 1} (loss={loss.item():.4g})"
        self.nonfinite_in_a_row += 1
        if self.t.on_nonfinite == "skip" and self.nonfinite_in_a_row <= self.t.max_nonfinite_skips:
            log.warning("%s: step skipped (%d in a row, giving up after %d)", what, self.nonfinite_in_a_row,
                        self.t.max_nonfinite_skips)
            return
        last = ckpt.find_checkpoint(self.run_dir, "latest")
        raise NonFiniteError(f"{what}; stopped before the optimizer step. Last good checkpoint: {last}. "
                             "Try a lower trainer.lr, trainer.grad_clip=1.0, or trainer.on_nonfinite=skip.")

    def sample_grid(self, name: str) -> Path | None:
        """Fixed-noise samples (EMA weights if any) to samples/<name>.png; main process only."""
        if not self.accelerator.is_main_process or not self.t.sample_n:
            return None
        path = self.run_dir / "samples" / f"{name}.png"
        # fork_rng: sampling must not move the training RNG, or resumed runs would diverge.
        with torch.random.fork_rng(devices=[]), unwrapped_networks(self.family, self.accelerator), \
                swapped_in_ema(self.family, self.ema):
            # Conditioned families can show their input beside the output (sketch | image).
            draw = getattr(self.family, "sample_pairs", self.family.sample)
            images = draw(self.t.sample_n, seed=self.t.seed)
        save_grid(images, path)
        self.tracker.log_image(self.step, "samples", path)
        return path

    def evaluate(self) -> bool:
        """A cheap evaluation (main process); keeps checkpoints/best. True when patience ran out."""
        acc, metrics = self.accelerator, None
        if acc.is_main_process:
            with torch.random.fork_rng(devices=[]), unwrapped_networks(self.family, acc), \
                    swapped_in_ema(self.family, self.ema):
                metrics = self.evaluator.evaluate(self.family, n_samples=self.t.eval_samples)
            self.tracker.log(self.step, metrics)
            improved = self.best.update(self.step, metrics)
            log.info("eval at step %d: %s (%s)", self.step, "  ".join(f"{k}={v:.4g}" for k, v in metrics.items()),
                     f"new best {self.best.metric}" if improved else f"best {self.best.metric}={self.best.best:.4g} "
                     f"at step {self.best.best_step}")
        decision = [self.best.state_dict()]
        broadcast_object_list(decision)  # every process takes the same decisions
        self.best.load_state_dict(decision[0])
        if self.best.best_step == self.step:
            self.save_checkpoint(name="best")
        return self.best.should_stop

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stop_signal = signum  # only a flag: the loop checkpoints at the next step boundary

    def fit(self) -> dict[str, Any]:
        """Train to `trainer.max_steps`; returns a summary (last logged scalars, paths)."""
        t, acc = self.t, self.accelerator
        self.previous_handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, getattr(signal, f"SIG{t.preempt_signal}")):
                self.previous_handlers[sig] = signal.signal(sig, self._on_signal)
        if getattr(self, "_resume_rng", None):
            _set_rng_state(self._resume_rng)
        progress = Progress(t.max_steps, self.step, t.progress, enabled=acc.is_main_process)
        window, logged = LogWindow(), {}
        images_per_step = t.batch_size * t.grad_accum * acc.num_processes
        # Plain values for the hot loop: reading an OmegaConf node costs ~10 us, a dozen times a step.
        max_steps, log_every, sample_every = t.max_steps, t.log_every, t.sample_every
        checkpoint_every, eval_every = t.checkpoint_every, t.eval_every
        self.grad_accum, self.grad_clip = t.grad_accum, t.grad_clip
        self._autocast = acc.autocast if acc.native_amp else contextlib.nullcontext
        self.nonfinite_in_a_row, window_start = 0, time.perf_counter()
        for network in self.family.networks().values():
            network.train()
        while self.step < max_steps:
            if self.stop_signal is not None:
                log.warning("%s received: checkpointing at step %d and stopping",
                            signal.Signals(self.stop_signal).name, self.step)
                self.save_checkpoint()
                raise StopRequested(self.stop_signal, self.previous_handlers.get(self.stop_signal))
            stepped = [self._optimizer_step(phase, window) for phase in self.family.phases(self.step)]
            if not all(stepped):
                continue  # a skipped non-finite step: same step number, next batches
            self.nonfinite_in_a_row = 0
            self.step += 1
            window.steps += 1
            if self.ema is not None:
                self.ema.step(self._ema_params)
            if self.step % log_every == 0 or self.step == max_steps:
                elapsed = time.perf_counter() - window_start
                logged = window.means(acc)
                for phase, opt in self.optimizers.items():
                    logged[f"lr_{phase}"] = opt.param_groups[0]["lr"]
                    if isinstance(self.lr_schedules[phase], torch.optim.lr_scheduler.ReduceLROnPlateau):
                        self.lr_schedules[phase].step(logged.get("loss", sum(v for k, v in logged.items() if "loss" in k)))
                logged["images_per_s"] = images_per_step * window.steps / elapsed
                self.tracker.log(self.step, logged)
                progress.update(self.step, logged)
                window, window_start = LogWindow(), time.perf_counter()
            else:
                progress.update(self.step)
            if sample_every and self.step % sample_every == 0:
                self.sample_grid(f"step_{self.step:06d}")
            if checkpoint_every and self.step % checkpoint_every == 0:
                self.save_checkpoint()
            if eval_every and self.step % eval_every == 0 and self.evaluate():
                log.info("early stop: no better %s in %d evaluations (best %.4g at step %d)", self.best.metric,
                         t.early_stop_patience, self.best.best, self.best.best_step)
                break
        progress.close()
        return self.finish(logged)

    def finish(self, logged: dict[str, float]) -> dict[str, Any]:
        """Final checkpoint, samples and export (EMA weights swapped in)."""
        if ckpt.find_checkpoint(self.run_dir, f"step_{self.step}") is None:
            self.save_checkpoint()
        self.sample_grid("final")
        if self.accelerator.is_main_process:
            with unwrapped_networks(self.family, self.accelerator), swapped_in_ema(self.family, self.ema):
                self.family.export(self.run_dir / "export")
        self.accelerator.wait_for_everyone()
        best = {f"best_{self.best.metric}": self.best.best} if self.best.best is not None else {}
        return {"step": self.step, **logged, **best}


def truncate_metrics(path: Path, step: int) -> int:
    """Drop lines logged after the checkpoint we resume from: steps never go backwards.

    Returns the last step the interrupted attempt had logged (W&B already holds it).
    """
    if not path.exists():
        return step
    lines = path.read_text().splitlines(keepends=True)
    steps = [json.loads(line)["step"] for line in lines if line.strip()]
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        log.info("metrics.jsonl: dropped %d lines logged after step %d (they will be logged again)",
                 len(lines) - len(kept), step)
        path.write_text("".join(kept))
    return max([step, *steps])


def write_status(run_dir: Path, status: str, **extra: Any) -> None:
    """RUN_DIR/status.json: running / finished / failed / interrupted (read by `genlab runs`)."""
    (run_dir / "status.json").write_text(json.dumps({"status": status, "time": time.time(), **extra}))


def check_writable(run_dir: Path) -> None:
    """Fail at start-up, not at the first checkpoint, when the run directory cannot be written."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise GenlabError(f"cannot write to the run directory {run_dir} ({error.strerror}); "
                          "choose another with hydra.run.dir=... or GENLAB_RUNS=...") from None


def run_training(cfg: DictConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Train `cfg` into `run_dir` and keep status.json truthful whatever happens."""
    check_writable(run_dir)
    trainer = None
    try:
        trainer = Trainer(cfg, run_dir, resume=resume)
        if trainer.accelerator.is_main_process:
            write_status(run_dir, "running", max_steps=cfg.trainer.max_steps, pid=os.getpid())
        summary = trainer.fit()
    except StopRequested as stop:
        write_status(run_dir, "interrupted", signal=str(stop))
        if trainer:
            trainer.tracker.finish(exit_code=1)
            trainer.accelerator.end_training()
        raise
    except BaseException as error:
        write_status(run_dir, "failed", error=str(error)[:500])
        if trainer:
            trainer.tracker.finish(exit_code=1)
            trainer.accelerator.end_training()
        if isinstance(error.__cause__, GenlabError):  # Hydra's instantiate wraps the family's own errors
            raise error.__cause__ from None
        raise
    if trainer.accelerator.is_main_process:
        write_status(run_dir, "finished", max_steps=cfg.trainer.max_steps, step=summary["step"])
    trainer.tracker.finish()
    trainer.accelerator.end_training()
    return summary


def load_run_config(run_dir: Path) -> DictConfig:
    """The resolved config a run was trained with (RUN_DIR/.hydra/config.yaml)."""
    path = Path(run_dir) / ".hydra" / "config.yaml"
    if not path.exists():
        raise GenlabError(f"{run_dir} is not a genlab run directory (no .hydra/config.yaml); "
                          "pass a directory printed by `genlab train` (see `genlab runs`).")
    return OmegaConf.load(path)
