"""Peak GPU memory and speed of ControlNet training at Stable Diffusion 1.5 size (issue 4).

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

Writes benchmarks/controlnet-<machine>.json. Anchor: diffusers' ControlNet example needs
about 38 GB at batch 4, and 16 GB with gradient checkpointing and 8-bit Adam.

    python scripts/bench_controlnet.py                          # a GPU: SD 1.5 shapes at 512 px, fp16
    python scripts/bench_controlnet.py --adam8bit               # also optimizer=adamw8bit (bitsandbytes)
    python scripts/bench_controlnet.py --size tiny --image-size 32 --batch-sizes 1 --steps 2 --warmup 1 \\
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


def random_base(size: str, out_dir: Path) -> Path:
    """A Stable Diffusion pipeline directory of `size`'s architecture with random weights (built once)."""
    if (out_dir / "model_index.json").exists():
        return out_dir
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


def in_subprocess(overrides: list[str], steps: int, warmup: int) -> dict:
    """genlab's loop on `experiment=controlnet_sketch_sd15` + `overrides` in a fresh process (images/s,
    peak memory); a failure (out of memory) comes back as an error instead of stopping the sweep."""
    from bench import run_in_subprocess  # scripts/ is on sys.path when this file runs

    overrides = ["experiment=controlnet_sketch_sd15", *overrides]
    return run_in_subprocess(f"bench.measure_genlab('controlnet', {overrides!r}, {steps}, {warmup})", check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="sd15")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=["controlnet", "control_lora"])
    parser.add_argument("--checkpointing", nargs="+", choices=["on", "off"], default=["off", "on"])
    parser.add_argument("--adam8bit", action="store_true", help="also measure optimizer=adamw8bit (needs bitsandbytes)")
    parser.add_argument("--steps", type=int, default=20, help="measured optimizer steps per setting")
    parser.add_argument("--warmup", type=int, default=5, help="steps before measuring (also the log window)")
    parser.add_argument("--base-dir", type=Path, default=None, help="where the random base is kept "
                        "(default: $GENLAB_CACHE or ~/.cache/genlab, bench_base_<size>)")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/controlnet-<machine>.json")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every setting")
    args = parser.parse_args(argv)
    if args.steps % args.warmup:
        parser.error("--steps must be a multiple of --warmup (the log window)")

    import torch

    from bench import default_out, machine_name  # scripts/ is on sys.path when this file runs

    cache = Path(os.environ.get("GENLAB_CACHE", Path.home() / ".cache" / "genlab"))
    start = time.perf_counter()
    base = random_base(args.size, args.base_dir or cache / f"bench_base_{args.size}")
    print(f"random {args.size} base at {base} ({time.perf_counter() - start:.0f} s)", flush=True)
    # fill_circles pairs instead of the recipe's photo folder (its edge style has no meaning there).
    # (bench.measure_genlab adds logger=none, no periodic grids or checkpoints, plain progress.)
    common = [f"model.base={base}", "data=fill_circles", "~data.edges", f"data.image_size={args.image_size}",
              "data.count=256", "data.val_count=8", "trainer.grad_accum=1", "trainer.sample_n=0",
              "trainer.eval_every=0", *args.overrides]
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

    machine = machine_name()
    out = args.out or default_out(machine, prefix="controlnet")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine, "device": "cuda" if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "python": platform.python_version(),
              "command": " ".join(["python", "scripts/bench_controlnet.py", *(argv if argv is not None else sys.argv[1:])]),
              "date": time.strftime("%Y-%m-%d %H:%M"), "size": args.size, "image_size": args.image_size,
              "steps": args.steps, "warmup": args.warmup, "common_overrides": common,
              "peak_memory": "torch.cuda.max_memory_allocated on a GPU; peak RSS of the process on a CPU",
              "anchor": "diffusers train_controlnet.py: ~38 GB at batch 4; ~16 GB with gradient checkpointing "
                        "and 8-bit Adam", "results": results}
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
