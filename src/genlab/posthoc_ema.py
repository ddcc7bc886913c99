"""Post-hoc EMA (EDM2): choose the EMA length after training instead of before.

Training keeps a few power-function EMA profiles of the main network and saves snapshots of
them now and then. Any other EMA length can be rebuilt afterwards as a weighted sum of the
snapshots, so a sweep over EMA lengths costs no retraining.

A power-function EMA with exponent gamma averages the weights seen up to step t with the
weight profile p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t]: it forgets in
proportion to the length of training, not at a fixed rate like a constant decay. Its
relative length sigma_rel is the profile's standard deviation over t (EDM2 uses 0.05 and
0.10 as the two stored profiles). Every profile of this family is a function of (t, gamma)
only, and the inner product of two of them has a closed form, so rebuilding a target profile
from the snapshots is a small least-squares problem (`reconstruction_weights`).

Reference: Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models"
(EDM2, 2024), section 3 and appendix C.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from genlab.errors import GenlabError

#: A snapshot file of the run directory's posthoc_ema/ folder.
SNAPSHOT = re.compile(r"^step_(\d+)\.safetensors$")


def gamma_of(sigma_rel: float) -> float:
    """The power-function exponent whose profile has relative length `sigma_rel`.

    sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)) is a cubic in gamma. For gamma >= 0
    sigma_rel falls from 1/sqrt(12) (a plain running mean) towards 0 (the last weights), so
    one root is the EMA wanted: the largest real one.
    """
    if not 0 < sigma_rel < sigma_rel_of(0.0):
        raise ValueError(f"an EMA length (sigma_rel) must lie in (0, {sigma_rel_of(0.0):.3f}); got {sigma_rel}")
    inv = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def sigma_rel_of(gamma: float) -> float:
    """The relative length (standard deviation over t) of the profile with exponent `gamma`."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def profile_dot(t_a: float, gamma_a: float, t_b: float, gamma_b: float) -> float:
    """The integral over tau of p_a(tau) p_b(tau) for the profiles (t_a, gamma_a) and (t_b, gamma_b).

    Both profiles are zero after their own t, so the integral runs to min(t_a, t_b):
    (ga + 1)(gb + 1) m^(ga + gb + 1) / ((ga + gb + 1) t_a^(ga + 1) t_b^(gb + 1)), written with
    ratios of t so that large step counts and exponents do not overflow.
    """
    short, long_ = (t_a, t_b) if t_a <= t_b else (t_b, t_a)
    gamma_long = gamma_b if t_a <= t_b else gamma_a
    return (gamma_a + 1) * (gamma_b + 1) * (short / long_) ** (gamma_long + 1) / ((gamma_a + gamma_b + 1) * short)


def reconstruction_weights(snapshots: Sequence[tuple[float, float]], t: float, gamma: float) -> np.ndarray:
    """The weights w that make sum_i w_i p_i closest (least squares over tau) to the profile (t, gamma).

    Args:
        snapshots: (step, gamma) of each stored snapshot.
        t, gamma: the profile wanted: usually the last step and `gamma_of(sigma_rel)`.
    """
    gram = np.array([[profile_dot(ti, gi, tj, gj) for tj, gj in snapshots] for ti, gi in snapshots])
    target = np.array([profile_dot(ti, gi, t, gamma) for ti, gi in snapshots])
    # lstsq, not solve: two snapshots of the same (step, gamma) make the Gram matrix singular.
    return np.linalg.lstsq(gram, target, rcond=None)[0]


class PowerEMA:
    """The power-function EMA of a set of parameters, updated once per optimizer step.

    At step t (counted from 1) the average moves towards the current weights by
    1 - beta(t), beta(t) = (1 - 1/t)^(gamma + 1): the discrete form of the profile above. At
    t = 1 the average is the weights themselves.
    """

    def __init__(self, parameters: Iterable[torch.Tensor], sigma_rel: float):
        self.sigma_rel, self.gamma = sigma_rel, gamma_of(sigma_rel)
        self.average = [p.detach().clone().float() for p in parameters]

    @torch.no_grad()
    def update(self, parameters: Iterable[torch.Tensor], step: int) -> None:
        """Fold in the weights after optimizer step `step` (1 for the first)."""
        beta = (1 - 1 / step) ** (self.gamma + 1)
        for average, p in zip(self.average, parameters, strict=True):
            average.lerp_(p.detach().float(), 1 - beta)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {str(i): a for i, a in enumerate(self.average)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if len(state) != len(self.average):
            raise ValueError(f"a post-hoc EMA profile of {len(state)} tensors for {len(self.average)} parameters")
        for i, average in enumerate(self.average):
            average.copy_(state[str(i)])


def reconstruct(snapshots: Sequence[tuple[int, float, Sequence[torch.Tensor]]], sigma_rel: float,
                step: int | None = None) -> list[torch.Tensor]:
    """The EMA of relative length `sigma_rel` at `step` (default: the last snapshot's), from snapshots.

    Args:
        snapshots: (step, gamma, tensors) of each stored snapshot, tensors in the same order.
        sigma_rel: the EMA length wanted.

    A snapshot of exactly the wanted profile is returned as it is (bit for bit), not re-summed.
    """
    if not snapshots:
        raise ValueError("no post-hoc EMA snapshots to rebuild an EMA length from")
    step = max(s for s, _, _ in snapshots) if step is None else step
    gamma = gamma_of(sigma_rel)
    for s, g, tensors in snapshots:
        if s == step and math.isclose(g, gamma, rel_tol=1e-9):
            return [t.clone() for t in tensors]
    usable = [(s, g, tensors) for s, g, tensors in snapshots if s <= step]
    weights = reconstruction_weights([(s, g) for s, g, _ in usable], step, gamma)
    return [sum(float(w) * tensors[i].double() for w, (_, _, tensors) in zip(weights, usable)).float()
            for i in range(len(usable[0][2]))]


class PostHocEMA:
    """The profiles training keeps (`trainer.posthoc_ema.sigma_rels`) of one network, and their snapshots.

    The profiles go into every checkpoint (so a resume continues them bit for bit); a snapshot
    of all of them is written to the run's `posthoc_ema/step_N.safetensors` every `every`
    optimizer steps and at the last. Snapshots outlive checkpoint pruning: they are what a
    later EMA length is rebuilt from. Each costs len(sigma_rels) x 4 bytes per parameter.
    """

    def __init__(self, named_parameters: Iterable[tuple[str, torch.Tensor]], sigma_rels: Sequence[float], every: int):
        if len(sigma_rels) < 2:
            raise GenlabError(f"trainer.posthoc_ema.sigma_rels={list(sigma_rels)}: keep at least two EMA lengths "
                              "(EDM2 keeps [0.05, 0.10]); one profile cannot be re-weighted into another.")
        if every < 1:
            raise GenlabError(f"trainer.posthoc_ema.snapshot_every={every}: give the optimizer steps between snapshots "
                              "(e.g. a tenth of trainer.max_steps).")
        named = list(named_parameters)
        self.names, self.every = [n for n, _ in named], every
        try:
            self.profiles = [PowerEMA([p for _, p in named], float(s)) for s in sigma_rels]
        except ValueError as error:
            raise GenlabError(f"trainer.posthoc_ema.sigma_rels: {error}") from None

    def update(self, parameters: Sequence[torch.Tensor], step: int) -> None:
        for profile in self.profiles:
            profile.update(parameters, step)

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {str(p.sigma_rel): p.state_dict() for p in self.profiles}

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        if sorted(state) != sorted(str(p.sigma_rel) for p in self.profiles):
            raise GenlabError(f"the checkpoint keeps post-hoc EMA lengths {sorted(state)}, this run "
                              f"{[p.sigma_rel for p in self.profiles]}: resume with the same trainer.posthoc_ema.sigma_rels.")
        for profile in self.profiles:
            profile.load_state_dict(state[str(profile.sigma_rel)])

    def save_snapshot(self, folder: Path, step: int) -> Path:
        """Write every profile at `step` to folder/step_N.safetensors: a temporary file, fsynced, renamed."""
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"{i}/{name}": average.contiguous() for i, profile in enumerate(self.profiles)
                   for name, average in zip(self.names, profile.average)}
        meta = {"step": str(step), "sigma_rels": json.dumps([p.sigma_rel for p in self.profiles])}
        path, tmp = folder / f"step_{step:06d}.safetensors", folder / f".step_{step:06d}.{os.getpid()}.tmp"
        save_file({k: v.cpu() for k, v in tensors.items()}, tmp, metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path


def read_snapshots(folder: Path, up_to_step: int | None = None) -> list[tuple[int, float, dict[str, torch.Tensor]]]:
    """(step, gamma, tensors by parameter name) of every snapshot in `folder`, one per stored length.

    Snapshots after `up_to_step` are left out (an EMA at an earlier checkpoint is rebuilt from
    what training had written by then). A file that is not a snapshot genlab wrote is refused in one sentence.
    """
    from safetensors import SafetensorError, safe_open

    found = []
    for path in sorted(folder.glob("step_*.safetensors")) if folder.is_dir() else []:
        match = SNAPSHOT.match(path.name)
        if not match or (up_to_step is not None and int(match.group(1)) > up_to_step):
            continue
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                sigma_rels = [float(s) for s in json.loads(meta["sigma_rels"])]
                tensors = {key: f.get_tensor(key) for key in f.keys()}
            step = int(meta["step"])
        except (SafetensorError, OSError, KeyError, ValueError, TypeError) as error:
            raise GenlabError(f"{path} is not a post-hoc EMA snapshot genlab can read ({error}); move it out of "
                              f"{folder} to rebuild from the others.") from None
        for i, sigma_rel in enumerate(sigma_rels):
            prefix = f"{i}/"
            found.append((step, gamma_of(sigma_rel),
                          {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}))
    return found


def reconstruct_named(folder: Path, sigma_rel: float, step: int | None = None) -> dict[str, torch.Tensor]:
    """The EMA of relative length `sigma_rel` by parameter name, rebuilt from the snapshots in `folder`.

    `step`: the step wanted (a checkpoint's); the newest snapshot at or before it is used as the end.
    """
    if not 0 < sigma_rel < sigma_rel_of(0.0):
        raise GenlabError(f"--ema-length {sigma_rel}: an EMA length (relative to the training length) lies in "
                          f"(0, {sigma_rel_of(0.0):.3f}); EDM2's best lengths are around 0.05 to 0.15.")
    snapshots = read_snapshots(folder, step)
    if not snapshots:
        raise GenlabError(f"no post-hoc EMA snapshots in {folder}" + (f" up to step {step}" if step else "") +
                          ": train with trainer.posthoc_ema.sigma_rels=[0.05,0.10] to choose the EMA length afterwards.")
    names = sorted(snapshots[0][2])
    end = max(s for s, _, _ in snapshots)
    tensors = reconstruct([(s, g, [t[n] for n in names]) for s, g, t in snapshots], sigma_rel, end)
    return dict(zip(names, tensors))
