"""What puts bright blocks and broken strokes into gan_digits' samples? Train each suspect away, measure.

Each ablation is `genlab train experiment=gan_digits <overrides>` for the same number of steps,
evaluated like `genlab eval RUN` (1,000 samples, EMA weights: both digits classifiers, their
agreement and OOD rejections, border artifacts, recall; truncation variants). Writes
OUT_DIR/gan_ablation.json (each entry: its command, steps, train time and metrics) and copies each
run's final fixed-noise grid (column j = digit j) to DOCS_DIR/gan_ablation_<name>.png.

    python -m scripts.gan_ablation                        # every ablation, 2,000 steps each
    python -m scripts.gan_ablation --names base,ms_cap    # some of them
    python -m scripts.gan_ablation --runs-dir runs/abl    # evaluate finished runs there whose
                                                          # .hydra/overrides.yaml match, train the rest
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import yaml

from genlab.config import hydra_args
from scripts.quality import COMMON, ROOT, compose, environment, evaluate, run_training_logged

log = logging.getLogger("gan_ablation")

#: name -> (what it tests, overrides on top of experiment=gan_digits). The first two undo this
#: issue's fixes: translation padded with zeros (DiffAugment's grey) and MSGAN's unbounded term.
ABLATIONS = {
    "base": ("the recipe before issue 19: zero padding, unbounded mode seeking",
             ["model.diffaug_padding=zeros", "model.mode_seeking_cap=false"]),
    "no_augment": ("no DiffAugment at all", ["model.diffaug=[]", "model.mode_seeking_cap=false"]),
    "reflection": ("translation padded by reflection", ["model.diffaug_padding=reflection",
                                                        "model.mode_seeking_cap=false"]),
    "nearest_up": ("nearest upsampling + 3x3 conv instead of transposed convs",
                   ["model.diffaug_padding=zeros", "model.mode_seeking_cap=false", "model.g_upsample=nearest"]),
    "no_mode_seeking": ("mode-seeking term off", ["model.diffaug_padding=zeros", "model.mode_seeking=0"]),
    "ms_cap": ("mode seeking capped at the data's same-class spread", ["model.diffaug_padding=zeros"]),
    "ms_cap_reflection": ("both fixes (the new defaults)", ["model.diffaug_padding=reflection"]),
}


def adoptable(run_dir: Path, overrides: list[str]) -> bool:
    """A finished run in `run_dir` trained with exactly `overrides` (order aside)."""
    status, saved = run_dir / "status.json", run_dir / ".hydra" / "overrides.yaml"
    if not (status.exists() and saved.exists()) or json.loads(status.read_text())["status"] != "finished":
        return False
    return sorted(hydra_args(yaml.safe_load(saved.read_text()))) == sorted(hydra_args(overrides))


def run_one(name: str, overrides: list[str], run_dir: Path) -> dict:
    """Train (unless an adoptable run is there) and evaluate one ablation."""
    info: dict = {"overrides": overrides, "command": "genlab train " + " ".join(overrides), "run_dir": str(run_dir)}
    if adoptable(run_dir, overrides):
        log.info("%s: evaluating the finished run %s", name, run_dir)
        info["adopted"] = True
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
        start = time.perf_counter()
        run_training_logged(compose(overrides), overrides, run_dir)
        info["train_seconds"] = time.perf_counter() - start
    info["steps"] = json.loads((run_dir / "status.json").read_text()).get("step")
    info.update(evaluate(run_dir, None, {}, None, None))
    return info


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--names", default=",".join(ABLATIONS), help="comma-separated ablation names")
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps per run (the artifacts show by 1,000)")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "benchmarks" / "quality_runs" / "gan_ablation")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks")
    parser.add_argument("--docs-dir", type=Path, default=ROOT / "docs")
    args = parser.parse_args(argv)
    args.smoke = False  # (environment() records it)
    out = args.out_dir / "gan_ablation.json"
    for name in [n for n in args.names.split(",") if n]:
        what, extra = ABLATIONS[name]
        overrides = [*COMMON, "experiment=gan_digits", *extra, f"trainer.max_steps={args.steps}"]
        entry = {"what": what, **run_one(name, overrides, args.runs_dir / name), **environment(args)}
        grid = Path(entry["run_dir"]) / "samples" / "final.png"
        if grid.exists():
            args.docs_dir.mkdir(parents=True, exist_ok=True)
            entry["grid"] = str(shutil.copyfile(grid, args.docs_dir / f"gan_ablation_{name}.png"))
        # Read again just before writing: two processes may run different ablations side by side.
        entries = json.loads(out.read_text())["ablations"] if out.exists() else {}
        out.write_text(json.dumps({"ablations": {**entries, name: entry}}, indent=2))
        m = entry["metrics"]
        print(f"{name}: border_artifacts {m['border_artifacts']:.3f}, confidence cnn/mlp "
              f"{m['class_confidence_digits_cnn']:.3f}/{m['class_confidence_digits_mlp']:.3f}, rejected cnn/mlp "
              f"{m['rejected_digits_cnn']:.3f}/{m['rejected_digits_mlp']:.3f}, recall {m['recall_digits_cnn']:.3f}",
              flush=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
