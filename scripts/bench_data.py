"""The data paths users train on, measured: `python -m scripts.bench --data [PARTS...]`.

Parts (all by default), written to the "data" section of benchmarks/bench-<machine>.json:

- throughput: DDPM (the default U-Net, 3 channels, 16 px, batch 64, EMA) on the digits as
  a folder of 32 px PNGs, decoded and resized every step (data=imagefolder, its default 2
  workers), against genlab's in-memory digits and against diffusers' train_unconditional.py
  on the same folder. That script is not installed here, so `measure_diffusers` is a
  faithful minimal copy of its data path and step: `load_dataset("imagefolder")`,
  torchvision Resize/CenterCrop/RandomHorizontalFlip/ToTensor/Normalize per image in
  `set_transform`, a shuffled DataLoader with its default 0 workers, then noise, a random
  timestep, MSE, Accelerate backward, gradient clipping at 1.0, AdamW, LR schedule, EMA
  (AdamW and EMAModel at their defaults, as the script leaves them), the loss read every step.
- paired: the same two paths (genlab's folder path and the script's) in one process, taking
  turns every `--window` optimizer steps (`bench_loop.measure_paired`), so that the machine's
  drift between processes (15-30% here) does not decide which is faster; once with the script
  as it is, once with the script given genlab's foreach AdamW and EMA updates. Each variant gets
  its pooled ratio, the windows' quartiles and a 95% interval (`bench_loop.interval_95`). Extra Hydra
  overrides change the model of both (e.g. a smaller U-Net, where the data path decides the speed).
- startup: `genlab train data=imagefolder` on 100,000 tiny PNGs, command to first optimizer
  step, with an empty file-list cache and again with it; the dataset construction alone
  in-process; and `genlab --help` and argument errors.
- cache: the fill_circles ControlNet recipe (experiment=controlnet_circles on a tiny SD
  base built here from the circles_vae / circles_sd recipes, untrained: speed only),
  optimizer steps/s without and with data.cache_latents (warm), and the time to encode the
  whole train split into the cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scripts import bench_loop

THREE_CHANNEL_DIGITS = ["data.channels=3", "data.image_size=16"]
PARTS = ("throughput", "paired", "startup", "cache")


def write_png_folder(folder: Path, size: int = 32) -> Path:
    """The 1,797 digits as RGB PNGs of `size` px (bicubic from 8 px), once."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    if folder.is_dir() and len(list(folder.glob("*.png"))) == 1797:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(load_digits().images):
        grey = Image.fromarray((image * 255 / 16).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
        grey.convert("RGB").save(folder / f"{i:04d}.png")
    return folder


class DiffusersScript:
    """diffusers' train_unconditional.py data path and step (see the module docstring), run
    `steps` at a time: `run(steps)` returns its seconds, as `bench_loop.BareLoop.run` does."""

    def __init__(self, folder: str, overrides: list[str], same_updates: bool = False):
        import torch
        from accelerate import Accelerator
        from datasets import load_dataset
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel
        from hydra.utils import instantiate
        from torchvision import transforms

        cfg = bench_loop.compose_config("ddpm", overrides)
        res, self.batch_size = cfg.data.image_size, cfg.trainer.batch_size
        family = instantiate(cfg.model, _convert_="all")  # the same UNet2DModel and DDPMScheduler as genlab's
        model, self.scheduler = family.unet, family.diffusion.scheduler
        augmentations = transforms.Compose([
            transforms.Resize(res, interpolation=transforms.InterpolationMode.BILINEAR), transforms.CenterCrop(res),
            transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
        dataset = load_dataset("imagefolder", data_dir=folder, split="train")
        dataset.set_transform(lambda examples: {"input": [augmentations(im.convert("RGB")) for im in examples["image"]]})
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.batch_size, shuffle=True, num_workers=0)
        # The script leaves AdamW and EMAModel at their defaults: per-tensor updates on a CPU (torch
        # picks foreach on CUDA only). same_updates=True gives it genlab's foreach updates instead,
        # so that the two differ only in the runner and the data path.
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.trainer.lr, betas=(0.95, 0.999), weight_decay=1e-6,
                                      eps=1e-8, foreach=True if same_updates else None)
        lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=500, num_training_steps=10**6)
        self.accelerator = Accelerator()
        self.model, self.optimizer, self.loader, self.lr_scheduler = self.accelerator.prepare(
            model, optimizer, loader, lr_scheduler)
        self.ema = EMAModel(self.model.parameters(), decay=cfg.trainer.ema, use_ema_warmup=True, foreach=same_updates)
        self.batches = self._endless()

    def _endless(self):
        while True:  # the script's epochs: a new shuffle each time through the folder
            yield from self.loader

    def run(self, steps: int) -> float:
        import torch
        import torch.nn.functional as F

        t0 = time.perf_counter()
        for _ in range(steps):
            clean = next(self.batches)["input"]
            noise = torch.randn_like(clean)
            t = torch.randint(0, self.scheduler.config.num_train_timesteps, (clean.shape[0],), device=clean.device)
            noisy = self.scheduler.add_noise(clean, noise, t)
            with self.accelerator.accumulate(self.model):
                loss = F.mse_loss(self.model(noisy, t).sample, noise)
                self.accelerator.backward(loss)
                if self.accelerator.sync_gradients:
                    self.accelerator.clip_grad_norm_(self.model.parameters(), 1.0)
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad()
            self.ema.step(self.model.parameters())
            self.last_loss = loss.detach().item()  # the script logs it every step (progress bar, trackers)
        return time.perf_counter() - t0


def measure_diffusers(folder: str, overrides: list[str], steps: int, warmup: int) -> dict:
    """Images/s of diffusers' train_unconditional.py data path and step, after `warmup` steps."""
    script = DiffusersScript(folder, overrides)
    script.run(warmup)
    return {"images_per_s": steps * script.batch_size / script.run(steps)}


def measure_paired_with_diffusers(folder: str, genlab_overrides: list[str], script_overrides: list[str], steps: int,
                                  warmup: int, window: int, same_updates: bool = False) -> dict:
    """genlab's folder path and the script's, in one process, taking turns every `window` steps
    (`bench_loop.measure_paired`): the machine's drift from minute to minute falls on both alike."""
    return bench_loop.measure_paired("ddpm", genlab_overrides, steps, warmup, window,
                                bare=DiffusersScript(folder, script_overrides, same_updates))


def loader_only(folder: str, batches: int = 40, batch_size: int = 64) -> dict:
    """Images/s of the data paths alone (no model): genlab's imagefolder stream with its default
    2 workers, and the diffusers script's transforms in a DataLoader with its default 0 workers."""
    import torch
    from datasets import load_dataset
    from torchvision import transforms

    from genlab.data.batches import BatchStream, make_order
    from genlab.data.imagefolder import ImageFolder

    def rate(batches_iter) -> float:
        next(batches_iter)  # workers started, first batch out
        t0 = time.perf_counter()
        for _ in range(batches):
            next(batches_iter)
        return batches * batch_size / (time.perf_counter() - t0)

    data = ImageFolder(folder, "train", image_size=16, val_fraction=0.1)
    genlab_rate = rate(BatchStream(data, make_order(data, batch_size, 0), num_workers=2, persistent_workers=True,
                                   prefetch_factor=2))
    augmentations = transforms.Compose([
        transforms.Resize(16, interpolation=transforms.InterpolationMode.BILINEAR), transforms.CenterCrop(16),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
    dataset = load_dataset("imagefolder", data_dir=folder, split="train")
    dataset.set_transform(lambda examples: {"input": [augmentations(im.convert("RGB")) for im in examples["image"]]})
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0)

    def endless():
        while True:
            yield from loader

    return {"imagefolder_2_workers_images_per_s": genlab_rate, "diffusers_0_workers_images_per_s": rate(endless())}


WORKLOAD = "DDPM, U-Net (32, 64, 64), 3 channels, 16 px, batch 64, EMA; digits as 1,797 PNGs of 32 px"


def workload(args) -> str:
    """WORKLOAD as this command changed it (extra Hydra overrides, e.g. a smaller U-Net)."""
    return WORKLOAD + (f"; with {' '.join(args.overrides)}" if args.overrides else "")


def workload_overrides(args, work: Path) -> tuple[str, list[str], list[str]]:
    """The PNG folder of WORKLOAD, genlab's overrides to train on it, and the overrides of the
    same model on the in-memory digits (the diffusers script reads only the model from them)."""
    folder = write_png_folder(work / "digits_png")
    common = [*THREE_CHANNEL_DIGITS, "trainer.sample_n=0", *args.overrides]
    on_folder = ["data=imagefolder", f"data.path={folder}", "data.val_fraction=0.1", f"data.cache_dir={work / 'lists'}",
                 *common]
    return str(folder), on_folder, ["data=digits", *common]


def throughput(args, work: Path) -> dict:
    folder, on_folder, in_memory = workload_overrides(args, work)
    paths = {
        "in_memory": ("genlab", in_memory),
        "imagefolder": ("genlab", on_folder),
        "diffusers_train_unconditional": ("diffusers", in_memory),
    }
    # The worker count matters on a small machine: each worker's decoding competes with torch's threads.
    for workers in args.folder_workers:
        paths[f"imagefolder_{workers}_workers"] = ("genlab", [*paths["imagefolder"][1], f"data.num_workers={workers}"])
    runs = {name: [] for name in paths}
    for _ in range(args.repeats):
        for name, (kind, overrides) in paths.items():
            call = (f"scripts.bench_data.measure_diffusers({folder!r}, {overrides!r}, {args.steps}, "
                    f"{args.warmup})" if kind == "diffusers" else
                    f"scripts.bench_loop.measure_genlab('ddpm', {overrides!r}, {args.steps}, {args.warmup})")
            runs[name].append(bench_loop.run_in_subprocess(call))
            print(f"  {name}: {runs[name][-1].get('images_per_s', runs[name][-1])}", flush=True)
    best = {k: max(v, key=lambda r: r.get("images_per_s", 0)) for k, v in runs.items()}
    ips = {k: v["images_per_s"] for k, v in best.items()}
    loader = bench_loop.run_in_subprocess(f"scripts.bench_data.loader_only({folder!r})")
    return {"workload": workload(args),
            "folder": folder, "loader_only": loader, "paths": {k: {"overrides": v[1]} for k, v in paths.items()}, "best": best,
            "folder_vs_in_memory": ips["imagefolder"] / ips["in_memory"],
            "folder_vs_diffusers": ips["imagefolder"] / ips["diffusers_train_unconditional"],
            "folder_workers_vs_diffusers": {k: v / ips["diffusers_train_unconditional"] for k, v in ips.items()
                                            if k.startswith("imagefolder_")}, "all_runs": runs}


def paired(args, work: Path) -> dict:
    """genlab's folder path against the script's, taking turns in one process (`--window` steps
    each): the script as it is, and the script given genlab's foreach AdamW and EMA updates."""
    folder, on_folder, in_memory = workload_overrides(args, work)
    runs = {"as_is": [], "same_updates": []}
    for _ in range(args.repeats):
        for variant in runs:
            runs[variant].append(bench_loop.run_in_subprocess(
                f"scripts.bench_data.measure_paired_with_diffusers({folder!r}, {on_folder!r}, {in_memory!r}, "
                f"{args.steps}, {args.warmup}, {args.window}, {variant == 'same_updates'})"))
            print(f"  {variant}: ratio {runs[variant][-1].get('ratio', runs[variant][-1])}", flush=True)
    result = {"workload": workload(args), "genlab": "data=imagefolder, its default workers",
              "other": "diffusers train_unconditional.py's data path and step (DiffusersScript), 0 workers",
              "window": args.window}
    for variant, variant_runs in runs.items():
        ratio, quartiles, ratios = bench_loop.pooled(variant_runs)
        result[variant] = {"ratio_genlab_over_script": ratio, "window_ratio_quartiles": quartiles,
                           "interval_95": bench_loop.interval_95(ratios) if len(ratios) > 1 else None,
                           "windows_faster": sum(r > 1 for r in ratios), "windows": len(ratios), "runs": variant_runs}
    result["as_is"]["script"] = "AdamW and EMAModel at their defaults, as the script leaves them (per-tensor on a CPU)"
    result["same_updates"]["script"] = "given genlab's foreach AdamW and EMA updates: the runner and data path alone"
    return result


def write_tiny_pngs(folder: Path, n: int) -> Path:
    """`n` 8 px PNGs in folders of 1,000, once."""
    import numpy as np
    from PIL import Image

    if (folder / "COMPLETE").exists() and (folder / "COMPLETE").read_text() == str(n):
        return folder
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = folder / f"{i // 1000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(sub / f"{i:06d}.png")
    (folder / "COMPLETE").write_text(str(n))
    return folder


def seconds(command: list[str], env: dict | None = None) -> tuple[float, int]:
    t0 = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})})
    return time.perf_counter() - t0, result.returncode


def startup(args, work: Path) -> dict:
    folder = write_tiny_pngs(work / "pngs_100k", args.files)
    cache = tempfile.mkdtemp(prefix="genlab-bench-cache-")
    tiny = ["data=imagefolder", f"data.path={folder}", "data.image_size=8", "data.num_workers=0",
            "model.unet.block_out_channels=[16,16]", "model.unet.down_block_types=[DownBlock2D,DownBlock2D]",
            "model.unet.up_block_types=[UpBlock2D,UpBlock2D]", "model.unet.norm_num_groups=4",
            "model.unet.attention_head_dim=8", "trainer.batch_size=16", "trainer.sample_n=0"]
    os.environ["GENLAB_CACHE"] = cache  # time_to_first_step's process inherits it: an empty file-list cache
    first = bench_loop.time_to_first_step("ddpm", tiny)
    second = bench_loop.time_to_first_step("ddpm", tiny)
    gan = [*tiny[:4], "trainer.batch_size=16", "trainer.sample_n=0"]  # the same folder, a default-size GAN
    gan_starts = [bench_loop.time_to_first_step("gan", gan) for _ in range(2)]
    # What any start costs before genlab's own work: the interpreter, torch, torch's first optimizer
    # step (it imports torch._dynamo), and diffusers' import (it imports torch._dynamo, peft, transformers).
    floor_code = {"python": "pass", "import torch": "import torch",
                  "torch + one Adam step": "import torch; m = torch.nn.Linear(4, 4); o = torch.optim.Adam("
                                           "m.parameters()); m(torch.randn(2, 4)).sum().backward(); o.step()",
                  "import diffusers' UNet2DModel": "from diffusers import UNet2DModel"}
    floor = {name: min(seconds([sys.executable, "-c", code])[0] for _ in range(2)) for name, code in floor_code.items()}
    code = (f"import time, sys; t0 = time.perf_counter(); from genlab.data.imagefolder import ImageFolder; "
            f"t1 = time.perf_counter(); d = ImageFolder({str(folder)!r}, 'train', image_size=8); "
            f"print(time.perf_counter() - t1, t1 - t0, len(d))")
    fresh = tempfile.mkdtemp(prefix="genlab-bench-cache-")
    construct = []
    for _ in range(2):  # cold, then warm
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, "GENLAB_CACHE": fresh}).stdout.split()
        construct.append({"dataset_s": float(out[0]), "import_s": float(out[1]), "items": int(out[2])})
    genlab = str(Path(sys.executable).parent / "genlab")
    latency = {" ".join(c): seconds([genlab, *c]) for c in (
        ["--help"], ["train", "--help"], ["data", "pack", "--help"], ["train", "trainer.max_stepz=3"],
        ["train", "model=ddpn"], ["data", "pack"], ["data", "pack", "/no/such/folder", str(work / "x")])}
    return {"files": args.files, "folder": str(folder),
            "command": f"genlab train model=ddpm {' '.join(tiny)} trainer.max_steps=2 (tiny U-Net, 8 px)",
            "first_start_to_first_step_s": first, "second_start_to_first_step_s": second,
            "gan": {"command": f"genlab train model=gan {' '.join(gan)} trainer.max_steps=2",
                    "starts_to_first_step_s": gan_starts, "note": "file list already cached by the DDPM starts"},
            "floor_best_of_2_s": floor,
            "dataset_construction": {"cold": construct[0], "warm": construct[1]},
            "cli_latency_s": {k: {"seconds": s, "exit_code": rc} for k, (s, rc) in latency.items()}}


def tiny_chain(work: Path) -> Path:
    """An untrained SD base from the circles recipes (2 steps each): the recipe's sizes, for speed only."""
    genlab = str(Path(sys.executable).parent / "genlab")
    vae, sd = work / "chain_vae", work / "chain_sd"
    quick = ["trainer.max_steps=2", "trainer.sample_every=0", "trainer.checkpoint_every=0", "trainer.eval_every=0",
             "logger=none", "trainer.sample_n=0"]
    if not (vae / "export").is_dir():
        subprocess.run([genlab, "train", "experiment=circles_vae", *quick, f"hydra.run.dir={vae}"], check=True,
                       capture_output=True)
    if not (sd / "export").is_dir():
        subprocess.run([genlab, "train", "experiment=circles_sd", f"model.vae={vae}", *quick,
                        f"hydra.run.dir={sd}"], check=True, capture_output=True)
    return sd


def build_cache(base: str, cache_dir: str, batch_size: int = 32) -> dict:
    """Seconds to encode every train item of fill_circles (the recipe's data) into the cache."""
    import torch

    from genlab.data import build_dataset, collate_items
    from genlab.data.latent_cache import cached_or_encoded_text, cached_posteriors
    from genlab.families.sd import load_parts

    cfg = bench_loop.compose_config("controlnet", ["experiment=controlnet_circles", f"model.base={base}"])
    data = build_dataset(cfg.data, "train")
    vae, text_encoder, tokenizer, _ = load_parts(base, None, cfg.data.image_size, {}, {}, None)
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            batch = collate_items(data, list(range(start, min(start + batch_size, len(data)))))
            cached_posteriors(vae, batch["image"], cache_dir)
            cached_or_encoded_text({"latent_cache": cache_dir}, batch["caption"] + [""], tokenizer, text_encoder)
    return {"items": len(data), "seconds": time.perf_counter() - t0}


def latent_cache(args, work: Path) -> dict:
    base = tiny_chain(work)
    cache_dir = tempfile.mkdtemp(prefix="genlab-latents-")
    build = bench_loop.run_in_subprocess(f"scripts.bench_data.build_cache({str(base)!r}, {cache_dir!r})")
    common = ["experiment=controlnet_circles", f"model.base={base}", "trainer.eval_every=0", "trainer.sample_n=0",
              *args.overrides]
    variants = {"encode_every_batch": common,
                "cached": [*common, "data.cache_latents=true", f"data.latent_cache_dir={cache_dir}"]}
    runs = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, overrides in variants.items():
            runs[name].append(bench_loop.in_subprocess("genlab", "controlnet", overrides, args.cache_steps, args.warmup))
            print(f"  {name}: {runs[name][-1].get('images_per_s')}", flush=True)
    best = {k: max(v, key=lambda r: r.get("images_per_s", 0)) for k, v in runs.items()}
    steps_per_s = {k: v["images_per_s"] / 32 for k, v in best.items()}  # the recipe's batch: 32
    return {"workload": "experiment=controlnet_circles (32 px, batch 32, LoRA rank 4) on an untrained tiny SD base",
            "build_cache": build, "steps_per_s": steps_per_s,
            "speedup": steps_per_s["cached"] / steps_per_s["encode_every_batch"], "best": best, "all_runs": runs}


def main(args) -> None:
    import torch

    import genlab

    work = Path(args.work).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    out = args.out or bench_loop.default_out(bench_loop.machine_name())
    report = json.loads(out.read_text()) if out.exists() else {
        "machine": bench_loop.machine_name(), "python": sys.version.split()[0], "torch": torch.__version__,
        "genlab": genlab.__version__}
    section = report.setdefault("data", {})
    for part in args.data or PARTS:
        load = os.getloadavg()
        print(f"{part} (load average {load[0]:.1f})", flush=True)
        result = {"throughput": throughput, "paired": paired, "startup": startup, "cache": latent_cache}[part](args, work)
        result.update(command=" ".join(["python", *sys.argv]), date=time.strftime("%Y-%m-%d %H:%M"),
                      load_average_before=load, load_average_after=os.getloadavg(),
                      torch_threads=torch.get_num_threads(), machine=bench_loop.machine_name())
        section[part] = result
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        print(json.dumps({k: v for k, v in result.items() if k not in ("all_runs", "best")}, indent=1), flush=True)
    print(f"wrote {out} (data)")
