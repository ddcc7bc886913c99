"""Peak GPU memory and speed of ControlNet training at Stable Diffusion 1.5 and SDXL size (issues 4, 15).

Nothing is downloaded: the base is Stable Diffusion 1.5's architecture (U-Net, VAE, CLIP
text encoder, scheduler) with random weights, built from the published configs and saved
once as a diffusers directory. Speed and memory do not depend on the weights' values.
Each setting then trains `experiment=controlnet_sketch_sd15` on it with genlab's own loop
(Accelerate, fp16 autocast, fp32 trainable weights) on fill_circles pairs drawn at 512 px,
in its own process (a clean peak-memory counter; an out-of-memory setting is recorded,
not fatal):

- micro-batch 1 and 4 (`trainer.batch_size`, no accumulation);
- gradient checkpointing on and off (`model.gradient_checkpointing`);
- `controlnet`: the whole ControlNet trains (diffusers' train_controlnet.py), or
  `control_lora`: the ControlNet copy frozen with rank-16 LoRA (`model.control_lora.rank`),
  or `controlnet_unet_lora`: the whole ControlNet plus rank-16 LoRA on the base U-Net (the recipe).

`--kind sdxl` trains the same settings on SDXL's architecture (two text encoders, 1024 px).
SD3.5 and Flux ControlNets cannot train in genlab yet (the flow-matching objective): for them,
as for every kind, `--sizes` reports what needs no GPU: each kind's parameter counts at its
real shapes (built on the meta device), the bf16 and int8-quantised (`trainer.quantize_base=int8`)
bytes of its denoiser, and the checkpoint and export sizes of each training mode.

Writes benchmarks/controlnet-<machine>.json. Anchor: diffusers' ControlNet example needs
about 38 GB at batch 4, and 16 GB with gradient checkpointing and 8-bit Adam.

    python -m scripts.bench_controlnet                          # a GPU: SD 1.5 shapes at 512 px, fp16
    python -m scripts.bench_controlnet --adam8bit               # also optimizer=adamw8bit (bitsandbytes)
    python -m scripts.bench_controlnet --kind sdxl --image-size 1024   # SDXL's shapes
    python -m scripts.bench_controlnet --presets vram_12gb vram_24gb vram_80gb   # the memory table of docs/benchmarks.md
    python -m scripts.bench_controlnet --sizes                  # CPU: sizes of every base kind, no training
    python -m scripts.bench_controlnet --size tiny --image-size 32 --batch-sizes 1 --steps 2 --warmup 1 \\
        trainer.mixed_precision=no                              # a CPU check of the script (tests)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path

LORA_RANK = 16
MODES = {
    "controlnet": ["model.lora.rank=0", "model.control_lora.rank=0"],
    "control_lora": ["model.lora.rank=0", f"model.control_lora.rank={LORA_RANK}"],
    "controlnet_unet_lora": [f"model.lora.rank={LORA_RANK}", "model.control_lora.rank=0"],
}
# Stable Diffusion 1.5's architecture (its unet/, vae/ and text_encoder/ config.json), and a tiny one for tests.
SIZES = {
    "sd15": {
        "unet": dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
                     block_out_channels=[320, 640, 1280, 1280]),
        "vae": dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, sample_size=512,
                    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4),
        "text": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
    },
    "tiny": {
        "unet": dict(sample_size=4, cross_attention_dim=32, attention_head_dim=4, layers_per_block=1,
                     block_out_channels=[32, 64], norm_num_groups=8,
                     down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                     up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"]),
        "vae": dict(block_out_channels=[32, 32, 32, 32], layers_per_block=1, latent_channels=4, sample_size=32,
                    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4),
        "text": dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64),
    },
}


def random_base(size: str, out_dir: Path, kind: str = "sd15") -> Path:
    """A pipeline directory of `kind`'s architecture at `size` ("sd15"/"real" or "tiny"), random weights (built once)."""
    if (out_dir / "model_index.json").exists():
        return out_dir
    if kind == "sdxl":
        from genlab.families import stand_ins

        return stand_ins.save_sdxl(out_dir, "tiny" if size == "tiny" else "real")
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from genlab.text import clip_tokenizer, tiny_text_config

    torch.manual_seed(0)
    shapes = SIZES[size]
    # SD 1.5's text encoder is CLIP ViT-L/14's: the tiny config's fields at its sizes, quick_gelu as CLIP.
    text_config = tiny_text_config(**shapes["text"])
    text_config.hidden_act = "quick_gelu"
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**shapes["vae"]), text_encoder=CLIPTextModel(text_config), tokenizer=clip_tokenizer(),
        unet=UNet2DConditionModel(**shapes["unet"]),
        scheduler=DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                clip_sample=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out_dir)
    return out_dir


LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def build_real(kind: str) -> dict:
    """`kind`'s modules at real shapes on the meta device (no memory), the denoiser under "denoiser"."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from genlab.families import stand_ins, stand_ins_llm
    from genlab.text import tiny_text_config

    with torch.device("meta"):
        if kind == "sd15":
            shapes = SIZES["sd15"]
            parts = {"unet": UNet2DConditionModel(**shapes["unet"]), "vae": AutoencoderKL(**shapes["vae"]),
                     "text_encoder": CLIPTextModel(tiny_text_config(**shapes["text"]))}
        else:
            parts = {"sdxl": stand_ins.build_sdxl, "sd3": stand_ins.build_sd3, "flux": stand_ins.build_flux,
                     "qwen-image": stand_ins_llm.build_qwen_image, "z-image": stand_ins_llm.build_z_image,
                     "sana": stand_ins_llm.build_sana}[kind]("real")
    parts["denoiser"] = parts.get("unet") or parts["transformer"]
    return parts


def controlnet_of(kind: str, denoiser):
    """The ControlNet genlab builds on `denoiser` (on the meta device when it is there)."""
    import torch
    from diffusers import ControlNetModel

    from genlab.families.flow_controlnet import controlnet_for

    with torch.device("meta"):
        if kind in ("sd15", "sdxl"):
            return ControlNetModel.from_unet(denoiser)
        return controlnet_for(kind, denoiser)


def lora_parameters(module, rank: int = LORA_RANK) -> int:
    """Parameters of rank-`rank` LoRA on the attention projections of `module` (r x (in + out) each)."""
    import torch

    return sum(rank * (m.in_features + m.out_features) for name, m in module.named_modules()
               if isinstance(m, torch.nn.Linear) and name.endswith(LORA_TARGETS))


def int8_bytes(module, rest_bytes: int = 2) -> int:
    """Bytes of `module` with its linear weights stored as torchao's int8 weight-only tensors (int8 values,
    a fp32 scale and an int8 zero point per row) and everything else at `rest_bytes` (bf16)."""
    import torch

    linear = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    quantized = sum(m.out_features * (m.in_features + 5) for m in linear)
    rest = sum(p.numel() for p in module.parameters()) - sum(m.weight.numel() for m in linear)
    return quantized + rest_bytes * rest


#: The base kinds `--sizes` reports, at their published shapes.
SIZE_KINDS = ("sd15", "sdxl", "sd3", "flux", "qwen-image", "z-image", "sana")


def fp8_bytes(module, rest_bytes: int = 2) -> int:
    """Bytes of `module` with its linear weights stored as torchao's fp8 weight-only tensors (e4m3 values and
    a fp32 scale per row) and everything else at `rest_bytes` (bf16)."""
    import torch

    linear = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    quantized = sum(m.out_features * (m.in_features + 4) for m in linear)
    rest = sum(p.numel() for p in module.parameters()) - sum(m.weight.numel() for m in linear)
    return quantized + rest_bytes * rest


def sizes(kind: str) -> dict:
    """What needs no GPU: parameter counts, bf16, int8 and fp8 bytes, checkpoint and export sizes per mode.

    Checkpoints hold the trainable weights in fp32 and AdamW's two fp32 moments (12 bytes each);
    exports hold the ControlNet in fp32 and the LoRA in fp32.
    """
    parts = build_real(kind)
    denoiser = parts.pop("denoiser")
    controlnet = controlnet_of(kind, denoiser)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    cn, lora = count(controlnet), lora_parameters(denoiser)
    modes = {"controlnet": cn, "controlnet_unet_lora": cn + lora}
    if kind in ("sd15", "sdxl"):  # Control-LoRA: LoRA on the copy + its zero convolutions and hint encoder
        new = sum(count(getattr(controlnet, n)) for n in ("controlnet_cond_embedding", "controlnet_down_blocks",
                                                          "controlnet_mid_block"))
        modes["control_lora"] = lora_parameters(controlnet) + new
    return {"parameters_m": {name: round(count(m) / 1e6, 1) for name, m in parts.items()},
            "controlnet_parameters_m": round(cn / 1e6, 1), f"lora{LORA_RANK}_parameters_m": round(lora / 1e6, 2),
            "denoiser_bf16_gb": round(2 * count(denoiser) / 1e9, 2), "denoiser_int8_gb": round(int8_bytes(denoiser) / 1e9, 2),
            "denoiser_fp8_gb": round(fp8_bytes(denoiser) / 1e9, 2),
            "checkpoint_gb": {mode: round(12 * n / 1e9, 2) for mode, n in modes.items()},
            "export_gb": {"controlnet": round(4 * cn / 1e9, 2), "lora": round(4 * lora / 1e9, 3)}}


# The trainer presets (each picks its optimizer: 8-bit AdamW for 12 and 24 GB).
PRESETS = ("vram_12gb", "vram_24gb", "vram_80gb")
PRESET_KEYS = ("batch_size", "grad_accum", "mixed_precision", "gradient_checkpointing", "quantize_base", "sample_n")


def preset_overrides(preset: str, last_step: int) -> list[str]:
    """A trainer preset's settings as overrides that win over the SD 1.5 recipe's own trainer values, with
    ControlNet + rank-16 U-Net LoRA, and a validation grid at the last step (its peak memory counts)."""
    from omegaconf import OmegaConf

    values = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "trainer" / f"{preset}.yaml")
    as_value = lambda v: "null" if v is None else str(v)  # noqa: E731
    return [f"trainer={preset}", *MODES["controlnet_unet_lora"],
            *(f"trainer.{key}={as_value(values[key])}" for key in PRESET_KEYS),
            f"model.gradient_checkpointing={values.gradient_checkpointing}",
            f"model.quantize_base={as_value(values.quantize_base)}", f"trainer.sample_every={last_step}"]


def in_subprocess(overrides: list[str], steps: int, warmup: int) -> dict:
    """genlab's loop on `experiment=controlnet_sketch_sd15` + `overrides` in a fresh process (images/s,
    peak memory); a failure (out of memory) comes back as an error instead of stopping the sweep."""
    from scripts.bench_loop import run_in_subprocess

    overrides = ["experiment=controlnet_sketch_sd15", *overrides]
    return run_in_subprocess(f"scripts.bench_loop.measure_genlab('controlnet', {overrides!r}, {steps}, {warmup})", check=False)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=["sd15", "sdxl"], default="sd15", help="the base architecture to train on")
    parser.add_argument("--sizes", action="store_true", help="only the sizes of every base kind (CPU, no training)")
    parser.add_argument("--size", choices=sorted(SIZES), default="sd15", help="sd15: the kind's real shapes; tiny")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=["controlnet", "control_lora"])
    parser.add_argument("--checkpointing", nargs="+", choices=["on", "off"], default=["off", "on"])
    parser.add_argument("--adam8bit", action="store_true", help="also measure optimizer=adamw8bit (needs bitsandbytes)")
    parser.add_argument("--presets", nargs="+", choices=PRESETS, default=[],
                        help="measure these trainer presets (ControlNet + LoRA, validation grid included) instead")
    parser.add_argument("--steps", type=int, default=20, help="measured optimizer steps per setting")
    parser.add_argument("--warmup", type=int, default=5, help="steps before measuring (also the log window)")
    parser.add_argument("--base-dir", type=Path, default=None, help="where the random base is kept "
                        "(default: $GENLAB_CACHE or ~/.cache/genlab, bench_base_<size>)")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/controlnet-<machine>.json")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every setting")
    args = parser.parse_args(argv)
    if args.steps % args.warmup:
        parser.error("--steps must be a multiple of --warmup (the log window)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from scripts.bench_loop import default_out, machine_name

    machine = machine_name()
    out = args.out or default_out(machine, prefix="controlnet")
    if args.sizes:
        report = {"machine": machine, "command": " ".join(["python", "-m", "scripts.bench_controlnet", *(argv or [])]),
                  "date": time.strftime("%Y-%m-%d %H:%M"), "sizes": {k: sizes(k) for k in SIZE_KINDS}}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        print(json.dumps(report["sizes"], indent=1))
        print(f"wrote {out}")
        return 0
    cache = Path(os.environ.get("GENLAB_CACHE", Path.home() / ".cache" / "genlab"))
    start = time.perf_counter()
    name = args.size if args.kind == "sd15" else f"{args.kind}_{args.size}"
    base = random_base(args.size, args.base_dir or cache / f"bench_base_{name}", args.kind)
    print(f"random {args.size} base at {base} ({time.perf_counter() - start:.0f} s)", flush=True)
    # fill_circles pairs instead of the recipe's photo folder (its edge style has no meaning there).
    # (bench_loop.measure_genlab adds logger=none, no periodic grids or checkpoints, plain progress.)
    common = [f"model.base={base}", "data=fill_circles", "~data.edges", f"data.image_size={args.image_size}",
              "data.count=256", "data.val_count=8", "trainer.grad_accum=1", "trainer.sample_n=0",
              "trainer.eval_every=0", *args.overrides]
    results = measure_presets(args, common) if args.presets else measure_settings(args, common)

    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine, "kind": args.kind, "device": "cuda" if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "python": platform.python_version(),
              "command": " ".join(["python", "-m", "scripts.bench_controlnet", *(argv if argv is not None else sys.argv[1:])]),
              "date": time.strftime("%Y-%m-%d %H:%M"), "size": args.size, "image_size": args.image_size,
              "steps": args.steps, "warmup": args.warmup, "common_overrides": common,
              "peak_memory": "torch.cuda.max_memory_allocated on a GPU; peak RSS of the process on a CPU",
              "anchor": "diffusers train_controlnet.py: ~38 GB at batch 4; ~16 GB with gradient checkpointing "
                        "and 8-bit Adam", "results": results}
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


def measure_presets(args: argparse.Namespace, common: list[str]) -> list[dict]:
    """--presets: one result per trainer preset (ControlNet + LoRA, validation grid included)."""
    results = []
    for preset in args.presets:
        result = {"preset": preset, "mode": "controlnet_unet_lora",
                  **in_subprocess([*common, *preset_overrides(preset, args.steps + args.warmup), *args.overrides],
                                  args.steps, args.warmup)}
        results.append(result)
        shown = result.get("error") or (f"{result['images_per_s']:6.2f} images/s  "
                                        f"peak {result['peak_cuda_mb'] or result['peak_rss_mb']:8.0f} MB")
        print(f"trainer={preset:10s} {shown}", flush=True)
    return results


def measure_settings(args: argparse.Namespace, common: list[str]) -> list[dict]:
    """One result per mode x gradient checkpointing x micro-batch x optimizer (iterations/s and peak memory)."""
    optimizers = ["adamw", "adamw8bit"] if args.adam8bit else ["adamw"]
    results = []
    for mode, checkpointing, batch, optimizer in itertools.product(args.modes, args.checkpointing, args.batch_sizes,
                                                                   optimizers):
        setting = {"mode": mode, "gradient_checkpointing": checkpointing == "on", "micro_batch": batch,
                   "optimizer": optimizer}
        overrides = [*common, *MODES[mode], f"model.gradient_checkpointing={checkpointing == 'on'}",
                     f"trainer.batch_size={batch}", f"optimizer={optimizer}"]
        result = {**setting, **in_subprocess(overrides, args.steps, args.warmup)}
        if "images_per_s" in result:
            result["iterations_per_s"] = result["images_per_s"] / batch
        results.append(result)
        shown = result.get("error") or (f"{result['iterations_per_s']:6.2f} it/s  "
                                        f"peak {result['peak_cuda_mb'] or result['peak_rss_mb']:8.0f} MB")
        print(f"{mode:22s} checkpointing {checkpointing:3s} batch {batch}  {optimizer:9s} {shown}", flush=True)
    return results


if __name__ == "__main__":
    sys.exit(main())
