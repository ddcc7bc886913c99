"""The contract between the generic training loop and a model family.

A family (DDPM, VAE, GAN, SD, ControlNet) is one plain class in its own file that owns
its networks, its losses and its sampling. The loop in `genlab.train.loop`, `genlab
sample` and `genlab eval` only ever talk to it through the protocols below, so adding a
family never touches them: write `families/<name>.py` and `configs/model/<name>.yaml`
(with `_target_` pointing at the class), nothing else.

How the loop drives a family, per optimizer step `step` (0-based):

    for phase in family.phases(step):                  # e.g. ["d", "g"] for a GAN
        for micro in range(trainer.grad_accum):
            rng = StepRandom(seed, step, phase, micro, ...)
            loss, logs = family.loss(phase, batch, step, rng)   # under autocast
            accelerator.backward(loss / grad_accum)
        clip grads of param_groups()[phase]; stop on non-finite grads
        optimizers[phase].step(); lr_schedules[phase].step(); zero_grad
    EMA update of family.ema_network (if trainer.ema)
    every family.diag_every steps: family.diagnose(batch)       (Diagnosed families)

Batches are dicts: "image" (B, C, H, W) float in [-1, 1]; optionally "label" (B,) long,
"caption" list[str], "sketch" (B, C, H, W) float in [0, 1] (see `genlab.data`).

`Family` is what every family has. The optional capabilities are small protocols of
their own (`PairedSamples`, `Conditioned`, `Autoencoder`, `EvalVariants`, `Diagnosed`,
`Diffused`, `Sharded`): a family has one
by having its members, and callers ask with `isinstance(family, Capability)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Mapping, Protocol, runtime_checkable

import torch
from torch import nn

from genlab.errors import GenlabError
from genlab.step_random import StepRandom  # noqa: F401  (loss() takes one: part of the contract)
from genlab.wrappers import unwrap  # noqa: F401  (one of the helpers families share, below)


#: Which way a logged scalar or a metric improves.
Direction = Literal["lower", "higher"]


@dataclass(frozen=True)
class Card:
    """What the model card of a family's export says (export/README.md, written by `genlab.model_card`).

    Args:
        what: completes "This is ..., trained with genlab": what the export holds.
        use: the code that loads the export, `{where}` standing for its place (a path or a Hub id).
        library_name, pipeline_tag, tags: the Hub's metadata (None where no Hub library or pipeline fits).
        title: the card's heading before " on <data>" (default: the family's name).
        notes: paragraphs after the loading code (what a stock pipeline does not do for this model).
    """

    what: str
    use: str = ""
    library_name: str | None = None
    pipeline_tag: str | None = None
    tags: tuple[str, ...] = ()
    title: str = ""
    notes: tuple[str, ...] = ()


@runtime_checkable
class Family(Protocol):
    """What the training loop, `genlab sample` and `genlab eval` need from every family.

    The four class attributes declare what readers of a run (`genlab runs`, reports, model cards,
    the best-checkpoint tracker) would otherwise have to guess from names; they are read from the
    class a run's `_target_` names, without building the family (`name`, `losses` and `metrics`
    from its source, see `families.declarations`: keep them literals). A `_target_` may name a
    builder function instead of the class; the builder then names its class as its `family`
    attribute (`families.sd.stable_diffusion.family = StableDiffusion`).
    """

    #: the family's name in tables, reports and model cards ("ddpm", "gan").
    name: ClassVar[str]
    #: what the model card of an export says; a family whose card depends on its config is `CardByConfig`.
    card: ClassVar[Card]
    #: the logged scalars of `loss()` that are losses (lower is better): what summaries and tables show.
    losses: ClassVar[tuple[str, ...]]
    #: the other logged scalars a run may be ranked or stopped by, each with the way it improves.
    metrics: ClassVar[Mapping[str, Direction]]
    #: attribute name (a key of `networks()`) whose weights get an EMA copy, or None. Set in __init__.
    ema_network: str | None
    #: classes the model is conditioned on (labels in batches, `--class` when sampling); None if unconditional.
    num_classes: int | None

    def networks(self) -> dict[str, nn.Module]:
        """Trainable networks by attribute name.

        These are checkpointed (`<name>.safetensors`) and wrapped by Accelerate: the loop
        replaces `family.<name>` with the prepared module, so `loss` must read the
        attribute each call rather than keep its own reference. Frozen parts (a VAE or a
        text encoder) are not listed here; the family moves them in `to()`.

        A listed network may be partly frozen (a pretrained U-Net under LoRA): its
        parameters with `requires_grad=False` are left out of checkpoints, so the
        constructor must rebuild them identically from config (e.g. from `model.base`).
        """

    def param_groups(self) -> dict[str, list[dict[str, Any]]]:
        """One entry per optimizer, keyed by phase name.

        Each value is a list of torch param-group dicts ({"params": [...], ...}); an
        optional "lr_scale" key multiplies `trainer.lr` for that group (TTUR for GANs).
        """

    def phases(self, step: int) -> list[str]:
        """Phase (optimizer) names to update, in order, at optimizer step `step`.

        Each phase consumes `trainer.grad_accum` micro-batches and steps its optimizer.
        """

    def loss(self, phase: str, batch: dict[str, Any], step: int,
             rng: StepRandom) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar loss for `phase` on one micro-batch, plus detached scalars to log.

        `batch` holds the keys of `genlab.data.BATCH_KEYS` that the data gives ("image" always;
        "latent_cache" when data.cache_latents is on), plus any its dataset documents.

        Every random draw (noise, timesteps, dropout of labels, latents, augmentation) comes
        from `rng`, so a run is the same on any number of processes. Log names should say
        what they are (`loss`, `g_loss`, `d_real`, `kl`, ...). Never call `.item()` here:
        the loop syncs with the device only at log steps.
        """

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> "Family":
        """Move every network (trainable and frozen) to `device`.

        `dtype` is the weight dtype for *frozen* networks under mixed precision;
        trainable networks stay fp32.
        """

    @torch.no_grad()
    def sample(self, n: int, seed: int, **options: Any) -> torch.Tensor:
        """Generate `n` images, (n, C, H, W) in [-1, 1], deterministically from `seed`.

        `options` are family-specific (`sampler`, `steps`, `class_label`, `guidance`,
        `sketch`, `prompt`, `interpolate`, `images`...). Raise `GenlabError` naming the
        option when one does not apply to the family.
        """

    def export(self, out_dir: Path) -> None:
        """Write the trained model in its ecosystem's format (see DESIGN.md)."""


# ---- optional capabilities ----------------------------------------------------------------
@runtime_checkable
class CardByConfig(Protocol):
    """The model card depends on the run's `model.*` keys (DDPM's DiT backbone, a ControlNet's base).

    Asked of the class, not of a built family: `card_for` is a classmethod.
    """

    @classmethod
    def card_for(cls, model: Mapping[str, Any], export: Mapping[str, Any] | None = None) -> Card:
        """The card for a run whose `model` config is `model` (plain data, as saved); `export`: what the
        export's genlab_export.json says, {} or None where it has none."""


@runtime_checkable
class PairedSamples(Protocol):
    """Training sample grids show the input beside the output (ControlNet: sketch | image).

    Without it, the grids show `sample(n, seed)`.
    """

    def sample_pairs(self, n: int, seed: int) -> torch.Tensor:
        """(n, C, H, W') images in [-1, 1], each input and output side by side."""


@runtime_checkable
class Conditioned(Protocol):
    """Samples are made from dataset items: `genlab eval` fills these `sample()` options from
    val items ("sketch" from item "sketch", "prompt" from item "caption") and compares each
    image with its item (sketch-following metrics). Without it, eval samples unconditionally."""

    conditions: tuple[str, ...]


Encode = Callable[..., tuple[torch.Tensor, torch.Tensor]]
Decode = Callable[..., torch.Tensor]


@runtime_checkable
class Autoencoder(Protocol):
    """The family is a VAE: `genlab eval` adds reconstruction, ELBO, IWAE and anomaly metrics."""

    def autoencoder(self) -> tuple[Encode, Decode, str]:
        """(encode(x[, labels]) -> (mean, logvar), decode(z[, labels]) -> image, likelihood).

        likelihood: "gaussian" | "laplace" | "bernoulli", the one the family's loss trains.
        """


@runtime_checkable
class EvalVariants(Protocol):
    """`genlab eval` measures the sample metrics again under each of these sample options, as
    `<metric>@<name>` (a GAN: with truncation 1.0 and 0.5), so a variety-for-quality trade shows."""

    eval_variants: dict[str, dict[str, Any]]


@runtime_checkable
class Diagnosed(Protocol):
    """The loop calls `diagnose` every `diag_every` optimizer steps (0 = never) with the
    step's last batch, outside the loss, networks unwrapped and in eval mode, the training
    RNG untouched (GAN: D/G balance and sample collapse warnings)."""

    diag_every: int

    def diagnose(self, batch: dict[str, Any]) -> list[str]:
        """Warnings found (also logged by the family); [] when all is well."""


@runtime_checkable
class Sharded(Protocol):
    """What `strategy=fsdp` shards block by block (FSDP2 "wrap units"). Without it, each network is
    sharded as one unit: every forward then gathers the whole network at once, so memory falls only
    between steps, not during them."""

    def shard_units(self) -> dict[str, list[nn.Module]]:
        """Blocks of each network to shard separately, by attribute name, innermost first.

        Trainable networks (keys of `networks()`) and frozen ones (a VAE, a text encoder, the base
        U-Net under a ControlNet) alike: a frozen base is split over the processes too.
        """


@runtime_checkable
class Diffused(Protocol):
    """The family is a diffusion model on the shared core (`genlab.diffusion.Diffusion`): its
    samplers, their defaults and `genlab eval --compare-samplers` settings come from there."""

    diffusion: Any  # genlab.diffusion.Diffusion (not imported here: the core imports this module)


# ---- helpers shared by families ----------------------------------------------------------
def batch_labels(batch: dict[str, Any], num_classes: int | None) -> torch.Tensor | None:
    """The batch's class labels for a conditional model (None when `num_classes` is unset)."""
    if not num_classes:
        return None
    if "label" not in batch:
        raise GenlabError("model.conditional=true but the batches have no 'label'; use labelled data")
    return batch["label"]


def refuse_unknown_sample_options(opts: dict[str, Any], family: str, takes: str, class_label: int | None,
                                  num_classes: int | None) -> None:
    """One sentence for what a guidance-free family (GAN, VAE) cannot do with `genlab sample`'s options.

    `opts` holds what the family did not take; `takes` lists what it does take, for the message.
    """
    if opts.pop("guidance", 1.0) != 1.0:
        raise GenlabError(f"--guidance applies to diffusion models only; the {family} has no guidance")
    if opts:
        raise GenlabError(f"option(s) {', '.join(sorted(opts))} do not apply to the {family}; it takes {takes}")
    if class_label is not None and not num_classes:
        raise GenlabError(f"--class needs a conditional {family} (train with model.conditional=true)")
    if class_label is not None and not 0 <= class_label < num_classes:
        raise GenlabError(f"--class {class_label} is out of range: classes are 0..{num_classes - 1}")


#: diffusers' block lists: U-Nets' and ControlNets' down/mid/up blocks, DiT/MMDiT/Flux transformer blocks.
BLOCK_LISTS = ("down_blocks", "mid_block", "up_blocks", "transformer_blocks", "single_transformer_blocks")


def diffusers_blocks(module: nn.Module | None) -> list[nn.Module]:
    """The blocks of a diffusers model that `strategy=fsdp` shards one at a time (see `Sharded`)."""
    blocks: list[nn.Module] = []
    for name in BLOCK_LISTS:
        found = getattr(unwrap(module), name, None) if module is not None else None
        if isinstance(found, nn.ModuleList):
            blocks.extend(found)
        elif isinstance(found, nn.Module):
            blocks.append(found)
    return blocks


def single_optimizer(networks: dict[str, nn.Module]) -> dict[str, list[dict[str, Any]]]:
    """`param_groups()` of a one-phase family: every trainable parameter of `networks` in one group."""
    return {"main": [{"params": [p for net in networks.values() for p in net.parameters() if p.requires_grad]}]}


class OnePhase:
    """`param_groups` and `phases` of a family with one optimizer ("main") over every trainable
    parameter of its `networks()`: inherit it instead of writing the two methods again."""

    def param_groups(self) -> dict[str, list[dict[str, Any]]]:
        return single_optimizer(self.networks())

    def phases(self, step: int) -> list[str]:
        return ["main"]
