"""What one process holds for training: measured (`held_bytes`) and planned before training (`plan`).

Per process, for a network with P trainable and F frozen parameters (4 bytes each in fp32) on N
processes, AdamW (two states of the parameter's size):

| strategy | parameters      | gradients | optimizer states | EMA    |
|----------|-----------------|-----------|------------------|--------|
| ddp      | (P + F) x 4     | P x 4     | 2 P x 4          | P x 4  |
| fsdp     | (P + F) x 4 / N | P x 4 / N | 2 P x 4 / N      | P x 4 / N |

Frozen parts are held in the weight dtype of trainer.mixed_precision (2 bytes under bf16/fp16).
FSDP adds, during a forward or backward, the gathered weights of the block being computed (and,
with reshard_after_forward=false, of every block until its backward).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from genlab.errors import ConfigError


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor  # a DTensor: this process's shard


def _bytes(tensors: Any) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or not torch.is_tensor(t):
            continue
        local = _local(t)
        key = (local.device, local.data_ptr(), local.numel())
        if key not in seen or not local.numel():  # a tied weight counts once
            seen.add(key)
            total += local.numel() * local.element_size()
    return total


def held_bytes(networks: dict[str, nn.Module], optimizers: dict[str, Any], ema: Any = None,
               frozen: dict[str, nn.Module] | None = None) -> dict[str, int]:
    """Bytes this process holds in tensors now: parameters (trainable networks, plus `frozen` ones),
    gradients, optimizer states and EMA weights. Under strategy=fsdp, each DTensor's local shard."""
    modules = [*networks.values(), *(frozen or {}).values()]
    params = [p for m in modules for p in m.parameters()]
    states = [v for o in optimizers.values() for s in getattr(o, "optimizer", o).state.values() for v in s.values()
              if torch.is_tensor(v) and v.dim() > 0]  # Adam's step counters are scalars: left out
    return {"params": _bytes(params), "grads": _bytes(p.grad for p in params),
            "optimizer": _bytes(states), "ema": _bytes(ema.shadow_params) if ema is not None else 0}


# --- planned before training ------------------------------------------------------------------

ADAM_STATES = 2  # AdamW's exp_avg and exp_avg_sq, each of its parameter's shape and dtype
GiB = 2**30


def _per_rank(tensor: torch.Tensor, shards: int) -> int:
    """Bytes of `tensor` on the process holding the most of it when split over `shards` processes the
    way FSDP2 does: along dim 0 in torch.chunk pieces of ceil(dim0 / shards) rows."""
    if shards <= 1 or tensor.dim() == 0 or tensor.shape[0] == 0:
        return tensor.numel() * tensor.element_size()
    rows = -(-tensor.shape[0] // shards)
    return rows * (tensor.numel() // tensor.shape[0]) * tensor.element_size()


def plan_states(networks: dict[str, nn.Module], optimized: list[torch.Tensor], frozen: dict[str, nn.Module],
                ema_network: str | None, gpus: int, strategy: str, frozen_sharded: tuple[str, ...] = ()) -> dict[str, int]:
    """Bytes per GPU of parameters, gradients, optimizer states (AdamW) and EMA for `strategy` on `gpus` GPUs.

    Args:
        networks: the trainable networks (a network may hold frozen weights too: a base under LoRA).
        optimized: the parameters the optimizers step (the family's param groups).
        frozen: the family's frozen modules (VAE, text encoders, a frozen base).
        ema_network: the key of `networks` EMA copies (every parameter of it, as diffusers' EMAModel), or None.
        frozen_sharded: the frozen modules strategy=fsdp shards (the family's `shard_units`); others stay whole.

    Counts the tensors' own shapes and dtypes (meta tensors included): built as training builds them,
    the numbers are what `held_bytes` measures at a step (tests/test_plan.py).
    """
    n = gpus if strategy == "fsdp" else 1
    params = {id(p): (p, n) for m in networks.values() for p in m.parameters()}
    params.update({id(p): (p, n if name in frozen_sharded else 1) for name, m in frozen.items() for p in m.parameters()})
    ema = networks[ema_network].parameters() if ema_network else ()
    return {"params": sum(_per_rank(p, k) for p, k in params.values()),
            "grads": sum(_per_rank(p, n) for p in optimized),
            "optimizer": ADAM_STATES * sum(_per_rank(p, n) for p in optimized),
            "ema": sum(_per_rank(p, n) for p in ema)}


class _FlashLike(torch.autograd.Function):
    """Attention as a GPU's flash / memory-efficient kernels keep it for the backward: q, k, v, the output
    and one fp32 log-sum-exp per query (no seq x seq matrix). Meta tensors in, meta tensors out."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("a memory plan never runs a backward")


def saved_for_backward(forward: Any, params: list[torch.Tensor]) -> int:
    """Bytes autograd keeps for the backward while `forward()` runs: the activations of a training step.

    Counted by torch.autograd.graph.saved_tensors_hooks; weights are left out (they are counted as
    parameters), a tensor saved by several ops counts once. On the meta device nothing is computed;
    attention is counted as flash attention keeps it (see _FlashLike). Transient buffers freed
    before the backward (an MLP's hidden layer recomputed by nothing) are not counted.
    """
    import torch.nn.functional as F

    weights, seen, total = {id(p) for p in params}, set(), [0]
    kept = []  # holding them keeps their ids unique while counting

    def pack(tensor):
        if id(tensor) not in weights and id(tensor) not in seen:
            seen.add(id(tensor))
            kept.append(tensor)
            total[0] += tensor.numel() * tensor.element_size()
        return tensor

    sdpa = F.scaled_dot_product_attention

    def flash(query, key, value, *args, **kwargs):  # diffusers passes them by name
        return _FlashLike.apply(query, key, value) if query.is_meta else sdpa(query, key, value, *args, **kwargs)

    F.scaled_dot_product_attention = flash
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            forward()
    finally:
        F.scaled_dot_product_attention = sdpa
    return total[0]


def _frozen_modules(family: Any) -> dict[str, nn.Module]:
    trained = family.networks()
    return {k: v for k, v in vars(family).items() if isinstance(v, nn.Module) and k not in trained}


def _gathered(units: dict[str, list[nn.Module]], dtype_bytes: int | None) -> int:
    """FSDP's transient: the two largest blocks' whole weights (the one computing and the one prefetched)."""
    sizes = sorted((sum(p.numel() * (dtype_bytes or p.element_size()) for p in u.parameters())
                    for us in units.values() for u in us), reverse=True)
    return sum(sizes[:2])


def plan_family(family: Any, ema: bool, gpus: int, activations: int, mixed_precision: str) -> dict[str, dict[str, int]]:
    """The plan of a built family (real tensors or meta ones) under ddp and fsdp on `gpus` GPUs."""
    from genlab.train.strategy import shard_units

    networks, frozen, units = family.networks(), _frozen_modules(family), shard_units(family)
    optimized = [p for groups in family.param_groups().values() for g in groups for p in g["params"]]
    ema_network = family.ema_network if ema else None
    compute = {"bf16": 2, "fp16": 2}.get(mixed_precision)
    plans = {}
    for strategy in ("ddp", "fsdp"):
        states = plan_states(networks, optimized, frozen, ema_network, gpus, strategy,
                             tuple(k for k in units if k not in networks))
        states["activations"] = activations
        states["gathered"] = _gathered(units, compute) if strategy == "fsdp" and gpus > 1 else 0
        plans[strategy] = states
    return plans


def measured_activations(cfg: Any, family: Any) -> int:
    """Saved-for-backward bytes of one micro-batch (trainer.batch_size) of each phase's loss, the largest,
    run here on the CPU on a batch of the configured data."""
    from genlab.data import build_dataset
    from genlab.data.batches import BatchStream, loader_options, make_order
    from genlab.step_random import StepRandom

    t = cfg.trainer
    dataset = build_dataset(cfg.data, "train")
    batch = next(BatchStream(dataset, make_order(dataset, t.batch_size, t.seed), **loader_options(cfg.data, torch.device("cpu"))))
    params = [p for m in vars(family).values() if isinstance(m, nn.Module) for p in m.parameters()]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.bfloat16}.get(t.mixed_precision)  # CPU autocast: bf16 for both
    most = 0
    for phase in family.param_groups():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            most = max(most, saved_for_backward(lambda: family.loss(phase, batch, 0, StepRandom(t.seed, 0, phase, 0)),
                                                params))
    return most


def plan_config(cfg: Any, gpus: int) -> dict[str, dict[str, int]]:
    """`genlab train --plan`: the composed config's family built as training builds it (on the CPU), its
    states counted for ddp and fsdp on `gpus` GPUs, its activations measured on one micro-batch."""
    from genlab.config import build
    from genlab.train.loop import WEIGHT_DTYPES

    torch.manual_seed(cfg.trainer.seed)
    family = build("model", cfg.model)
    family.to(torch.device("cpu"), WEIGHT_DTYPES[cfg.trainer.mixed_precision])
    activations = measured_activations(cfg, family)
    return plan_family(family, bool(cfg.trainer.ema and family.ema_network), gpus, activations,
                       cfg.trainer.mixed_precision)


# --- real-size bases on the meta device -------------------------------------------------------

REAL_KINDS = ("sd15", "sdxl", "sd3", "flux", "qwen-image", "z-image", "sana", "flux2-klein")
NO_CONTROLNET = ("flux2-klein",)  # diffusers has no ControlNet of it (model=lora trains it)
SD15_UNET = dict(sample_size=64, cross_attention_dim=768)  # runwayml/stable-diffusion-v1-5's unet config (860M)


@contextlib.contextmanager
def _quiet_diffusers():
    """diffusers warns "modules that should be kept in float32: []" on every cast of a model."""
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(verbosity)


class RealSize:
    """A base of `kind` at its published size on the meta device, trained as `train` says:
    "full" (the denoiser, EMA optional), "controlnet" (genlab's ControlNet of it; the base frozen) or "lora"
    (model=lora's adapter, `lora` its config, on the frozen denoiser).
    It answers what plan_family asks of a family (networks, param_groups, shard_units, ema_network)."""

    def __init__(self, kind: str, train: str = "full", ema: bool = False, mixed_precision: str = "bf16",
                 lora: Any = None):
        if kind not in REAL_KINDS or train not in ("full", "controlnet", "lora") or (
                train == "controlnet" and kind in NO_CONTROLNET):
            raise ValueError(f"kind {kind!r} / train {train!r}")
        frozen_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)
        with _quiet_diffusers():
            self._build(kind, train, ema, frozen_dtype, lora if lora is not None else {"rank": 16})

    def _build(self, kind: str, train: str, ema: bool, frozen_dtype: torch.dtype, lora: Any) -> None:
        from diffusers.training_utils import cast_training_params

        from genlab.families import lora_variants, stand_ins
        from genlab.families.contract import diffusers_blocks

        with torch.device("meta"):
            if kind == "sd15":
                from diffusers import AutoencoderKL, UNet2DConditionModel
                from transformers import CLIPTextModel

                parts = {"unet": UNet2DConditionModel(**SD15_UNET), "vae": AutoencoderKL(
                    block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4),
                         "text_encoder": CLIPTextModel(stand_ins.text_config(768, 12, 12, 3072))}
            else:
                parts = stand_ins.BUILDERS[kind]("real")
        self.kind, self.train = kind, train
        self.denoiser = "unet" if "unet" in parts else "transformer"
        for name, module in parts.items():
            setattr(self, name, module.requires_grad_(False).to(frozen_dtype))
        trained = getattr(self, self.denoiser)
        if train == "controlnet":
            self.controlnet = self._controlnet(trained).to(torch.float32).requires_grad_(True)
            trained = self.controlnet
        elif train == "lora":  # the adapter t2i_lora adds (the same peft config), fp32 as it trains it
            with torch.device("meta"):
                trained.add_adapter(lora_variants.adapter_config(lora))
            cast_training_params(trained, torch.float32)
        else:
            trained.to(torch.float32).requires_grad_(True)
        self.trained = "controlnet" if train == "controlnet" else self.denoiser
        self.ema_network = self.trained if ema else None
        self._units = {name: diffusers_blocks(m) if name in ("unet", "transformer", "controlnet") else []
                       for name, m in vars(self).items() if isinstance(m, nn.Module)}

    def _controlnet(self, denoiser: nn.Module) -> nn.Module:
        from diffusers import ControlNetModel

        from genlab.families.flow_controlnet import controlnet_for

        with torch.device("meta"):
            if self.kind in ("sd15", "sdxl"):
                return ControlNetModel.from_unet(denoiser)
            controlnet = controlnet_for(self.kind, denoiser)
        if self.kind == "z-image":  # its embedders are the base's, lent for each call (as the family trains it)
            from genlab.families import z_image_parts

            z_image_parts.share_on_call(controlnet, denoiser)
        return controlnet

    def networks(self) -> dict[str, nn.Module]:
        return {self.trained: getattr(self, self.trained)}

    def param_groups(self) -> dict[str, list[dict[str, Any]]]:
        return {"main": [{"params": [p for p in getattr(self, self.trained).parameters() if p.requires_grad]}]}

    def shard_units(self) -> dict[str, list[nn.Module]]:
        return self._units

    def activations(self, batch: int, resolution: int, dtype: torch.dtype = torch.bfloat16) -> int:
        """Saved-for-backward bytes of the denoiser's (and ControlNet's) forward on `batch` images of
        `resolution` px, computed in `dtype` on the meta device (the VAE and text encoders run without
        gradients: nothing of theirs is kept for the backward)."""
        params = [p for m in vars(self).values() if isinstance(m, nn.Module) for p in m.parameters()]
        trained = getattr(self, self.trained)
        stored = [(p, p.dtype) for p in trained.parameters()]  # fp32, or a LoRA's frozen base in frozen_dtype
        with _quiet_diffusers():
            trained.to(dtype)  # autocast's compute dtype (meta tensors: no copy is made)
            try:
                return saved_for_backward(lambda: self._forward(batch, resolution // 8, dtype), params)
            finally:
                for p, stored_dtype in stored:
                    p.data = p.data.to(stored_dtype)

    def _forward(self, b: int, side: int, dtype: torch.dtype) -> None:
        meta = {"device": "meta", "dtype": dtype}
        with torch.autocast("cuda", dtype=dtype, enabled=False):
            if self.denoiser == "unet":
                unet, text = self.unet, self.unet.config.cross_attention_dim
                x, t = torch.empty(b, 4, side, side, **meta), torch.zeros(b, device="meta", dtype=torch.long)
                kwargs = {"encoder_hidden_states": torch.empty(b, 77, text, **meta)}
                if self.kind == "sdxl":
                    kwargs["added_cond_kwargs"] = {"text_embeds": torch.empty(b, 1280, **meta),
                                                   "time_ids": torch.empty(b, 6, **meta)}
                if self.train == "controlnet":
                    down, mid = self.controlnet(x, t, controlnet_cond=torch.empty(b, 3, side * 8, side * 8, **meta),
                                                return_dict=False, **kwargs)
                    kwargs.update(down_block_additional_residuals=down, mid_block_additional_residual=mid)
                unet(x, t, **kwargs)
                return
            if self.kind in ("qwen-image", "z-image", "sana", "flux2-klein"):
                self._forward_llm_kind(b, side, meta)
                return
            tr, tokens = self.transformer, (side // 2) ** 2
            config = tr.config
            if self.kind == "flux":
                x = torch.empty(b, tokens, config.in_channels, **meta)
                kwargs = {"encoder_hidden_states": torch.empty(b, 512, config.joint_attention_dim, **meta),
                          "pooled_projections": torch.empty(b, config.pooled_projection_dim, **meta),
                          "timestep": torch.empty(b, **meta), "guidance": torch.empty(b, **meta),
                          "img_ids": torch.empty(tokens, 3, **meta), "txt_ids": torch.empty(512, 3, **meta)}
                names = ("controlnet_block_samples", "controlnet_single_block_samples")
            else:
                x = torch.empty(b, config.in_channels, side, side, **meta)
                kwargs = {"encoder_hidden_states": torch.empty(b, 333, config.joint_attention_dim, **meta),
                          "pooled_projections": torch.empty(b, config.pooled_projection_dim, **meta),
                          "timestep": torch.empty(b, **meta)}
                names = ("block_controlnet_hidden_states",)
            if self.train == "controlnet":
                cond = torch.empty_like(x)
                out = self.controlnet(x, controlnet_cond=cond, return_dict=False, **kwargs)
                kwargs.update({k: v for k, v in zip(names, out)})
            tr(x, return_dict=False, **kwargs)

    def _forward_llm_kind(self, b: int, side: int, meta: dict) -> None:
        """The step's forward for the kinds with a language model for text encoder, through the helpers their
        families train with: the same packing, position ids and block samples, on meta tensors. `side` is the
        image's size / 8; the prompts are the pipelines' default token counts (flow_controlnet.TEXT_TOKENS)."""
        from genlab.families import flux2_klein_parts, qwen_image_controlnet, z_image_parts
        from genlab.families.flow_controlnet import TEXT_TOKENS

        tr, config, tokens = self.transformer, self.transformer.config, TEXT_TOKENS[self.kind]
        controlnet = getattr(self, "controlnet", None)
        t = torch.empty(b, **meta)
        if self.kind == "z-image":
            noisy = torch.empty(b, config.in_channels, side, side, **meta)
            cap_feats = list(torch.empty(b, tokens, config.cap_feat_dim, **meta).unbind(0))
            z_image_parts.velocity(controlnet, tr, noisy, t, cap_feats, torch.empty_like(noisy) if controlnet else None)
        elif self.kind == "sana":  # DC-AE: 32x down
            noisy = torch.empty(b, config.in_channels, side // 4, side // 4, **meta)
            text = {"encoder_hidden_states": torch.empty(b, tokens, config.caption_channels, **meta),
                    "encoder_attention_mask": torch.ones(b, tokens, device="meta", dtype=torch.long)}
            blocks = None if controlnet is None else tuple(controlnet(
                noisy, timestep=t, controlnet_cond=torch.empty_like(noisy), return_dict=False, **text)[0])
            tr(noisy, timestep=t, controlnet_block_samples=blocks, return_dict=False, **text)
        elif self.kind == "qwen-image":  # 16 latent channels, 2x2 patches
            noisy = torch.empty(b, config.in_channels // 4, side, side, **meta)
            text = {"encoder_hidden_states": torch.empty(b, tokens, config.joint_attention_dim, **meta),
                    "encoder_hidden_states_mask": torch.ones(b, tokens, device="meta", dtype=torch.long)}
            common = qwen_image_controlnet.transformer_inputs(noisy, t, text)
            blocks = None if controlnet is None else controlnet(
                **common, controlnet_cond=qwen_image_controlnet.pack(noisy), return_dict=False)
            tr(**common, controlnet_block_samples=blocks, return_dict=False)
        else:  # flux2-klein: latents already 2x2-patched (128 channels at side / 2)
            noisy = torch.empty(b, config.in_channels, side // 2, side // 2, **meta)
            text = {"encoder_hidden_states": torch.empty(b, tokens, config.joint_attention_dim, **meta),
                    "txt_ids": torch.zeros(b, tokens, 4, device="meta", dtype=torch.long)}
            tr(**flux2_klein_parts.transformer_inputs(noisy, t, text), return_dict=False)


def plan_real_size(kind: str, train: str, gpus: int, batch: int, resolution: int, ema: bool = False,
                   mixed_precision: str = "bf16", lora: Any = None) -> dict[str, dict[str, int]]:
    """The plan for a real-size `kind` base (see RealSize) on `gpus` GPUs, `batch` images per GPU."""
    base = RealSize(kind, train, ema, mixed_precision, lora)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)
    return plan_family(base, ema, gpus, base.activations(batch, resolution, dtype), mixed_precision)


ROWS = ("params", "grads", "optimizer", "ema", "activations", "gathered")


GPU_SIZES = (24, 80)  # GB of the common cards (RTX 4090 / L4-class, A100 / H100 80 GB)


def format_plan(plans: dict[str, dict[str, int]], gpus: int) -> str:
    """The plan as a text table: one row per kind of memory, GiB per GPU under ddp and fsdp."""
    columns = (("ddp", 10), ("fsdp", 14))
    totals = {s: sum(plans[s].values()) for s in plans}
    unit, name = (GiB, "GiB") if max(totals.values()) >= GiB else (2**20, "MiB")
    lines = [f"{f'{name} per GPU':<14}{'ddp':>10}{f'fsdp on {gpus}':>14}"]
    for row in ROWS:
        lines.append(f"{row:<14}" + "".join(f"{plans[s][row] / unit:>{w}.2f}" for s, w in columns))
    lines.append(f"{'total':<14}" + "".join(f"{totals[s] / unit:>{w}.2f}" for s, w in columns))
    for size in GPU_SIZES:  # a "24 GB" card holds 24e9 bytes
        lines.append(f"{f'fits {size} GB':<14}" + "".join(f"{'yes' if totals[s] <= size * 1e9 else 'no':>{w}}"
                                                          for s, w in columns))
    return "\n".join(lines)


def describe(cfg: Any, gpus: int, base: str | None = None) -> str:
    """What `genlab train --plan` prints: the table for the composed config (or, with `base`, for that
    kind's real-size base trained the way the composed model trains), and what was estimated."""
    t = cfg.trainer
    if base:
        target = str(cfg.model.get("_target_", "")).lower()
        train = "lora" if "t2i_lora" in target else "controlnet" if "controlnet" in target else "full"
        if train == "controlnet" and base in NO_CONTROLNET:
            raise ConfigError(f"--plan-base {base} with a ControlNet: diffusers has no ControlNet of {base}; plan "
                              "model=lora on it, or a ControlNet on another base.")
        # A ControlNet keeps no EMA (the paper's), nor does model=lora (the adapter is the export).
        size, ema = int(cfg.data.image_size), bool(t.ema) and train == "full"
        plans = plan_real_size(base, train, gpus, t.batch_size, size, ema, t.mixed_precision,
                               cfg.model.lora if train == "lora" else None)
        what = f"{base} at its real size ({train}), {t.batch_size} x {size} px per GPU, built on the meta device"
    else:
        plans = plan_config(cfg, gpus)
        what = f"the composed config, {t.batch_size} images per GPU per micro-step"
    return (f"memory plan: {what}, mixed_precision={t.mixed_precision}, AdamW\n{format_plan(plans, gpus)}\n"
            "params, grads, optimizer, ema: counted from the tensors' shapes and dtypes (what a process holds at "
            "a step). activations: saved-for-backward bytes of one forward, measured (an estimate: views saved by "
            "several ops count each time; CUDA allocator slack, DDP's gradient buckets and temporary buffers are "
            "not counted). gathered: fsdp's two largest blocks all-gathered at once.")
