"""The `genlab` command line: train, sample, eval, resume, runs, report, push."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from genlab.errors import ConfigError, GenlabError

app = typer.Typer(
    help="genlab: train, sample and compare generative image models (VAE, GAN, DDPM, SD, ControlNet).\n\n"
         "Examples:\n\n"
         "  genlab train                                  # a DDPM on the bundled digits\n\n"
         "  genlab train model=gan trainer.max_steps=3000\n\n"
         "  genlab train -m model=vae,gan trainer.lr=1e-4,2e-4\n\n"
         "  genlab sample runs/ddpm/2026-11-22_10-00-00 --n 64 --sampler ddim --steps 50\n\n"
         "  genlab runs\n\n"
         "  genlab report runs/multirun/2026-11-22_10-00-00   # one HTML page, no server",
    no_args_is_help=True, add_completion=True, pretty_exceptions_enable=False,
)
HYDRA_FLAGS_WITHOUT_COMPOSE = ("--help", "-h", "--hydra-help", "--info", "-i", "--version", "--shell-completion", "-sc")


def _fail(error: GenlabError) -> None:
    typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
    raise typer.Exit(error.exit_code)


def _no_stray_words(run_dir: Path | None, extra: list[str]) -> None:
    """A run path with spaces, unquoted, reaches us as several words: say how to quote it."""
    if not extra:
        return

    joined = " ".join([str(run_dir or ""), *extra]).strip()
    hint = f"; if it is one path with spaces, quote it: '{joined}'" if " " in joined else ""
    _fail(ConfigError(f"unexpected argument(s) {' '.join(extra)!r}{hint}"))


def _require_run(run_dir: Path) -> None:
    """A missing or non-run directory is refused before torch is imported."""
    from genlab.run_dir import RunDir

    try:
        RunDir(run_dir).require()
    except GenlabError as error:
        _fail(error)


TRUST_HELP = ("trust this run's files on purpose: load a run written before genlab 0.2 (its training state holds "
              "numpy arrays, which safe loading refuses; only numpy arrays, never arbitrary objects), and run the "
              "pipe: shell commands its saved config names as data paths (refused otherwise)")
TRUST_COMMANDS = "pass --trust-run"  # what a refused pipe: command in a run's saved config says
ALLOW_HELP = ("trust _target_ classes under this prefix in the run's config (repeatable), e.g. your own "
              "family package; by default only genlab's and torch.optim's are instantiated")

EMA_LENGTH_HELP = ("the EMA of this relative length (e.g. 0.10), rebuilt from the run's post-hoc EMA snapshots "
                   "(trained with trainer.posthoc_ema.sigma_rels=[0.05,0.10]) instead of its fixed EMA")


def _lengths(text: str) -> list[float]:
    """--sweep-ema-length 0.05,0.1,0.2 -> [0.05, 0.1, 0.2]; a word that is not a number is refused in one sentence."""
    try:
        lengths = [float(word) for word in text.split(",") if word.strip()]
    except ValueError:
        _fail(ConfigError(f"--sweep-ema-length {text!r}: give comma-separated numbers, e.g. 0.05,0.1,0.2"))
    if not lengths:
        _fail(ConfigError("--sweep-ema-length: give at least one EMA length, e.g. 0.05,0.1,0.2"))
    return lengths


def _overrides_of(args: list[str]) -> list[str]:
    """The key=value overrides among Hydra's command-line arguments."""
    overrides, skip_next = [], False
    for arg in args:
        if skip_next:
            skip_next = False
        elif arg in ("--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-path", "-cp",
                     "--config-dir", "-cd", "--experimental-rerun"):
            skip_next = True
        elif not arg.startswith("-"):
            overrides.append(arg)
    return overrides


def _config_dirs(args: list[str]) -> list[str]:
    """The folders of `--config-dir DIR` / `-cd DIR` / `--config-dir=DIR` (a user's own config groups)."""
    dirs = [b for a, b in zip(args, args[1:]) if a in ("--config-dir", "-cd")]
    return dirs + [a.split("=", 1)[1] for a in args if a.startswith("--config-dir=")]


def _launch_processes(processes: int, args: list[str], nodes: int = 1, node_rank: int = 0,
                      main_address: str | None = None) -> None:
    """Re-run this command under `accelerate launch` with `processes` processes on this machine (gloo on
    CPU, NCCL on GPUs); with `nodes` > 1, as node `node_rank` of a run whose rank 0 listens at `main_address`."""
    import shutil
    import socket
    import subprocess

    accelerate = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    if nodes > 1:
        host, port = _main_address(main_address)
        where = ["--num_machines", str(nodes), "--machine_rank", str(node_rank), "--main_process_ip", host,
                 "--main_process_port", str(port)]
    else:
        with socket.socket() as probe:  # a free port for the processes' rendezvous
            probe.bind(("127.0.0.1", 0))
            where = ["--main_process_port", str(probe.getsockname()[1])]
    # --quiet: a process that failed has said why in one sentence; the launcher adds its table, not its traceback.
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", str(processes * nodes), *where, "--quiet",
               "-m", "genlab", *args]
    typer.echo(f"launching: {' '.join(command)}", err=True)
    raise typer.Exit(subprocess.call(command))


NODES_HELP = "machines this run spans (each runs this command with its own --node-rank)"
NODE_RANK_HELP = "this machine's place among --nodes: 0 (it hosts the rendezvous and writes the shared files) to N-1"
MAIN_ADDRESS_HELP = "HOST:PORT of node 0, where every node meets (needed with --nodes > 1)"


def _main_address(main_address: str | None) -> tuple[str, int]:
    """HOST:PORT as (host, port), or the sentence saying what to give."""

    host, _, port = (main_address or "").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        _fail(ConfigError(f"--main-address {main_address or '(not given)'}: give node 0's HOST:PORT, the same on every "
                          "node, e.g. --main-address 10.0.0.1:29500 (a free port on node 0)."))
    return host, int(port)


def _check_nodes(nodes: int, node_rank: int, args: list[str], run_dir_given: bool) -> None:
    """A run over several nodes: a valid node rank and one run directory named on every node."""

    if nodes < 1 or not 0 <= node_rank < nodes:
        _fail(ConfigError(f"--node-rank {node_rank} with --nodes {nodes}: give each node a rank from 0 to {nodes - 1}."))
    if nodes == 1:
        return
    if "-m" in args or "--multirun" in args:
        _fail(ConfigError("--nodes runs one job over several machines; a multirun over nodes is "
                          "hydra/launcher=slurm with hydra.launcher.nodes=N (each job's tasks find each other)."))
    if not run_dir_given:
        _fail(ConfigError(f"--nodes {nodes} needs hydra.run.dir=DIR, the same folder on every node (a shared file "
                          "system): a directory named by the start time would differ from node to node."))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(ctx: typer.Context,
          processes: int = typer.Option(1, "--processes", help="processes on this machine (one per GPU): re-runs "
                                        "the command under `accelerate launch --multi_gpu`"),
          nodes: int = typer.Option(1, "--nodes", help=NODES_HELP),
          node_rank: int = typer.Option(0, "--node-rank", help=NODE_RANK_HELP),
          main_address: Optional[str] = typer.Option(None, "--main-address", help=MAIN_ADDRESS_HELP),
          plan: bool = typer.Option(False, "--plan", help="print the memory per GPU (parameters, gradients, optimizer "
                                    "states, EMA, activations) under ddp and fsdp, then exit: nothing trains or is written"),
          plan_gpus: int = typer.Option(8, "--plan-gpus", min=1, help="GPUs the --plan table shards over"),
          plan_base: Optional[str] = typer.Option(None, "--plan-base", help="sd15 | sdxl | sd3 | flux | qwen-image | "
                                                  "z-image | sana | flux2-klein: plan that base at its real size, "
                                                  "trained as the model trains it (full, ControlNet or model=lora), "
                                                  "built on the meta device, nothing downloaded")) -> None:
    """Train a model. Every Hydra override and flag passes through unchanged.

    \b
    Examples:
      genlab train                                         # DDPM on digits, defaults
      genlab train model=gan data=digits trainer.max_steps=3000
      genlab train model=ddpm trainer.grad_accum=2 trainer.mixed_precision=bf16
      genlab train experiment=ddpm_digits
      genlab train -m model=vae,gan trainer.lr=1e-4,2e-4   # multirun grid
      genlab train --cfg job model=gan                     # print the composed config
      genlab train --processes 4 trainer=gpu               # 4 GPUs via accelerate launch
      genlab train --nodes 2 --node-rank 0 --main-address node0:29500 --processes 8 hydra.run.dir=/shared/run
      genlab train --plan --plan-base flux --plan-gpus 8 model=controlnet data.image_size=1024
      genlab train --plan --plan-base qwen-image --plan-gpus 1 model=lora model.base=x data.image_size=1024
    """
    from genlab.config import hydra_args
    from genlab.train.world import world_from_slurm

    slurm = world_from_slurm()  # `srun genlab train ...`: each SLURM task is one process of one run
    args = hydra_args(list(ctx.args))
    _refuse_combined_modes(args)
    if not any(a in HYDRA_FLAGS_WITHOUT_COMPOSE or a.startswith("--shell-completion") for a in args):
        try:
            args = _checked_before_hydra(args, processes > 1 or nodes > 1, plan, plan_gpus, plan_base)
        except GenlabError as error:
            _fail(error)
    run_dir_given = any(o.startswith("hydra.run.dir=") for o in _overrides_of(args))
    if slurm:  # SLURM gave the ranks and the main address; the nodes still need one folder
        _check_nodes(int(os.environ.get("SLURM_STEP_NUM_NODES") or os.environ.get("SLURM_NNODES") or 1), 0, args,
                     run_dir_given)
    elif "LOCAL_RANK" not in os.environ:
        _check_nodes(nodes, node_rank, args, run_dir_given)
    if (processes > 1 or nodes > 1) and "LOCAL_RANK" not in os.environ:  # not yet inside a launched process
        _launch_processes(processes, ["train", *ctx.args], nodes, node_rank, main_address)
    _run_hydra_train(args)


def _refuse_combined_modes(args: list[str]) -> None:
    """-m, --cfg, --info and --shell-completion each make Hydra do one thing: two of them is a mistake."""
    modes = [flag for flag in ("-m/--multirun", "--cfg", "--info", "--shell-completion")
             if any(a in flag.split("/") or a.startswith(flag.split("/")[-1] + "=") for a in args)]
    if len(modes) > 1:

        _fail(ConfigError(f"{' and '.join(modes)} cannot be combined (Hydra runs one of them); e.g. drop -m to "
                          "print the config a multirun would start from."))


def _checked_before_hydra(args: list[str], launches: bool, plan: bool, plan_gpus: int,
                          plan_base: str | None) -> list[str]:
    """Validate the overrides (exit 2 before Hydra creates anything), print --plan, and claim the run folder.

    Returns `args`, with the run or sweep folder it claimed. `launches`: this command starts processes of its
    own (--processes/--nodes), whose global rank 0 checks and claims for all.
    """
    from genlab.config import validate_overrides

    composed = validate_overrides(_overrides_of(args), _config_dirs(args))
    if plan:
        _print_plan(composed, plan_gpus, plan_base)
    launcher = launches and "LOCAL_RANK" not in os.environ
    if not launcher and int(os.environ.get("RANK", "0")) == 0 and "--cfg" not in args and "-c" not in args:
        args = _target_directory(args)  # one rank (global rank 0, on node 0) checks and claims for all
    return args


def _run_hydra_train(args: list[str]) -> None:
    """Hand `args` to Hydra's `train` entry point, with the commands typed on the command line passed on."""
    from genlab.train.entry import hydra_train
    from genlab.urls import command_line_values, environment_commands, passed_on

    try:
        environment_commands()  # $GENLAB_ALLOW_COMMANDS that is not a JSON list: one sentence now
    except GenlabError as error:
        _fail(error)
    with passed_on(command_line_values(args)):  # the only pipe: commands the job may run
        sys.argv = ["genlab train", *args]
        hydra_train()


def _print_plan(cfg, gpus: int, base: str | None) -> None:
    """`genlab train --plan`: the memory plan of the composed config, then exit 0 (nothing on disk)."""
    from genlab.train.memory_plan import REAL_KINDS, describe

    from omegaconf.errors import MissingMandatoryValue

    if base is not None and base not in REAL_KINDS:
        raise ConfigError(f"--plan-base {base}: use one of {', '.join(REAL_KINDS)}.")
    try:
        text = describe(cfg, gpus, base)
    except MissingMandatoryValue as error:
        raise ConfigError(f"--plan builds the composed model here and {error.full_key} is not set: give it, or plan "
                          f"a base at its real size with --plan-base {' | '.join(REAL_KINDS)}.") from None
    typer.echo(text)
    raise typer.Exit(0)


def _target_directory(args: list[str]) -> list[str]:
    """Refuse to train over an existing run; give a multirun one new sweep folder.

    Hydra writes .hydra/ into the run directory before genlab's code runs, so an explicit
    `hydra.run.dir` / `hydra.sweep.dir` holding a run is refused here (exit 2, nothing
    touched), except the same job rerun after an interruption, which resumes, and a sweep
    folder holding an Optuna study, whose rerun continues the study. A multirun
    without an explicit sweep folder gets one claimed now, so that jobs running in other
    processes (submitit) all land in it.
    """
    from genlab.cluster.study import STUDY_FILE
    from genlab.run_dir import RunDir, claim_new_dir
    from genlab.train.resume_policy import resume_decision

    overrides = _overrides_of(args)
    explicit = {k: v for k, _, v in (o.partition("=") for o in overrides)
                if k in ("hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir", "runs_root")}
    for key in ("hydra.run.dir", "hydra.sweep.dir"):  # `runs/<missing>/../RUN` is RUN once Hydra makes <missing>
        if key in explicit:
            explicit[key] = os.path.realpath(explicit[key])
    multirun = "-m" in args or "--multirun" in args
    if ("hydra.sweep.dir" if multirun else "hydra.run.dir") not in explicit:  # the new folder goes under the runs root
        _check_runs_root(explicit.get("runs_root") or os.environ.get("GENLAB_RUNS", "runs"))
    if "-m" in args or "--multirun" in args:
        subdir = explicit.get("hydra.sweep.subdir")
        if subdir is not None and (os.path.isabs(subdir) or os.path.normpath(subdir).split(os.sep)[0] == ".."):
            raise ConfigError(f"hydra.sweep.subdir={subdir} leaves the sweep folder, so nothing was changed; give a "
                              "folder name inside it, e.g. hydra.sweep.subdir=${hydra.job.num}.")
        sweep = explicit.get("hydra.sweep.dir")
        if sweep is None:
            root = explicit.get("runs_root") or os.environ.get("GENLAB_RUNS", "runs")
            return [*args, f"hydra.sweep.dir={claim_new_dir(Path(root) / 'multirun')}"]
        if Path(sweep).is_dir():  # Hydra writes into its jobs' folders (.hydra/, train.log) before genlab runs
            RunDir(sweep).refuse_links_out()
        jobs = Path(sweep).iterdir() if Path(sweep).is_dir() else ()
        taken = [job.name for job in jobs if RunDir(job).is_run() and RunDir(job).holds_run()]
        if taken and (Path(sweep) / STUDY_FILE).exists():
            return args  # an Optuna study's folder: the rerun continues the study (genlab.cluster.study)
        if taken:
            raise ConfigError(f"hydra.sweep.dir={sweep} already holds runs ({', '.join(sorted(taken)[:3])}); "
                              "nothing was changed. Choose another sweep folder.")
        return args
    if "hydra.run.dir" in explicit:
        run = RunDir(explicit["hydra.run.dir"])
        if run.path.is_dir():  # Hydra appends to train.log and rewrites .hydra/ before genlab's lock is taken
            run.refuse_links_out()
        decision = resume_decision(run)
        plain = sorted(o for o in overrides if not o.startswith("hydra."))
        saved = sorted(o for o in run.read_overrides() if not o.startswith("hydra."))
        if decision == "resume" and plain != saved:
            decision = (f"{run.path} holds an interrupted run started with other overrides ({' '.join(saved)}); "
                        f"nothing was changed. Rerun its own command to continue it, use `genlab resume {run.path}`, "
                        "or train into another directory.")
        if decision not in ("fresh", "resume"):
            raise ConfigError(decision)
    return args


def _check_runs_root(root: str) -> None:
    """The folder new runs go under can hold them: said now, not as a traceback from Hydra's resolver."""

    path = Path(root).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"the runs folder {root} (runs_root or GENLAB_RUNS) cannot be made: {existing} is a file; "
                          "point it at a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write to the runs folder {root} ({existing} is read-only); choose another with "
                          "runs_root=... or GENLAB_RUNS=...")


@app.command(context_settings={"allow_extra_args": True})
def sample(
    ctx: typer.Context,
    run_dir: Optional[Path] = typer.Argument(None, help="run directory; default: the newest finished run under runs/"),
    n: int = typer.Option(64, "--n", min=1, help="number of images (over 1,024 needs --separate)"),
    seed: int = typer.Option(0, help="noise seed (same seed, same images)"),
    out: Optional[Path] = typer.Option(None, help="output PNG (default RUN_DIR/samples/sample_seed<seed>.png)"),
    checkpoint: str = typer.Option("latest", help="latest | best | step_N"),
    ema: bool = typer.Option(True, "--ema/--no-ema", help="use the EMA weights when the run has them"),
    ema_length: Optional[float] = typer.Option(None, "--ema-length", help=EMA_LENGTH_HELP),
    sampler: Optional[str] = typer.Option(None, help="diffusion: ddpm | ddim | dpm | unipc; flow-matching runs: euler | heun"),
    steps: Optional[int] = typer.Option(None, min=1, help="diffusion: denoising steps; VAE --interpolate: images per row"),
    class_label: Optional[int] = typer.Option(None, "--class", help="conditional models: the class to draw"),
    guidance: Optional[float] = typer.Option(None, help="classifier-free guidance scale"),
    sketch: Optional[Path] = typer.Option(None, help="ControlNet: the sketch image"),
    edges_from: Optional[Path] = typer.Option(None, help="ControlNet: make the sketch from this photo's edges"),
    prompt: Optional[str] = typer.Option(None, help="SD / ControlNet: the text prompt"),
    control_scale: Optional[float] = typer.Option(None, help="ControlNet: conditioning scale"),
    control_mode: Optional[str] = typer.Option(None, "--control-mode", help="union ControlNet: what the sketch "
                                               "image is, a key of model.controlnet.control_modes or a slot number"),
    lora: Optional[List[str]] = typer.Option(None, help="SD / ControlNet: PATH[:weight], repeatable"),
    temperature: Optional[float] = typer.Option(None, help="VAE: std of the prior samples (default model.temperature)"),
    truncation: Optional[float] = typer.Option(None, help="GAN: truncate z at +-this (default model.truncation; 0 = off)"),
    interpolate: bool = typer.Option(False, help="VAE: latent interpolations, one row per pair"),
    reconstruct: bool = typer.Option(False, help="VAE: validation images next to their reconstructions"),
    separate: bool = typer.Option(False, help="also write each image as its own PNG"),
    trust_run: bool = typer.Option(False, "--trust-run", help=TRUST_HELP),
    allow_target: Optional[List[str]] = typer.Option(None, "--allow-target", help=ALLOW_HELP),
) -> None:
    """Draw samples from a trained run; rebuilds everything from the run's saved config.

    \b
    Examples:
      genlab sample runs/ddpm/2026-11-22_10-00-00 --n 64 --sampler ddim --steps 50
      genlab sample RUN --class 3 --guidance 2.0
      genlab sample RUN --ema-length 0.10              # trained with trainer.posthoc_ema
      genlab sample RUN --interpolate                  # VAE
      genlab sample RUN --sketch house.png --prompt "a red house"
    """
    _no_stray_words(run_dir, list(ctx.args))
    from genlab.sample import check_request, sample_command

    try:
        check_request(run_dir, n, separate)  # before torch is imported: a wrong path answers at once
    except GenlabError as error:
        _fail(error)

    options = {"sampler": sampler, "steps": steps, "class_label": class_label, "guidance": guidance,
               "prompt": prompt, "control_scale": control_scale, "control_mode": control_mode, "lora": lora or None,
               "interpolate": interpolate or None, "reconstruct": reconstruct or None, "temperature": temperature,
               "truncation": truncation}
    from genlab.urls import commands_allowed

    try:
        with commands_allowed(trust_all=trust_run, how=TRUST_COMMANDS):
            sample_command(run_dir, n=n, seed=seed, out=out, checkpoint=checkpoint, use_ema=ema, separate=separate,
                           sketch=sketch, edges_from=edges_from,
                           options={k: v for k, v in options.items() if v is not None},
                           allow=tuple(allow_target or ()), trust_run=trust_run, ema_length=ema_length)
    except GenlabError as error:
        _fail(error)


@app.command(name="eval", context_settings={"allow_extra_args": True})
def evaluate(
    ctx: typer.Context,
    run_dir: Path = typer.Argument(..., help="the run directory to evaluate"),
    checkpoint: str = typer.Option("latest", help="latest | best | step_N"),
    ema: bool = typer.Option(True, "--ema/--no-ema", help="use the EMA weights when the run has them"),
    ema_length: Optional[float] = typer.Option(None, "--ema-length", help=EMA_LENGTH_HELP),
    sweep_ema_length: Optional[str] = typer.Option(None, "--sweep-ema-length",
                                                   help="comma-separated EMA lengths (e.g. 0.05,0.1,0.2): the metrics "
                                                        "of each, rebuilt from post-hoc snapshots, next to the run's "
                                                        "own EMA (eval/ema_sweep.json)"),
    n: Optional[int] = typer.Option(None, "--n", min=1, help="generated images (default eval.n_samples)"),
    compare_samplers: bool = typer.Option(False, help="diffusion: quality and time per image for the objective's "
                                                      "samplers: DDPM 1000, DDIM 50/20/10, DPM-Solver++ 20/10; flow: "
                                                      "Euler 50/16/8/4, Heun 8/4 (JSON + PNG plot)"),
    trust_run: bool = typer.Option(False, "--trust-run", help=TRUST_HELP),
    allow_target: Optional[List[str]] = typer.Option(None, "--allow-target", help=ALLOW_HELP),
) -> None:
    """Compute the family's metrics; writes RUN_DIR/eval/metrics.json and prints a table.

    \b
    Metrics are named by their feature extractor (fid_digits_cnn, fid_inception, ...):
    FID, KID, precision/recall; class coverage on labelled data; reconstruction, ELBO,
    IWAE bound and anomaly AUROC for VAEs; disc IoU, colour accuracy and edge F1 for
    sketch-conditioned models.

    \b
    Examples:
      genlab eval runs/gan/2026-11-22_10-00-00
      genlab eval runs/ddpm/2026-11-22_10-00-00 --checkpoint best --n 2000 --compare-samplers
      genlab eval RUN --sweep-ema-length 0.05,0.1,0.2   # trained with trainer.posthoc_ema
    """
    _no_stray_words(run_dir, list(ctx.args))
    _require_run(run_dir)
    from genlab.eval.command import eval_command
    from genlab.urls import commands_allowed

    try:
        with commands_allowed(trust_all=trust_run, how=TRUST_COMMANDS):
            if sweep_ema_length is not None:
                from genlab.eval.command import ema_sweep_command

                ema_sweep_command(run_dir, checkpoint, _lengths(sweep_ema_length), n, allow=tuple(allow_target or ()),
                                  trust_run=trust_run)
                return
            eval_command(run_dir, checkpoint, ema, n, compare_samplers, allow=tuple(allow_target or ()),
                         trust_run=trust_run, ema_length=ema_length)
    except GenlabError as error:
        _fail(error)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def resume(ctx: typer.Context, run_dir: Path = typer.Argument(..., help="the run directory to continue"),
           processes: int = typer.Option(1, "--processes", help="processes on this machine (one per GPU); the "
                                         "global batch (batch_size x processes) must stay the run's"),
           nodes: int = typer.Option(1, "--nodes", help=NODES_HELP),
           node_rank: int = typer.Option(0, "--node-rank", help=NODE_RANK_HELP),
           main_address: Optional[str] = typer.Option(None, "--main-address", help=MAIN_ADDRESS_HELP),
           trust_run: bool = typer.Option(False, "--trust-run", help=TRUST_HELP),
           allow_target: Optional[List[str]] = typer.Option(None, "--allow-target", help=ALLOW_HELP)) -> None:
    """Continue a run in place from its newest complete checkpoint, with its saved config.

    \b
    Examples:
      genlab resume runs/gan/2026-11-22_10-00-00
      genlab resume runs/gan/2026-11-22_10-00-00 trainer.max_steps=20000
      genlab resume RUN --processes 2 trainer.batch_size=32   # was 1 process x 64: the same run continues
    """
    words = [a for a in ctx.args if "=" not in a]
    _no_stray_words(run_dir, words)
    _require_run(run_dir)
    from genlab.train.world import world_from_slurm

    world_from_slurm()  # `srun genlab resume ...`: each SLURM task is one process of the run
    if "LOCAL_RANK" not in os.environ:
        _check_nodes(nodes, node_rank, [], run_dir_given=True)
    if (processes > 1 or nodes > 1) and "LOCAL_RANK" not in os.environ:
        extra = [f"--allow-target={a}" for a in allow_target or ()] + (["--trust-run"] if trust_run else [])
        _launch_processes(processes, ["resume", str(run_dir), *extra, *ctx.args], nodes, node_rank, main_address)
    from genlab.resume import resume_run

    try:
        resume_run(run_dir, list(ctx.args), allow=tuple(allow_target or ()), trust_run=trust_run)
    except GenlabError as error:
        _fail(error)


@app.command()
def runs(
    root: Path = typer.Argument(Path(os.environ.get("GENLAB_RUNS", "runs")), help="folder searched for runs"),
    sort: Optional[str] = typer.Option(None, help="rank by this metric (from eval/metrics.json or metrics.jsonl)"),
    plot: Optional[Path] = typer.Option(None, help="also draw the runs' loss curves into this PNG"),
) -> None:
    """One row per run: family, data, steps, last losses, best metric, status.

    \b
    Examples:
      genlab runs
      genlab runs runs/multirun/2026-11-22_10-00-00 --sort fid_digits_cnn --plot curves.png
    """
    from genlab.runs import plot_runs, print_runs

    try:
        rows = print_runs(root, sort=sort)
        if plot:
            print(f"wrote {plot_runs(rows, plot)}")
    except GenlabError as error:
        _fail(error)


@app.command()
def report(
    path: Path = typer.Argument(..., help="a run directory, a sweep folder (runs/multirun/<date>) or a runs root"),
    out: Optional[Path] = typer.Option(None, help="the HTML file (default PATH/report.html)"),
    max_embed_mb: float = typer.Option(4.0, min=0, help="embed sample grids up to this many MB in all; "
                                       "past it they are linked (keep the page beside the runs)"),
) -> None:
    """One self-contained HTML page of a run or a sweep: open it in any browser, offline.

    \b
    A run: sample grids over training (a slider), loss and metric curves (smoothing, log
    scale), eval metrics, status and throughput, the command and the config.
    A sweep or a runs root: trials ranked by the objective (sweep_objective, default the
    loss) in a sortable table, hyperparameters against the objective (parallel
    coordinates), each trial's final grid, curves side by side, config differences.

    \b
    Examples:
      genlab report runs/ddpm/2026-11-22_10-00-00
      genlab report runs/multirun/2026-11-22_10-00-00 --out sweep.html
      genlab report runs                           # every run under runs/
    """
    from genlab.report import write_report

    try:
        written = write_report(path, out, max_embed_mb=max_embed_mb)
    except GenlabError as error:
        _fail(error)
    typer.echo(f"wrote {written} ({written.stat().st_size / 1e6:.1f} MB); open it in a browser")


@app.command()
def push(
    run_dir: Path = typer.Argument(..., help="the run whose export/ to upload"),
    repo: str = typer.Option(..., "--repo", help="the Hub repository, e.g. your-name/ddpm-digits (created if missing)"),
    private: bool = typer.Option(False, help="create the repository private"),
    message: Optional[str] = typer.Option(None, help="the commit message (default: names the run)"),
) -> None:
    """Upload a run's export/ (with its model card, README.md) to the Hugging Face Hub.

    \b
    Needs a login with write access: `huggingface-cli login` (or `hf auth login`, or HF_TOKEN).

    \b
    Examples:
      genlab push runs/ddpm/2026-11-22_10-00-00 --repo your-name/ddpm-digits
      genlab push runs/chain/cn --repo your-org/controlnet-circles --private
    """
    from genlab.push import push_export

    try:
        url = push_export(run_dir, repo, private=private, message=message)
    except GenlabError as error:
        _fail(error)
    typer.echo(f"pushed {run_dir}/export to {url}")


data_app = typer.Typer(help="Prepare data for training: shards for streaming.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("pack")
def data_pack(
    src: str = typer.Argument(..., help="an image folder, a Hugging Face dataset saved with save_to_disk, or a hub name"),
    out: Path = typer.Argument(..., help="a new folder for the shards and their train.json / val.json indexes"),
    shard_size: int = typer.Option(1000, min=1, help="samples per shard"),
    val_fraction: float = typer.Option(0.01, min=0.0, max=0.5, help="share of the samples in the val shards"),
    seed: int = typer.Option(0, help="fixes the shuffle and the train/val split"),
    hf_split: str = typer.Option("train", help="Hugging Face: the dataset's split to pack"),
    data_dir: Optional[str] = typer.Option(None, help="Hugging Face builders (imagefolder): the data folder"),
    image_column: str = typer.Option("image", help="Hugging Face: the image column"),
    caption_column: Optional[str] = typer.Option("text", help="Hugging Face: the caption column (absent: none)"),
    conditioning_column: Optional[str] = typer.Option("conditioning_image", help="Hugging Face: the sketch column, "
                                                      "packed when present"),
    label_column: Optional[str] = typer.Option(None, help="Hugging Face: an integer label column"),
) -> None:
    """Write webdataset shards from an image folder or a Hugging Face dataset, for `data=shards`.

    \b
    A folder's captions come from NAME.txt beside each image or metadata.jsonl ("text"), its
    sketches from metadata.jsonl ("conditioning_image"). Image bytes are copied, not re-encoded.
    Examples:
      genlab data pack photos/ shards/photos --shard-size 2000
      genlab data pack fill50k_saved/ shards/fill50k        # image, conditioning_image, text
      genlab train model=controlnet data=shards data.path=shards/fill50k model.base=...
    """

    # Checked before the heavy imports, so that a typo answers at once.
    if not Path(src).expanduser().exists() and (src.startswith((".", "/", "~")) or src.count("/") > 1):
        _fail(ConfigError(f"{src}: no such folder; give an image folder, a save_to_disk folder or a hub name."))
    if out.is_dir() and any(out.glob("*.json")):
        _fail(ConfigError(f"{out} already holds a shard index; pack into a new folder."))
    from genlab.data.pack import pack

    try:
        summary = pack(src, out, shard_size, val_fraction, seed, data_dir, hf_split, image_column, caption_column,
                       conditioning_column, label_column)
    except GenlabError as error:
        _fail(error)
    typer.echo(f"wrote {summary['train']} train samples in {summary['train_shards']} shard(s) and {summary['val']} "
               f"val samples in {summary['val_shards']} to {out}; train with data=shards data.path={out}")


@app.command(name="stand-in")
def stand_in(
    kind: str = typer.Argument(..., help="the base kind: sdxl, sd3, flux, qwen-image, z-image, sana or flux2-klein"),
    out: Path = typer.Argument(..., help="a new folder for the pipeline (diffusers' save_pretrained layout)"),
    size: str = typer.Option("tiny", help="tiny (a few channels, seconds) or real (the published architecture)"),
    seed: int = typer.Option(0, help="fixes the random weights"),
) -> None:
    """Write a random-weight base of a kind's architecture, to try configs before downloading one.

    \b
    Nothing is downloaded: the architecture is the published config, the weights are random, so
    speed and memory are those of the real base (`--size real`, float32 on disk and in memory while
    writing: SDXL 14 GB, SD3.5-large 55 GB, Flux.1 68 GB, Qwen-Image 115 GB, Z-Image 41 GB, Sana 18 GB,
    Flux.2 [klein] 4B 32 GB) and the outputs are noise. `model.base=OUT` accepts the folder.
    Examples:
      genlab stand-in sdxl bases/sdxl-tiny
      genlab stand-in flux bases/flux-real --size real
      genlab stand-in qwen-image bases/qwen-tiny      # also z-image, sana, flux2-klein
      genlab train model=controlnet model.base=bases/sdxl-tiny data=fill_circles
    """
    from genlab.families import stand_ins

    if kind not in stand_ins.SAVERS:
        _fail(ConfigError(f"unknown base kind '{kind}'; choose one of {', '.join(stand_ins.SAVERS)}."))
    if size not in ("tiny", "real"):
        _fail(ConfigError(f"--size {size}: choose tiny or real."))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        _fail(ConfigError(f"{out} already exists and is not an empty folder; nothing was written. Choose a new folder."))
    stand_ins.SAVERS[kind](out, size=size, seed=seed)
    typer.echo(f"wrote a random-weight {kind} base ({size}) to {out}; use it with model.base={out}")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(levelname)s] %(message)s", datefmt="%H:%M:%S")
    app()


if __name__ == "__main__":
    main()
