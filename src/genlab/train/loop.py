"""The one training loop. It knows nothing about any family (see families/contract.py).

Per optimizer step: for each phase the family names, accumulate `grad_accum`
micro-batches, clip, check for NaN/inf, step the phase's optimizer and LR schedule; then
update the EMA, and at their intervals log, draw fixed-noise samples and checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list, set_seed
from hydra.utils import instantiate
from omegaconf import DictConfig

from genlab.config import build
from genlab.data import InMemory, build_dataset
from genlab.data.batches import BatchStream, loader_options, make_order
from genlab.errors import ConfigError, GenlabError
from genlab.families.contract import Diagnosed, Family, PairedSamples
from genlab.families.logged import losses
from genlab.model_card import refresh_model_card
from genlab.posthoc_ema import PostHocEMA
from genlab.run_dir import RunDir
from genlab.step_random import StepRandom
from genlab.train import checkpoint as ckpt
from genlab.train import micro_batch, optimizers
from genlab.train.best import BestTracker
from genlab.train.resume_policy import resume_decision
from genlab.train.sampling import save_grid, swapped_in_ema, unwrapped_networks
from genlab.train.strategy import build_strategy, process_group_kwargs, shard_units
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
    """Every RNG's state as tensors and plain values, so the checkpoint loads with weights_only=True."""
    name, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {"python": random.getstate(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    keys = keys.numpy() if torch.is_tensor(keys) else np.asarray(keys)  # runs before 0.2 saved an ndarray
    np.random.set_state((name, keys.astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _grad_norm(params: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Global L2 norm of the gradients, clipping them to `max_norm` when given."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if max_norm else torch.nn.utils.get_total_norm(grads)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # strategy=fsdp: a sum over the shards


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
        totals = torch.stack([torch.stack([v.float() for v in self.values[k]]).sum().to(accelerator.device) / self.divisors[k]
                              for k in keys])
        # Every process reaches this line; the logged numbers are means over all of them.
        totals = accelerator.reduce(totals, "mean")
        return {k: v / self.steps for k, v in zip(keys, totals.tolist())}

    def state_dict(self, accelerator: Accelerator) -> dict[str, Any]:
        """The window so far, for a checkpoint: a run resumed mid-window logs what the straight run logs.

        Every process calls this (one reduce). The values are kept one per step, not summed, so that
        the resumed window sums them in the same order: bitwise the straight run's means on one
        process; on N processes the per-step means over processes are stored (equal to rounding).
        """
        values = {k: accelerator.reduce(torch.stack(v).float(), "mean").cpu() for k, v in sorted(self.values.items())}
        return {"values": values, "divisors": dict(self.divisors), "steps": self.steps}

    @classmethod
    def from_state(cls, state: dict[str, Any] | None, device: torch.device) -> LogWindow:
        window = cls()
        if state:  # checkpoints written before the window was saved have none: a window starts afresh
            window.values = {k: list(v.to(device).unbind()) for k, v in state["values"].items()}
            window.divisors, window.steps = dict(state["divisors"]), int(state["steps"])
        return window


class Trainer:
    """Builds everything a run needs from its config and runs the loop.

    Args:
        cfg: the resolved run config (train.yaml and its groups).
        run: the run directory (created by Hydra, or an existing one to resume).
        resume: continue from the newest complete checkpoint; None decides from the directory
            (a requeued job that was interrupted resumes; see resume_policy.resume_decision).
        trust_run: load the training state of runs older than genlab 0.2.
    """

    def __init__(self, cfg: DictConfig, run: RunDir, resume: bool | None = False, trust_run: bool = False):
        self.cfg, self.t, self.run, self.run_dir = cfg, cfg.trainer, run, run.path
        t = self.t
        self.strategy = build_strategy(cfg)  # ddp or fsdp: how the networks are spread over the processes
        self.accelerator = acc = self._new_accelerator()
        if resume is None:
            resume = self._decide_resume()
        self.trust_run = trust_run
        set_seed(t.seed, device_specific=True)
        if t.tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

        dataset = build_dataset(cfg.data, "train")
        if isinstance(dataset, InMemory) and acc.device.type == "cuda" and cfg.data.get("on_device", True):
            dataset.to(acc.device)  # small in-memory data lives on the GPU: no host-to-device copies
        self.family: Family = build("model", cfg.model)
        # Declared on the class (families.contract); a family from before the declaration has none.
        self.family_losses: tuple[str, ...] = tuple(getattr(self.family, "losses", ()))
        if t.get("effective_batch_size"):
            self._choose_micro_batch(dataset, resume)  # sets t.batch_size and t.grad_accum
        self._place_networks()
        self.optimizers, self.lr_schedules = self._prepared_optimizers()
        # Looked up once, not per step: the parameter lists never change during a run.
        self._params = {phase: [p for g in o.param_groups for p in g["params"]] for phase, o in self.optimizers.items()}
        self.ema, self._ema_params = self._new_ema()
        self.posthoc_ema, self._posthoc_params = self._new_posthoc_ema()

        try:
            order = make_order(dataset, t.batch_size, t.seed, acc.process_index, acc.num_processes,
                               cfg.data.get("num_workers", 0))
        except ValueError as error:
            raise ConfigError(f"{error} (trainer.batch_size={t.batch_size})") from None
        # The loop's settings, read once: an OmegaConf read costs ~10 us, a dozen times a step.
        self.grad_accum, self.grad_clip = t.grad_accum, t.grad_clip
        self._autocast = acc.autocast if acc.native_amp else contextlib.nullcontext
        self.nonfinite_in_a_row, self._resume_rng, self.last_batch = 0, None, None
        self.window = LogWindow()  # the steps since the last log line (restored by a resume)
        self.step, position, self.wandb_id, self.logged_until = 0, {}, None, 0
        self.best = BestTracker(t.best_metric, t.early_stop_patience, getattr(self.family, "metrics", {}),
                                self.family_losses)
        if resume:
            position = self._load_checkpoint()
        self.batches = BatchStream(dataset, order, **loader_options(cfg.data, acc.device), **position)
        self.tracker = Tracker(run, cfg, self.wandb_id, enabled=acc.is_main_process, logged_until=self.logged_until)
        self.stop_signal: int | None = None
        self.evaluator = self._new_evaluator()

    def _new_accelerator(self) -> Accelerator:
        """Accelerate for this job, set up for the strategy (ddp or fsdp) and trainer.mixed_precision."""
        # Several processes without a GPU (tests, CPU clusters): Accelerate only sets up gloo
        # when told cpu=True; otherwise each process would silently train alone.
        multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
        # Accelerate keeps its state per process; a second job in this process (a multirun on the basic
        # launcher, tests) may want another precision. The process group (PartialState) stays.
        AcceleratorState._reset_state()
        acc = Accelerator(mixed_precision=self.t.mixed_precision, cpu=multi_cpu,
                          kwargs_handlers=process_group_kwargs(self.strategy.timeout_s))
        self.strategy.setup(acc, self.t.mixed_precision)
        return acc

    def _place_networks(self) -> None:
        """The family's networks on the device, in the weight dtype, each wrapped by the strategy (and compiled)."""
        t = self.t
        self.family.to(self.accelerator.device, WEIGHT_DTYPES[t.mixed_precision])
        self.strategy.wrap_frozen(self.family)
        units = shard_units(self.family)
        for name, network in self.family.networks().items():
            if t.channels_last:
                network.to(memory_format=torch.channels_last)
            network = self._sync_batch_norm(name, network)
            network = self.strategy.wrap(network, units.get(name, []))
            setattr(self.family, name, torch.compile(network) if t.compile else network)

    def _prepared_optimizers(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(optimizers, lr schedules) by phase: each optimizer prepared by Accelerate, its schedule not."""
        optimizers, schedules = {}, {}
        for phase, optimizer in self._new_optimizers(self.family).items():
            optimizers[phase] = self.accelerator.prepare(optimizer)
            # Not prepared by Accelerate on purpose: it would step a prepared schedule once per
            # process; we step each schedule exactly once per optimizer step.
            schedules[phase] = instantiate(self.cfg.lr_schedule)(optimizers[phase].optimizer)
        return optimizers, schedules

    def _new_ema(self) -> tuple[Any, list[torch.nn.Parameter]]:
        """(EMA, the parameters it follows) of the family's `ema_network`; (None, []) without trainer.ema."""
        t = self.t
        if not (t.ema and self.family.ema_network):
            return None, []
        from diffusers.training_utils import EMAModel  # here: diffusers' import costs seconds of start-up (GAN: no other use)

        params = list(self._unwrapped(self.family.ema_network).parameters())
        # foreach: a few batched updates instead of several small ones per tensor (same arithmetic).
        # Not on fsdp's sharded parameters: DTensor has no _foreach_copy_ (torch 2.14), which copy_to needs.
        ema = EMAModel(params, decay=t.ema, use_ema_warmup=t.ema_warmup, foreach=not self.strategy.sharded)
        ema.to(self.accelerator.device)
        return ema, params

    def _new_posthoc_ema(self) -> tuple[PostHocEMA | None, list[torch.nn.Parameter]]:
        """(post-hoc EMA profiles, the parameters they follow) of `ema_network`; (None, []) unless trainer.posthoc_ema is on."""
        options = self.t.get("posthoc_ema") or {}
        if not options.get("sigma_rels"):
            return None, []
        if not self.family.ema_network:
            raise ConfigError(f"trainer.posthoc_ema: model={self.family.name} has no network that takes an EMA; "
                              "set trainer.posthoc_ema.sigma_rels=[].")
        if self.strategy.sharded:
            raise ConfigError("trainer.posthoc_ema keeps whole copies of the network on each process, which "
                              "strategy=fsdp does not: use strategy=ddp, or trainer.ema for a fixed EMA length.")
        # The trainable parameters only: a frozen base's EMA is the base itself, rebuilt from config.
        named = [(n, p) for n, p in self._unwrapped(self.family.ema_network).named_parameters() if p.requires_grad]
        every = options.get("snapshot_every") or self.t.checkpoint_every or self.t.max_steps
        posthoc = PostHocEMA(named, list(options["sigma_rels"]), every)
        return posthoc, [p for _, p in named]

    def _posthoc_ema_step(self) -> None:
        """Fold this step's weights into the profiles; at snapshot steps the main process writes them to posthoc_ema/."""
        self.posthoc_ema.update(self._posthoc_params, self.step)
        if self.accelerator.is_main_process and (self.step % self.posthoc_ema.every == 0 or self.step == self.t.max_steps):
            self.posthoc_ema.save_snapshot(self.run.posthoc_ema, self.step)

    def _new_evaluator(self) -> Any:
        """The in-training evaluator (trainer.eval_every), on the main process only; None without it."""
        t, acc = self.t, self.accelerator
        if t.eval_every and self.strategy.sharded:
            raise ConfigError("trainer.eval_every evaluates on the main process alone, which strategy=fsdp cannot (each "
                              "process holds a slice of the weights): set trainer.eval_every=0 and run `genlab eval` "
                              "on the finished run.")
        if not (t.eval_every and acc.is_main_process):
            return None
        from genlab.eval.evaluate import Evaluator

        return Evaluator(self.cfg, acc.device)

    def _sync_batch_norm(self, name: str, network: torch.nn.Module) -> torch.nn.Module:
        """BatchNorm statistics over the global batch on several GPUs, so N processes train like one.

        torch's SyncBatchNorm runs on GPUs only: on several CPU processes each normalises over its
        own slice, and the run differs slightly from a single-process one (said once).
        """
        acc = self.accelerator
        if acc.num_processes == 1 or not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                                             for m in network.modules()):
            return network
        if acc.device.type == "cuda":
            return torch.nn.SyncBatchNorm.convert_sync_batchnorm(network)
        if acc.is_main_process:
            log.warning("%s has BatchNorm layers: on %d CPU processes each normalises over its own %d images, so "
                        "this run differs slightly from one process with the whole batch (GPUs use SyncBatchNorm).",
                        name, acc.num_processes, self.t.batch_size)
        return network

    def _decide_resume(self) -> bool:
        """The main process decides (before anyone writes status.json); every process follows."""
        decision = [resume_decision(self.run) if self.accelerator.is_main_process else None]
        broadcast_object_list(decision)
        if decision[0] not in ("fresh", "resume"):
            raise ConfigError(decision[0])
        return decision[0] == "resume"

    def _plateau_value(self, logged: dict[str, float]) -> float:
        """What ReduceLROnPlateau watches: the loss named `loss`, else the sum of the family's losses."""
        keys = [k for k in losses(self.family_losses, logged) if k in logged]
        return logged["loss"] if "loss" in keys else sum(logged[k] for k in keys)

    def _unwrapped(self, name: str) -> torch.nn.Module:
        return self.accelerator.unwrap_model(getattr(self.family, name))

    def _new_optimizers(self, family: Family) -> dict[str, torch.optim.Optimizer]:
        """One optimizer per phase; each param group's lr is trainer.lr x its optional lr_scale."""
        make = optimizers.from_config(self.cfg.optimizer)
        return {phase: make([{k: v for k, v in g.items() if k != "lr_scale"} | {"lr": self.t.lr * g.get("lr_scale", 1.0)}
                             for g in groups])
                for phase, groups in family.param_groups().items()}

    def _choose_micro_batch(self, dataset: Any, resume: bool) -> None:
        """trainer.effective_batch_size: set batch_size (probed) and grad_accum so that
        batch_size x grad_accum x processes = effective_batch_size."""
        t, acc = self.t, self.accelerator
        sizes = micro_batch.candidates(t.effective_batch_size, acc.num_processes, t.get("max_micro_batch"),
                                       len(dataset))
        complete = ckpt.complete_checkpoints(self.run.checkpoints) if resume else []
        if complete:  # the data position depends on the micro-batch: keep the checkpoint's
            latest, state = ckpt.newest_loadable(complete, ckpt.load_state)
            size, how = state["batch_size"], f"as in {latest.name}"
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
            if self.run.is_run():  # what `genlab sample` and `genlab resume` read
                self.run.write_config(self.cfg)

    # ---- checkpoints -------------------------------------------------------------------
    def save_checkpoint(self, name: str | None = None) -> Path | None:
        """Save the full training state to checkpoints/step_N (or checkpoints/<name>)."""
        self.accelerator.wait_for_everyone()
        extra = {  # the strategy adds the weights, optimizer and EMA states (whole, or each process's shards)
            "log_window": self.window.state_dict(self.accelerator),
            "lr_schedules": {k: s.state_dict() for k, s in self.lr_schedules.items()},
            "scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler else None,
            "rng": _rng_state(),
            "posthoc_ema": self.posthoc_ema.state_dict() if self.posthoc_ema else None,
        }
        state = {"step": self.step, "data_position": self.batches.position, "wandb_id": self.tracker.run_id,
                 "batch_size": self.t.batch_size, "grad_accum": self.t.grad_accum,
                 "num_processes": self.accelerator.num_processes, "best": self.best.state_dict()}
        networks = {n: self._unwrapped(n) for n in self.family.networks()}
        path = self.strategy.save_checkpoint(self.run.checkpoints, self.step, networks, self.optimizers,
                                             self.ema, self.family.ema_network, extra, state,
                                             self.t.keep_checkpoints, name=name)
        if path is not None:
            log.info("checkpoint %s", path)
        self.accelerator.wait_for_everyone()
        return path

    def _load_checkpoint(self) -> dict[str, int]:
        if self.accelerator.is_main_process:  # a run killed between a save and its pruning
            ckpt.prune(self.run.checkpoints, self.t.keep_checkpoints)
        complete = ckpt.complete_checkpoints(self.run.checkpoints, warn=True)
        if not complete:
            log.warning("no complete checkpoint in %s: starting from step 0", self.run_dir)
            return {}
        path, (training_state, state) = ckpt.newest_loadable(complete, self._read_checkpoint)
        global_batch = self.t.batch_size * self.accelerator.num_processes
        if state["batch_size"] * state["num_processes"] != global_batch:
            raise GenlabError(
                f"{path} was written with batch_size {state['batch_size']} x {state['num_processes']} processes; "
                f"this run has {self.t.batch_size} x {self.accelerator.num_processes}. The data position would not "
                "match: resume with the same global micro-batch, or start a new run from this one's weights.")
        if state["grad_accum"] != self.t.grad_accum:
            log.warning("grad_accum changed from %d to %d: the LR schedule (counted in optimizer steps) is unchanged, "
                        "the effective batch is not.", state["grad_accum"], self.t.grad_accum)
        for k, s in self.lr_schedules.items():
            s.load_state_dict(training_state["lr_schedules"][k])
        if self.accelerator.scaler and training_state["scaler"]:
            self.accelerator.scaler.load_state_dict(training_state["scaler"])
        if self.ema:
            self.ema.to(self.accelerator.device)
        if self.posthoc_ema:
            if not training_state.get("posthoc_ema"):
                raise GenlabError(f"{path} was written without trainer.posthoc_ema: resume with "
                                  "trainer.posthoc_ema.sigma_rels=[], or start a new run to keep post-hoc EMA profiles.")
            self.posthoc_ema.load_state_dict(training_state["posthoc_ema"])
        self._resume_rng = training_state["rng"]
        self.window = LogWindow.from_state(training_state.get("log_window"), self.accelerator.device)
        if self.accelerator.is_main_process:
            self.logged_until = self.run.truncate_metrics(state["step"])
        self.step, self.wandb_id = state["step"], state["wandb_id"]
        if state.get("best"):
            self.best.load_state_dict(state["best"])
        log.info("resumed from %s at step %d", path, self.step)
        return state["data_position"]

    def _read_checkpoint(self, path) -> tuple[dict, dict]:
        """(training state, state.json) of `path`, its weights, optimizer and EMA states loaded; CheckpointCorrupt if damaged."""
        state = ckpt.load_state(path)
        networks = {n: self._unwrapped(n) for n in self.family.networks()}
        training_state = self.strategy.load_checkpoint(path, networks, self.optimizers, self.ema,
                                                       self.family.ema_network, self.trust_run)
        return training_state, state

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
        checked, logged = [], []  # the losses and the gradient norm, tested for NaN/inf together
        for micro in range(accum):
            with contextlib.ExitStack() as stack:
                if micro < accum - 1:  # gradients are all-reduced only on the last micro-step
                    for network in self.family.networks().values():
                        stack.enter_context(self.strategy.no_sync(network))
                rng = StepRandom(self.t.seed, self.step, phase, micro, acc.process_index, acc.num_processes, acc.device)
                self.last_batch = self._next_batch()
                with self._autocast():
                    loss, logs = self.family.loss(phase, self.last_batch, self.step, rng)
                acc.backward(loss / accum if accum > 1 else loss)
            checked.append(loss.detach().float())
            logged.append(logs)
        if acc.scaler is not None:
            acc.scaler.unscale_(optimizer.optimizer)  # clip and check true gradients
        norm = _grad_norm(self._params[phase], self.grad_clip)
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
        for logs in logged:  # only steps taken are logged: a skipped step's NaN never reaches the means
            for k, v in logs.items():
                window.add(k, v.detach(), accum)
        window.add(f"grad_norm_{phase}", norm.detach())
        return True

    def _handle_nonfinite(self, phase: str, logs: dict[str, torch.Tensor], loss: torch.Tensor) -> None:
        bad = [k for k, v in logs.items() if not torch.isfinite(v).all()] or ["gradients"]
        what = f"non-finite {', '.join(bad)} in phase '{phase}' at step {self.step + 1} (loss={loss.item():.4g})"
        self.nonfinite_in_a_row += 1
        if self.t.on_nonfinite == "skip" and self.nonfinite_in_a_row <= self.t.max_nonfinite_skips:
            log.warning("%s: step skipped (%d in a row, giving up after %d)", what, self.nonfinite_in_a_row,
                        self.t.max_nonfinite_skips)
            return
        last = self.run.checkpoint("latest")
        raise NonFiniteError(f"{what}; stopped before the optimizer step. Last good checkpoint: {last}. "
                             "Try a lower trainer.lr, trainer.grad_clip=1.0, or trainer.on_nonfinite=skip.")

    def sample_grid(self, name: str) -> Path | None:
        """Fixed-noise samples (EMA weights if any) to samples/<name>.png; main process only."""
        if not self.t.sample_n or not (self.accelerator.is_main_process or self.strategy.sharded):
            return None  # strategy=fsdp: every process takes part in each forward (it all-gathers the weights)
        path = self.run.samples / f"{name}.png"
        # fork_rng: sampling must not move the training RNG, or resumed runs would diverge.
        with torch.random.fork_rng(devices=[]), unwrapped_networks(self.family, self.accelerator), \
                swapped_in_ema(self.family, self.ema):
            # Conditioned families can show their input beside the output (sketch | image).
            draw = self.family.sample_pairs if isinstance(self.family, PairedSamples) else self.family.sample
            images = draw(self.t.sample_n, seed=self.t.seed)
        if not self.accelerator.is_main_process:
            return None
        save_grid(images, path)
        self.tracker.log_image(self.step, "samples", path)
        return path

    def diagnose(self) -> None:
        """The family's own checks (Diagnosed), on the main process (every process under strategy=fsdp),
        away from the training RNG."""
        if not (self.accelerator.is_main_process or self.strategy.sharded):
            return
        with torch.no_grad(), torch.random.fork_rng(devices=[]), unwrapped_networks(self.family, self.accelerator), \
                swapped_in_ema(self.family, None):
            self.family.diagnose(self.last_batch)

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
        if self._resume_rng:
            _set_rng_state(self._resume_rng)
        progress = Progress(t.max_steps, self.step, t.progress, enabled=acc.is_main_process, losses=self.family_losses)
        logged = {}
        images_per_step = t.batch_size * t.grad_accum * acc.num_processes
        # Plain values for the hot loop: reading an OmegaConf node costs ~10 us, a dozen times a step.
        max_steps, log_every, sample_every = t.max_steps, t.log_every, t.sample_every
        checkpoint_every, eval_every = t.checkpoint_every, t.eval_every
        diag_every = self.family.diag_every if isinstance(self.family, Diagnosed) else 0
        window_start = time.perf_counter()
        for network in self.family.networks().values():
            network.train()
        while self.step < max_steps:
            if self.stop_signal is not None:
                log.warning("%s received: checkpointing at step %d and stopping",
                            signal.Signals(self.stop_signal).name, self.step)
                self.save_checkpoint()
                raise StopRequested(self.stop_signal, self.previous_handlers.get(self.stop_signal))
            stepped = [self._optimizer_step(phase, self.window) for phase in self.family.phases(self.step)]
            if not all(stepped):
                continue  # a skipped non-finite step: same step number, next batches
            self.nonfinite_in_a_row = 0
            self.step += 1
            self.window.steps += 1
            if self.ema is not None:
                self.ema.step(self._ema_params)
            if self.posthoc_ema is not None:
                self._posthoc_ema_step()
            if self.step % log_every == 0 or self.step == max_steps:
                elapsed = time.perf_counter() - window_start
                logged = self.window.means(acc)
                for phase, opt in self.optimizers.items():
                    logged[f"lr_{phase}"] = opt.param_groups[0]["lr"]
                    if isinstance(self.lr_schedules[phase], torch.optim.lr_scheduler.ReduceLROnPlateau):
                        self.lr_schedules[phase].step(self._plateau_value(logged))
                logged["images_per_s"] = images_per_step * self.window.steps / elapsed
                self.tracker.log(self.step, logged)
                progress.update(self.step, logged)
                self.window, window_start = LogWindow(), time.perf_counter()
            else:
                progress.update(self.step)
            if diag_every and self.step % diag_every == 0:
                self.diagnose()
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
        if self.run.checkpoint(f"step_{self.step}") is None:
            self.save_checkpoint()
        if self.posthoc_ema and self.accelerator.is_main_process:  # an early stop ends between snapshots
            if not (self.run.posthoc_ema / f"step_{self.step:06d}.safetensors").exists():
                self.posthoc_ema.save_snapshot(self.run.posthoc_ema, self.step)
        self.sample_grid("final")
        if self.accelerator.is_main_process or self.strategy.sharded:  # fsdp: gathering the weights is a collective
            with unwrapped_networks(self.family, self.accelerator), swapped_in_ema(self.family, self.ema):
                self.strategy.export(self.family, lambda: build("model", self.cfg.model), self.run.export)
        if self.accelerator.is_main_process:
            refresh_model_card(self.run, type(self.family))  # export/README.md: the Hub's model card (never fatal)
        self.accelerator.wait_for_everyone()
        best = {f"best_{self.best.metric}": self.best.best} if self.best.best is not None else {}
        return {"step": self.step, **logged, **best}
