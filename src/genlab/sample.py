"""`genlab sample`: rebuild a family from a run directory and draw images."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from genlab.errors import ConfigError
from genlab.run_dir import RunDir, load_family, newest_finished_run

log = logging.getLogger(__name__)
#: Images drawn per call of family.sample: `--n 10000` runs in bounded memory.
CHUNK = 256
#: The most images one grid holds; more need --separate (one PNG each).
MAX_GRID = 1024


def check_request(run_dir: Path | None, n: int, separate: bool) -> RunDir | None:
    """What can be refused before torch is imported (an answer in well under a second)."""
    if n > MAX_GRID and not separate:
        raise ConfigError(f"--n {n} images do not fit one grid (at most {MAX_GRID}); add --separate to write "
                          f"one PNG per image (the grid then shows the first {MAX_GRID}).")
    return RunDir(run_dir).require() if run_dir is not None else None


def sample_command(run_dir: Path | None, n: int, seed: int, out: Path | None, checkpoint: str, use_ema: bool,
                   separate: bool, sketch: Path | None, edges_from: Path | None, options: dict[str, Any],
                   allow: tuple[str, ...] = (), trust_run: bool = False, ema_length: float | None = None) -> Path:
    """Everything `genlab sample` does; returns the grid's path.

    Images are drawn in chunks of CHUNK; chunk c uses seed + c * CHUNK, so the first CHUNK
    images of a larger --n are those of a smaller one.
    """
    import torch

    from genlab.data.images import load_image
    from genlab.train.sampling import save_grid

    check_request(run_dir, n, separate)
    if out is not None and Path(out).is_dir():
        raise ConfigError(f"--out {out} is a folder; give the PNG file to write, e.g. --out {Path(out) / 'samples.png'}.")
    if out is not None and Path(out).suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise ConfigError(f"--out {out} is not an image file name; end it with .png (or .jpg, .webp).")
    if run_dir is None:
        from genlab.runs import runs_root

        run = newest_finished_run(runs_root())
        print(f"no RUN_DIR given: using the newest finished run, {run.path}")
    else:
        run = RunDir(run_dir)
    family, cfg = load_family(run, checkpoint, use_ema, allow=allow, trust_run=trust_run, ema_length=ema_length)
    if sketch is not None:
        options["sketch"] = load_image(sketch, cfg.data.image_size)
    if edges_from is not None:
        from genlab.data.sketches import edges_of_image

        options["sketch"] = edges_of_image(load_image(edges_from, cfg.data.image_size))
    if options.get("reconstruct"):
        from genlab.data import build_dataset

        val = build_dataset(cfg.data, "val")
        items = [val[i] for i in range(min(n, len(val)))]
        options["images"] = torch.stack([item["image"] for item in items])
        if "label" in items[0] and family.num_classes:  # a conditional model reconstructs each image with its own label
            options["labels"] = torch.tensor([int(item["label"]) for item in items])
    out = Path(out) if out else run.samples / f"sample_seed{seed}.png"
    # Reconstructions and interpolations are one small set each: no chunks.
    chunk = n if options.get("reconstruct") or options.get("interpolate") else CHUNK
    grid = []
    for start in range(0, n, chunk):
        images = family.sample(min(chunk, n - start), seed=seed + start, **options).cpu()
        if len(grid) * chunk < MAX_GRID:
            grid.append(images)
        if separate:
            for i, image in enumerate(images):
                save_grid(image[None], out.with_name(f"{out.stem}_{start + i:03d}.png"))
    # Interpolations come as rows of `steps` images; other grids are about square.
    nrow = options.get("steps") if options.get("interpolate") else None
    save_grid(torch.cat(grid)[:MAX_GRID], out, nrow=nrow)
    print(f"wrote {out}")
    return out
