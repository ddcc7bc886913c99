"""A blind look: does a class-conditional model's sample look like its digit as often as a real one does?

`make` draws a grid whose column j holds class j: half real held-out images (the val split),
half the run's samples of that class, shuffled per column. The key (which cell is real) goes to
key.json; do not open it before judging. Look at blind.png, list the cells that do not read as
their column's digit (and, if you like, the cells you think are generated), then `score`
unseals the key, compares the two halves and writes revealed.png (generated cells framed in red).

    python -m scripts.blind_look make RUN_DIR --out blind/ --seed 0
    python -m scripts.blind_look score blind/ --doubtful 2,1 6,9 --generated 0,3 4,4

Cells are row,col from 0 at the top left, as numbered on the grid's margins. Give every grid you
judge a seed of its own: a seed puts the same real images in the same cells whatever the run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CELL = 16 * 4  # each 16 px image drawn 4x (nearest), so a stroke's shape is visible
MARGIN = 14    # room for the row and column numbers


def make(run_dir: Path, out: Path, per_class: int, seed: int) -> None:
    import torch
    from PIL import Image, ImageDraw

    from genlab.data import build_dataset
    from genlab.run_dir import RunDir, load_family

    family, cfg = load_family(RunDir(run_dir))
    classes = int(cfg.data.num_classes)
    val = build_dataset(cfg.data, "val")
    real_by_class: dict[int, list[torch.Tensor]] = {k: [] for k in range(classes)}
    for i in range(len(val)):
        item = val[i]
        real_by_class[int(item["label"])].append(item["image"])
    rng = torch.Generator().manual_seed(seed)
    n_real = per_class // 2
    cells, key = {}, {}
    for k in range(classes):
        pool = real_by_class[k]
        real = [pool[int(i)] for i in torch.randperm(len(pool), generator=rng)[:n_real]]
        fake = list(family.sample(per_class - n_real, seed=seed * 1000 + k * 100, class_label=k).cpu())
        column = [(img, True) for img in real] + [(img, False) for img in fake]
        for row, j in enumerate(torch.randperm(len(column), generator=rng).tolist()):
            cells[(row, k)] = column[j][0]
            key[f"{row},{k}"] = "real" if column[j][1] else "generated"
    side = MARGIN + classes * CELL
    canvas = Image.new("L", (side, MARGIN + per_class * CELL), 40)
    draw = ImageDraw.Draw(canvas)
    for (row, col), img in cells.items():
        pixels = ((img[0].clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
        tile = Image.fromarray(pixels).resize((CELL - 2, CELL - 2), Image.NEAREST)
        canvas.paste(tile, (MARGIN + col * CELL + 1, MARGIN + row * CELL + 1))
    for i in range(max(classes, per_class)):
        if i < classes:
            draw.text((MARGIN + i * CELL + CELL // 2 - 3, 1), str(i), fill=255)
        if i < per_class:
            draw.text((2, MARGIN + i * CELL + CELL // 2 - 5), str(i), fill=255)
    out.mkdir(parents=True, exist_ok=True)
    canvas.save(out / "blind.png")
    (out / "key.json").write_text(json.dumps({"run": str(run_dir), "seed": seed, "per_class": per_class,
                                              "cells": key}, indent=1))
    print(f"wrote {out / 'blind.png'} (key in {out / 'key.json'}: judge before opening it)")


def score(out: Path, doubtful: list[str], generated: list[str]) -> dict:
    key = json.loads((out / "key.json").read_text())
    cells = key["cells"]
    unknown = [c for c in doubtful + generated if c not in cells]
    if unknown:
        raise SystemExit(f"cells {unknown} are not on the grid (row,col from 0, e.g. 3,7)")
    result = {}
    for kind in ("real", "generated"):
        names = [c for c, k in cells.items() if k == kind]
        flagged = sorted(c for c in doubtful if cells[c] == kind)
        result[kind] = {"cells": len(names), "doubtful": len(flagged), "doubtful_cells": flagged,
                        "doubtful_rate": len(flagged) / len(names)}
    if generated:
        hits = sum(cells[c] == "generated" for c in generated)
        result["guessed_generated"] = {"guesses": len(generated), "correct": hits,
                                       "chance": sum(k == "generated" for k in cells.values()) / len(cells)}
    result["run"], result["seed"] = key["run"], key["seed"]
    result["judged"] = {"doubtful": doubtful, "generated": generated}
    (out / "score.json").write_text(json.dumps(result, indent=1))
    reveal(out, cells)
    print(json.dumps(result, indent=1))
    return result


def reveal(out: Path, cells: dict[str, str]) -> None:
    """revealed.png: blind.png with a red frame round every generated cell."""
    from PIL import Image, ImageDraw

    image = Image.open(out / "blind.png").convert("RGB")
    draw = ImageDraw.Draw(image)
    for name, kind in cells.items():
        if kind == "generated":
            row, col = map(int, name.split(","))
            left, top = MARGIN + col * CELL, MARGIN + row * CELL
            draw.rectangle((left, top, left + CELL - 1, top + CELL - 1), outline=(255, 40, 40), width=2)
    image.save(out / "revealed.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    mk = sub.add_parser("make", help="write blind.png and its sealed key")
    mk.add_argument("run_dir", type=Path)
    mk.add_argument("--out", type=Path, required=True)
    mk.add_argument("--per-class", type=int, default=10, help="cells per column, half real")
    mk.add_argument("--seed", type=int, default=0)
    sc = sub.add_parser("score", help="unseal the key and compare real and generated cells")
    sc.add_argument("out", type=Path)
    sc.add_argument("--doubtful", nargs="*", default=[], help="cells that do not read as their column's digit")
    sc.add_argument("--generated", nargs="*", default=[], help="cells you think are generated")
    args = parser.parse_args()
    if args.command == "make":
        make(args.run_dir, args.out, args.per_class, args.seed)
    else:
        score(args.out, args.doubtful, args.generated)


if __name__ == "__main__":
    main()
