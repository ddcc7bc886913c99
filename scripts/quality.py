"""Do genlab's CPU recipes reach issue 5's quality targets? Train, evaluate, write it down.

For each recipe (configs/experiment/<name>.yaml): train it with the real loop into
RUNS_DIR/<name>, evaluate its final weights (EMA where the family keeps one) with
`genlab.eval.evaluate.Evaluator`, check the targets, and write OUT_DIR/quality.json plus
the run's final sample grid as OUT_DIR/quality_<name>.png (with an ablation, the same grid
drawn without the ablated part as quality_<name>_<ablation>.png). DDPM also compares samplers
(quality and time per image) -> OUT_DIR/ddpm_samplers.png. A recipe whose YAML or family
does not exist yet is skipped with a message. quality.json keeps the entries of recipes
not run this time, each with the command, machine and date that produced it.

    python -m scripts.quality                                   # every recipe (make quality)
    python -m scripts.quality --recipes ddpm_digits --budget-minutes 12
    python -m scripts.quality --smoke --out-dir /tmp/q          # tiny models, seconds (tests)
    python -m scripts.quality --recipes vae_digits --reuse      # evaluate finished runs again

--budget-minutes caps each training run: a short probe measures optimizer steps per second
and `trainer.max_steps` is lowered to what fits (the JSON says so: planned vs. done steps).
"""

from __future__ import annotations

import argparse
import json
import logging
import operator
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from hydra import compose as hydra_compose, initialize_config_dir
from hydra.utils import get_object
from omegaconf import DictConfig

from scripts.bench_loop import machine_name
from genlab.config import config_dir, hydra_args
from genlab.eval.evaluate import Evaluator
from genlab.eval.features import CLASSIFIERS
from genlab.eval.plots import plot_quality_vs_steps
from genlab.run_dir import RunDir, load_family
from genlab.train.job import run_training, summary_losses
from genlab.train.sampling import save_grid

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("quality")


@dataclass
class Target:
    """`metric op threshold`, e.g. class_kl <= 0.05; with `relative_to`, threshold is added to that metric
    (times `times`: fid <= 0.5 x the teacher's fid)."""

    metric: str
    op: str                  # ">=" | "<="
    threshold: float
    relative_to: str | None = None
    times: float = 1.0

    def check(self, metrics: dict[str, float]) -> dict[str, Any]:
        value = metrics.get(self.metric)
        bound = self.threshold + (self.times * metrics.get(self.relative_to, float("nan")) if self.relative_to else 0.0)
        met = value is not None and {">=": operator.ge, "<=": operator.le}[self.op](value, bound)
        scaled = f"{self.times:g} x {self.relative_to}" if self.times != 1 else self.relative_to
        rule = f"{self.metric} {self.op} " + (f"{scaled} {self.threshold:+g}" if self.relative_to
                                              else f"{self.threshold:g}")
        return {"rule": rule, "value": value, "bound": bound, "met": bool(met)}


def digits_targets(max_kl: float) -> list[Target]:
    """Issue 5's Stacked-MNIST-style targets for a digits model, on every digits classifier.

    Each classifier (a CNN and an 8x8 MLP, trained independently) must agree: a model that
    fools one of them but not the other misses the target.
    """
    return [target for c in CLASSIFIERS for target in
            (Target(f"classes_covered_{c}", ">=", 10), Target(f"class_kl_{c}", "<=", max_kl),
             Target(f"class_confidence_{c}", ">=", 0.9))]


def gan_targets() -> list[Target]:
    """Issue 19's targets for a digits GAN: the digits targets, variety, and samples a person would accept.

    recall >= 0.7 on both extractors (no variety bought with collapse); border artifacts
    (bright strips at an edge, brighter than 99.5% of real digits have there) in at most 5% of
    samples (real val digits: 1.7%); each classifier's OOD test rejects at most 15% (real val
    digits: 5% by construction).
    """
    return [*digits_targets(0.05), *(Target(f"recall_{c}", ">=", 0.7) for c in CLASSIFIERS),
            Target("border_artifacts", "<=", 0.05), *(Target(f"rejected_{c}", "<=", 0.15) for c in CLASSIFIERS)]


def check_targets(targets: list[Target], metrics: dict[str, float]) -> tuple[list[dict[str, Any]], bool]:
    """Each target's verdict on `metrics`, and whether all are met (a missing metric is not met)."""
    verdicts = [t.check(metrics) for t in targets]
    return verdicts, all(v["met"] for v in verdicts)


@dataclass
class Recipe:
    """How to measure one experiment config.

    variants: extra runs of the same recipe ({name: overrides}); their metrics join the
        recipe's as `<metric>@<variant>` (e.g. the VAE trained with one class held out).
    ablations: extra evaluations of the main run ({name: sample options}); metrics as
        `<metric>@<ablation>` (e.g. ControlNet with control_scale=0).
    stages: runs trained first ({name: overrides}); "{stage}" in later overrides becomes
        that run's directory (the ControlNet's VAE -> SD base chain).
    """

    targets: list[Target]
    overrides: list[str] = field(default_factory=list)
    variants: dict[str, list[str]] = field(default_factory=dict)
    ablations: dict[str, dict[str, Any]] = field(default_factory=dict)
    stages: dict[str, list[str]] = field(default_factory=dict)
    #: a stage whose training time the main run must beat: both join the metrics as train_seconds
    #: and train_seconds@<stage> (a distilled student against its teacher).
    faster_than: str | None = None
    #: stages evaluated too ({stage: ablations}), their metrics joining as `<metric>@<stage>` (a teacher
    #: at the student's few steps: what the distillation has to beat).
    stage_evals: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    smoke: list[str] = field(default_factory=list)  # extra overrides that make the model tiny under --smoke


TINY_UNET = ["data.image_size=8", "model.unet.block_out_channels=[16,16]",
             "model.unet.down_block_types=[DownBlock2D,AttnDownBlock2D]",
             "model.unet.up_block_types=[AttnUpBlock2D,UpBlock2D]", "model.unet.attention_head_dim=8",
             "model.unet.norm_num_groups=4", "model.sample_steps=4"]
TINY_DIT = ["data.image_size=8", "model.dit.num_layers=1", "model.dit.num_attention_heads=2",
            "model.dit.attention_head_dim=8", "model.sample_steps=4"]
# A ControlNet on fill_circles follows the sketch, and the sketch is what does it: not the base alone,
# nor the base with the run's LoRA (base_alone: the base as trained, no ControlNet, no LoRA; no_control:
# base + this run's LoRA).
CIRCLES_TARGETS = [Target("disc_iou", ">=", 0.8), Target("disc_iou@base_alone", "<=", -0.1, relative_to="disc_iou"),
                   Target("disc_iou@no_control", "<=", -0.1, relative_to="disc_iou")]
CIRCLES_ABLATIONS = {"base_alone": {"control_scale": 0.0, "own_lora": 0.0}, "no_control": {"control_scale": 0.0}}
# A distilled student at 1 and 2 Euler steps (ablations: the same weights sampled with fewer steps) must
# meet what its teacher, flow_digits, meets at 8, in less training time than the teacher took. The
# teacher itself meets the class targets at 1 step too (a blurred digit is still read as its class), so
# the student's FID at 1 and 2 steps must also be at most half the teacher's at the same steps.
FEW_STEPS = {"steps1": {"steps": 1}, "steps2": {"steps": 2}}
DISTILL_TARGETS = [*(Target(f"{t.metric}@{name}", t.op, t.threshold) for name in FEW_STEPS for t in digits_targets(0.05)),
                   *(Target(f"fid_{c}@{name}", "<=", 0.0, relative_to=f"fid_{c}@{name}@teacher", times=0.5)
                     for name in FEW_STEPS for c in CLASSIFIERS),
                   Target("train_seconds", "<=", 0.0, relative_to="train_seconds@teacher")]
RECIPES = {
    "ddpm_digits": Recipe(digits_targets(0.05), smoke=TINY_UNET),
    # Rectified flow and DiT: ddpm_digits' targets, evaluated at their 8 Euler steps (model.sample_steps).
    "flow_digits": Recipe(digits_targets(0.05), smoke=TINY_UNET),
    "dit_digits": Recipe(digits_targets(0.05), smoke=TINY_DIT),
    # REPA on dit_digits: the same targets in half the optimizer steps (the issue-32 target).
    "dit_digits_repa": Recipe(digits_targets(0.05), smoke=[*TINY_DIT, "model.repa.layer=1"]),
    "vae_digits": Recipe(digits_targets(0.05) + [Target("anomaly_auroc@holdout", ">=", 0.9)],
                         # Anomaly detection has no label to give: the plain VAE, one class held out.
                         variants={"holdout": ["data.exclude_classes=[0]", "model.conditional=false"]}),
    # The truncation trick's trade-off (variety for cleaner digits) comes with every GAN evaluation
    # (GAN.eval_variants: <metric>@truncation_1, @truncation_0.5).
    "gan_digits": Recipe(gan_targets()),
    "gan_digits_r3gan": Recipe(gan_targets()),
    "controlnet_circles": Recipe(
        CIRCLES_TARGETS, overrides=["model.base={sd}"], ablations=CIRCLES_ABLATIONS,
        stages={"vae": ["experiment=circles_vae"], "sd": ["experiment=circles_sd", "model.vae={vae}"]}),
    # The same chain and measures on the flow-matching transformer base (SD3-style MMDiT, no T5).
    "controlnet_circles_sd3": Recipe(
        CIRCLES_TARGETS, overrides=["model.base={sd3}"], ablations=CIRCLES_ABLATIONS,
        stages={"vae": ["experiment=circles_vae"], "sd3": ["experiment=circles_sd3", "model.vae={vae}"]}),
    # Reflow (model=distill) of a flow_digits teacher trained (or, with --reuse, kept) first. Measured
    # 2026-12-07 (2 cores, 1 thread, beside other jobs; 1,000 samples): student 200 steps in 174 s (its
    # 2,048 couplings included) against the teacher's 500 steps in 296 s; at 1 Euler step 10/10 classes,
    # class KL 0.0009 / 0.0005, confidence 0.953 / 0.988 (CNN / MLP), FID 0.73 / 0.37 (teacher: 4.29 /
    # 2.16 at 1 step, 0.46 / 0.25 at its 8); 2 steps the same to 3 digits. All targets met.
    "flow_digits_distill": Recipe(DISTILL_TARGETS, overrides=["model.teacher={teacher}"], ablations=FEW_STEPS,
                                  stages={"teacher": ["experiment=flow_digits"]}, faster_than="teacher",
                                  stage_evals={"teacher": FEW_STEPS}),
}
#: Every run under --smoke: a few optimizer steps, no periodic grids or checkpoints.
SMOKE = ["trainer.max_steps=3", "trainer.batch_size=8", "trainer.log_every=1", "trainer.sample_every=0",
         "trainer.checkpoint_every=0", "trainer.sample_n=4", "trainer.eval_every=0"]
SMOKE_SAMPLERS = {"ddpm": (("ddpm", 10), ("ddim", 5), ("dpm", 5)), "flow": (("euler", 5), ("heun", 3))}
#: What every run of this script gets: no tracker, plain progress lines.
COMMON = ["logger=none", "trainer.progress=plain"]


def compose(overrides: list[str]):
    """train.yaml composed with `overrides`, as `genlab train` composes it (experiment=x works)."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=hydra_args(overrides))


def missing_reason(name: str) -> str | None:
    """Why recipe `name` cannot run yet (no YAML, a family that does not exist), or None."""
    if not (ROOT / "configs" / "experiment" / f"{name}.yaml").exists():
        return f"configs/experiment/{name}.yaml does not exist yet"
    stages = RECIPES.get(name, Recipe([])).stages.values()
    for overrides in [[f"experiment={name}"], *stages]:
        target = compose([o for o in overrides if "{" not in o]).model._target_
        try:
            get_object(target)  # a class, or a builder function (model=sd, model=distill)
        except Exception:  # noqa: BLE001 - Hydra wraps the ImportError in its own exception types
            return f"family {target} does not exist yet"
    return None


def steps_per_second(overrides: list[str], probe_steps: int = 10) -> float:
    """Optimizer steps per second of this config, measured after `probe_steps` warm-up steps."""
    probe = ["trainer.sample_every=0", "trainer.sample_n=0", "trainer.checkpoint_every=0", "trainer.eval_every=0",
             f"trainer.max_steps={2 * probe_steps}", f"trainer.log_every={probe_steps}"]
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = compose([*overrides, *probe])
        run_training(cfg, Path(run_dir))
        rows = RunDir(run_dir).read_metrics()
    images_per_step = cfg.trainer.batch_size * cfg.trainer.grad_accum
    return rows[-1]["images_per_s"] / images_per_step  # the second window: warm caches, no start-up


def run_training_logged(cfg: DictConfig, overrides: list[str], run_dir: Path) -> dict[str, Any]:
    """`run_training` into a directory that `genlab sample / eval / runs` accept, as `genlab train` leaves it."""
    RunDir(run_dir).write_config(cfg)
    RunDir(run_dir).write_overrides(overrides)
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(levelname)s] %(message)s", "%H:%M:%S"))
    logging.getLogger().addHandler(handler)
    try:
        return run_training(cfg, run_dir)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def train(overrides: list[str], run_dir: Path, budget_s: float | None, reuse: bool = False) -> dict[str, Any]:
    """Train `overrides` into `run_dir` (replaced if it exists), within `budget_s` seconds of steps.

    With `reuse`, a finished run of the same overrides there (its quality_train.json) is kept.
    """
    record = run_dir / "quality_train.json"
    if reuse and record.exists() and RunDir(run_dir).read_status()["status"] == "finished":
        info = json.loads(record.read_text())
        if info["overrides"][:len(overrides)] == overrides:  # (+ the max_steps a budget added)
            log.info("reusing the finished run %s", run_dir)
            # `genlab resume RUN trainer.max_steps=N` may have continued it since: say how far it went.
            last = max((row["step"] for row in RunDir(run_dir).read_metrics()), default=info["steps"])
            if last != info["steps"]:
                info.update(steps=last, resumed_from_steps=info["steps"],  # the resume was not timed here
                            train_seconds_covers=f"the first {info['steps']} steps only (then resumed outside this script)")
            return {**info, "reused": True}
    planned = compose(overrides).trainer.max_steps
    info: dict[str, Any] = {"run_dir": str(run_dir), "planned_max_steps": planned}
    if budget_s:
        rate = steps_per_second(overrides)
        fits = max(1, int(budget_s * rate))
        info.update(probe_steps_per_s=rate, budget_s=budget_s)
        if fits < planned:
            log.warning("%s: %d steps at %.2f steps/s do not fit %.0f s; training %d steps",
                        run_dir.name, planned, rate, budget_s, fits)
            overrides = [*overrides, f"trainer.max_steps={fits}"]
    cfg = compose(overrides)
    shutil.rmtree(run_dir, ignore_errors=True)
    log.info("training %s -> %s (%d steps)", " ".join(overrides), run_dir, cfg.trainer.max_steps)
    start = time.perf_counter()
    summary = run_training_logged(cfg, overrides, run_dir)
    info.update(overrides=overrides, steps=summary["step"], max_steps=cfg.trainer.max_steps,
                train_seconds=time.perf_counter() - start,
                final_losses=summary_losses(cfg, summary),
                images_per_s=summary.get("images_per_s"))
    record.write_text(json.dumps(info, indent=2))
    return info


@torch.no_grad()
def class_accuracy(family: Any, classifiers: dict[str, torch.nn.Module], seed: int,
                   per_class: int = 20) -> dict[str, float]:
    """Per classifier, the fraction of a class-conditional model's samples read as the class asked for.

    With labels cycled over the classes, class_kl and coverage say little about a conditional
    model; this says whether it draws the digit it was asked for.

    Returns:
        {"class_accuracy_<classifier>": fraction}.
    """
    images = [family.sample(per_class, seed + label, class_label=label).float().cpu()
              for label in range(family.num_classes)]
    labels = torch.arange(family.num_classes).repeat_interleave(per_class)
    return {f"class_accuracy_{name}": (torch.cat([model.logits((x + 1) / 2).argmax(1) for x in images]) == labels)
            .float().mean().item() for name, model in classifiers.items()}


def evaluate(run_dir: Path, n_samples: int | None, ablations: dict[str, dict[str, Any]],
             samplers: str | None, sampler_samples: int | None) -> dict[str, Any]:
    """Metrics of a run's final weights; `samplers` ("full" | "smoke") adds the sampler comparison (DDPM)."""
    family, cfg = load_family(run_dir, "latest", use_ema=True, device="cpu")
    start = time.perf_counter()
    evaluator = Evaluator(cfg, "cpu")
    out: dict[str, Any] = {"metrics": evaluator.evaluate(family, n_samples), "extractor": evaluator.extractor_name}
    for name, options in ablations.items():
        ablated = evaluator.evaluate(family, n_samples, **options)
        out["metrics"].update({f"{k}@{name}": v for k, v in ablated.items()})
        if hasattr(family, "sample_pairs"):  # the final grid's inputs and seed, drawn without the ablated part
            images = family.sample_pairs(cfg.trainer.sample_n, seed=cfg.trainer.seed, **options)
            out.setdefault("ablation_grids", {})[name] = str(save_grid(images, run_dir / "samples" / f"{name}.png"))
    # DDPM says `conditional`; the GAN and VAE set num_classes only when conditional.
    conditional = getattr(family, "conditional", bool(getattr(family, "num_classes", None)))
    if conditional and evaluator.classifiers:
        out["metrics"].update(class_accuracy(family, evaluator.classifiers, evaluator.settings.seed))
    out["eval_seconds"] = time.perf_counter() - start
    # The same metrics of real held-out images: what a perfect model would score (at this smaller n).
    val = torch.stack([evaluator.val[i]["image"] for i in range(len(evaluator.val))])
    out["data_val_metrics"] = {**evaluator.sample_metrics(val), "n": len(val)}
    if samplers:
        start = time.perf_counter()
        settings = SMOKE_SAMPLERS[family.diffusion.kind] if samplers == "smoke" else None  # None: the objective's
        out["samplers"] = evaluator.compare_samplers(family, settings, n_samples=sampler_samples)
        out["samplers_seconds"] = time.perf_counter() - start
        out["sampler_samples"] = sampler_samples or evaluator.settings.n_samples
    return out


def run_recipe(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train (stages, main run, variants), evaluate and check one recipe; returns its JSON entry."""
    recipe = RECIPES.get(name, Recipe([]))
    extra = [*COMMON, *(SMOKE + recipe.smoke if args.smoke else []), *args.overrides]
    budget_s = args.budget_minutes * 60 or None
    dirs = {stage: args.runs_dir / f"{name}_{stage}" for stage in recipe.stages}

    def filled(overrides: list[str]) -> list[str]:
        return [o.format(**{k: str(v) for k, v in dirs.items()}) for o in overrides]

    entry: dict[str, Any] = {"status": "done", "stages": {}, "variants": {}}
    for stage, overrides in recipe.stages.items():
        entry["stages"][stage] = train(filled([*overrides, *extra]), dirs[stage], budget_s, args.reuse)
    main = [f"experiment={name}", *filled(recipe.overrides), *extra]
    entry.update(train(main, args.runs_dir / name, budget_s, args.reuse))
    is_ddpm = compose(main).model._target_.endswith(".DDPM")
    samplers = ("smoke" if args.smoke else "full") if is_ddpm else None
    entry.update(evaluate(args.runs_dir / name, args.eval_samples, recipe.ablations, samplers, args.sampler_samples))
    for variant, overrides in recipe.variants.items():
        run_dir = args.runs_dir / f"{name}_{variant}"
        info = train([*main, *overrides], run_dir, budget_s, args.reuse)
        info.update(evaluate(run_dir, args.eval_samples, {}, None, None))
        entry["variants"][variant] = info
        entry["metrics"].update({f"{k}@{variant}": v for k, v in info["metrics"].items()})
    for stage, ablations in recipe.stage_evals.items():
        info = evaluate(dirs[stage], args.eval_samples, ablations, None, None)
        entry["stages"][stage]["metrics"] = info["metrics"]
        entry["metrics"].update({f"{k}@{stage}": v for k, v in info["metrics"].items()})
    if recipe.faster_than:
        entry["metrics"].update({"train_seconds": entry["train_seconds"],
                                 f"train_seconds@{recipe.faster_than}": entry["stages"][recipe.faster_than]["train_seconds"]})
    entry["targets"], entry["all_targets_met"] = check_targets(recipe.targets, entry["metrics"])
    entry["train_seconds_all_runs"] = sum(x["train_seconds"] for x in [entry, *entry["stages"].values(),
                                                                        *entry["variants"].values()])
    return entry


def environment(args: argparse.Namespace) -> dict[str, Any]:
    """What produced the numbers: machine, versions, command, threads, load."""
    versions = {"python": platform.python_version()}
    for package in ("genlab", "torch", "diffusers", "accelerate", "hydra-core", "torchmetrics"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    git = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True)
    return {"machine": machine_name(), "versions": versions, "git": git.stdout.strip() or None,
            "command": " ".join(["python", "-m", "scripts.quality", *sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch_threads": torch.get_num_threads(),
            "load_average_at_start": os.getloadavg()[0], "smoke": args.smoke}


def save_outputs(name: str, entry: dict[str, Any], out_dir: Path) -> None:
    """Copy the final sample grid and draw the sampler plot into `out_dir`."""
    grid = Path(entry["run_dir"]) / "samples" / "final.png"
    if grid.exists():
        entry["grid"] = str(shutil.copyfile(grid, out_dir / f"quality_{name}.png"))
    for ablation, path in entry.get("ablation_grids", {}).items():
        entry["ablation_grids"][ablation] = str(shutil.copyfile(path, out_dir / f"quality_{name}_{ablation}.png"))
    if entry.get("samplers"):
        metric, n = f"fid_{entry['extractor']}", entry["sampler_samples"]
        family = name.split("_")[0]
        path = plot_quality_vs_steps(entry["samplers"], metric, out_dir / f"{family}_samplers.png",
                                     title=f"{name}: {metric} ({n} samples) and time per image against steps")
        entry["samplers_plot"] = str(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated experiment names")
    parser.add_argument("--budget-minutes", type=float, default=None, help="training time per run (default 20, "
                        "0 under --smoke): a probe measures steps/s and max_steps is lowered to fit; 0: no cap")
    parser.add_argument("--runs-dir", type=Path, default=None, help="default: benchmarks/quality_runs")
    parser.add_argument("--out-dir", type=Path, default=None, help="quality.json and PNGs (default: benchmarks)")
    parser.add_argument("--eval-samples", type=int, default=None, help="generated images per evaluation "
                        "(default: the recipe's eval.n_samples)")
    parser.add_argument("--sampler-samples", type=int, default=200,
                        help="generated images per setting of the DDPM sampler comparison")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs of the same overrides (their "
                        "quality_train.json) instead of training them again: re-evaluate only")
    parser.add_argument("--smoke", action="store_true", help="tiny models and few steps: checks the script itself")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run, e.g. trainer.seed=1")
    args = parser.parse_args(argv)
    args.recipes = [r for r in args.recipes.split(",") if r]
    if args.budget_minutes is None:
        args.budget_minutes = 0.0 if args.smoke else 20.0
    default_dir = ROOT / ("runs/quality_smoke" if args.smoke else "benchmarks")
    args.out_dir = args.out_dir or default_dir
    args.runs_dir = args.runs_dir or (args.out_dir / "runs" if args.smoke else default_dir / "quality_runs")
    if args.smoke:
        args.eval_samples = args.eval_samples or 20
        args.sampler_samples = min(args.sampler_samples, 10)
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / "quality.json"
    env = environment(args)

    def record(name: str, entry: dict[str, Any]) -> None:
        # Read the file again just before writing: another quality.py may have finished a recipe
        # since this one started (an hour-long run once put back an older entry that way).
        recipes = json.loads(out.read_text()).get("recipes", {}) if out.exists() else {}
        out.write_text(json.dumps({**env, "recipes": {**recipes, name: entry}}, indent=2))

    for name in args.recipes:
        reason = missing_reason(name)
        if reason:
            print(f"{name}: skipped, {reason}", flush=True)
            record(name, {"status": "skipped", "reason": reason, **env})
            continue
        start = time.perf_counter()
        entry = {**run_recipe(name, args), **env}
        entry.update(recipe_wall_seconds=time.perf_counter() - start, load_average_at_end=os.getloadavg()[0])
        save_outputs(name, entry, args.out_dir)
        record(name, entry)  # after each recipe: nothing lost
        met = ", ".join(f"{t['rule']}: {t['value']:.4g} {'ok' if t['met'] else 'MISSED'}"
                        for t in entry["targets"] if t["value"] is not None)
        print(f"{name}: {entry['steps']} steps in {entry['train_seconds'] / 60:.1f} min; {met}", flush=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
