"""`genlab sample`: rebuild a family from a run directory and draw images."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from diffusers.training_utils import EMAModel
from hydra.utils import instantiate

from genlab.errors import GenlabError
from genlab.train import checkpoint as ckpt
from genlab.train.loop import load_run_config
from genlab.train.sampling import save_grid

log = logging.getLogger(__name__)


def newest_finished_run(root: Path) -> Path:
    """The most recently finished run under `root` (by status.json time)."""
    finished = []
    for status in Path(root).rglob("status.json"):
        info = json.loads(status.read_text())
        if info.get("status") == "finished":
            finished.append((info.get("time", 0), status.parent))
    if not finished:
        raise GenlabError(f"no finished run under {root}/; pass a run directory (see `genlab runs`).")
    return max(finished)[1]


def load_family(run_dir: Path, checkpoint: str = "latest", use_ema: bool = True, device: str | None = None):
    """(family, cfg) with the weights of `checkpoint` (EMA ones when asked and present).

    Raises:
        GenlabError: when `run_dir` is not a run or has no complete checkpoint.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise GenlabError(f"{run_dir} does not exist; pass a run directory (see `genlab runs`).")
    cfg = load_run_config(run_dir)
    try:
        path = ckpt.find_checkpoint(run_dir, checkpoint)
    except ValueError as error:
        raise GenlabError(str(error)) from None
    if path is None:
        raise GenlabError(f"{run_dir} has no complete checkpoint '{checkpoint}' (it may still be starting, or "
                          "have failed before the first save); see `genlab runs`.")
    try:
        family = instantiate(cfg.model, _convert_="all")
    except Exception as error:  # Hydra wraps the family's own GenlabError
        if isinstance(error.__cause__, GenlabError):
            raise error.__cause__ from None
        raise
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    networks = family.networks()
    ckpt.load_networks(path, networks)
    ema_file = path / "ema.pt"
    if use_ema and family.ema_network and ema_file.exists():
        target = networks[family.ema_network]
        ema = EMAModel(target.parameters())
        ema.load_state_dict(torch.load(ema_file, map_location="cpu", weights_only=False))
        ema.copy_to(target.parameters())
    family.to(device)
    for network in networks.values():
        network.eval()
    log.info("loaded %s%s", path, " (EMA weights)" if use_ema and ema_file.exists() else "")
    return family, cfg


def _load_image(path: Path, size: int) -> torch.Tensor:
    """An RGB image as (3, size, size) in [0, 1]."""
    from PIL import Image, ImageOps

    if not Path(path).exists():
        raise GenlabError(f"{path} does not exist")
    with Image.open(path) as image:
        image = ImageOps.fit(image.convert("RGB"), (size, size))
    return torch.from_numpy(__import__("numpy").asarray(image, dtype="float32") / 255.0).permute(2, 0, 1)


def sample_command(run_dir: Path | None, n: int, seed: int, out: Path | None, checkpoint: str, use_ema: bool,
                   separate: bool, sketch: Path | None, edges_from: Path | None, options: dict[str, Any]) -> Path:
    """Everything `genlab sample` does; returns the grid's path."""
    if run_dir is None:
        from genlab.runs import runs_root

        run_dir = newest_finished_run(runs_root())
        print(f"no RUN_DIR given: using the newest finished run, {run_dir}")
    family, cfg = load_family(run_dir, checkpoint, use_ema)
    if sketch is not None:
        options["sketch"] = _load_image(sketch, cfg.data.image_size)
    if edges_from is not None:
        from genlab.data.sketches import edges_of_image

        options["sketch"] = edges_of_image(_load_image(edges_from, cfg.data.image_size))
    if options.get("reconstruct"):
        from genlab.data import build_dataset

        val = build_dataset(cfg.data, "val")
        items = [val[i] for i in range(min(n, len(val)))]
        options["images"] = torch.stack([item["image"] for item in items])
        if "label" in items[0] and getattr(family, "conditional", False):
            options["labels"] = torch.tensor([int(item["label"]) for item in items])
    images = family.sample(n, seed=seed, **options)
    out = Path(out) if out else Path(run_dir) / "samples" / f"sample_seed{seed}.png"
    # Interpolations come as rows of `steps` images; other grids are about square.
    nrow = options.get("steps") if options.get("interpolate") else None
    save_grid(images.cpu(), out, nrow=nrow)
    if separate:
        for i, image in enumerate(images.cpu()):
            save_grid(image[None], out.with_name(f"{out.stem}_{i:03d}.png"))
    print(f"wrote {out}")
    return out
