"""strategy=fsdp (FSDP2 fully_shard) and its sharded checkpoints (torch.distributed.checkpoint).

Tolerances: a strategy=fsdp run and a strategy=ddp run compute the same arithmetic except where the
gradients of the processes are summed (FSDP's reduce-scatter vs DDP's all-reduce vs one process's
own sum over the doubled batch): float32 sums in another order. Measured on this 2-core EPYC over 4
steps of the tiny U-Net: losses differ by at most 1.3e-7 relative (benchmarks/fsdp-*.json,
max_loss_rel_diff_vs_ddp_1), weights by ~1e-7. The tests allow 1e-5 relative on losses and 1e-5
absolute on weights (values of order 0.1-1): 75x the measured drift, far below what a real bug moves
(a shard left out, another process's initial weights: the first loss moved by 27%).
A resume on the same number of processes repeats the same operations: compared bitwise.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_DDPM, compose, genlab
from genlab.train.job import run_training

STEPS = ["trainer.max_steps=4", "trainer.checkpoint_every=2", "trainer.log_every=1", "trainer.sample_every=0"]


@pytest.fixture
def group_of_one():
    """An FSDP run in this process opens a process group of one; close it so later tests start clean."""
    import torch.distributed as dist

    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _same_losses(a: Path, b: Path, rel: float = 1e-5) -> None:
    ra, rb = _rows(a), _rows(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] and ra
    for x, y in zip(ra, rb):
        for key in (k for k in x if "loss" in k):
            assert abs(x[key] - y[key]) <= rel * max(1.0, abs(y[key])), (key, x[key], y[key])


def _exported(run: Path) -> dict[str, torch.Tensor]:
    return {f"{f.relative_to(run)}/{k}": v for f in sorted((run / "export").rglob("*.safetensors"))
            for k, v in load_file(f).items()}


def _fsdp_on_2_is_ddp_on_1(tmp_path: Path, common: list[str], batch: int, env: dict) -> None:
    """ddp on 1 process with `batch`, fsdp on 2 with half each: the same losses and exports (1e-5)."""
    genlab("train", *common, f"trainer.batch_size={batch}", f"hydra.run.dir={tmp_path / 'ddp1'}", env=env)
    genlab("train", "--processes", "2", *common, "strategy=fsdp", f"trainer.batch_size={batch // 2}",
           f"hydra.run.dir={tmp_path / 'fsdp2'}", env=env)
    _same_losses(tmp_path / "fsdp2", tmp_path / "ddp1")
    a, b = _exported(tmp_path / "fsdp2"), _exported(tmp_path / "ddp1")
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)


def test_fsdp_on_one_process_trains_like_ddp_and_writes_a_dcp_checkpoint(tmp_path, group_of_one, one_thread):
    run_training(compose(*TINY_DDPM, *STEPS, "strategy=fsdp"), tmp_path / "fsdp")
    run_training(compose(*TINY_DDPM, *STEPS), tmp_path / "ddp")
    _same_losses(tmp_path / "fsdp", tmp_path / "ddp")
    files = sorted(p.name for p in (tmp_path / "fsdp" / "checkpoints" / "step_000004").iterdir())
    assert files == [".metadata", "COMPLETE", "__0_0.distcp", "state.json", "training_state.pt"]
    a, b = _exported(tmp_path / "fsdp"), _exported(tmp_path / "ddp")
    assert a.keys() == b.keys() and a
    for key in a:  # the export is the consolidated diffusers directory, as under ddp
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(tmp_path / "fsdp" / "export")  # plain diffusers, no genlab
    image = pipe(batch_size=1, num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 8, 8, 1) and list(pipe.unet.config.block_out_channels) == [16, 16]  # digits: 1 channel


def test_fsdp_resume_on_the_same_process_count_is_bitwise(tmp_path, group_of_one, one_thread):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run_training(compose(*TINY_DDPM, *STEPS, "strategy=fsdp"), straight)
    run_training(compose(*TINY_DDPM, *STEPS, "strategy=fsdp", "trainer.max_steps=2"), stopped)
    run_training(compose(*TINY_DDPM, *STEPS, "strategy=fsdp"), stopped, resume=True)
    assert _rows(straight) == [{**r, "images_per_s": s["images_per_s"]} for r, s in zip(_rows(stopped), _rows(straight))]
    a, b = _exported(straight), _exported(stopped)  # EMA weights (swapped in for the export) included
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_with_a_shard_missing_is_skipped_for_the_previous_one(tmp_path, group_of_one, one_thread, caplog):
    caplog.set_level("INFO")
    run = tmp_path / "run"
    run_training(compose(*TINY_DDPM, *STEPS, "strategy=fsdp"), run)
    (run / "checkpoints" / "step_000004" / "__0_0.distcp").unlink()
    run_training(compose(*TINY_DDPM, *STEPS, "strategy=fsdp", "trainer.max_steps=6"), run, resume=True)
    assert "skipping damaged checkpoint" in caplog.text and "step_000004" in caplog.text
    assert "resumed from" in caplog.text and "step_000002 at step 2" in caplog.text


def test_a_checkpoint_without_complete_is_never_loaded(tmp_path, group_of_one, one_thread, caplog):
    caplog.set_level("INFO")
    run = tmp_path / "run"
    run_training(compose(*TINY_DDPM, *STEPS, "strategy=fsdp"), run)
    (run / "checkpoints" / "step_000004" / "COMPLETE").unlink()
    run_training(compose(*TINY_DDPM, *STEPS, "strategy=fsdp", "trainer.max_steps=6"), run, resume=True)
    assert "step_000002 at step 2" in caplog.text


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_dcp_metadata_that_would_run_code_is_refused(tmp_path, group_of_one, one_thread, monkeypatch):
    from genlab.train import sharded_checkpoint
    from genlab.train.checkpoint import UnsafeCheckpoint

    run = tmp_path / "run"
    run_training(compose(*TINY_DDPM, *STEPS, "strategy=fsdp"), run)
    ckpt = run / "checkpoints" / "step_000004"
    sharded_checkpoint.SafeReader(ckpt).read_metadata()  # genlab's own metadata passes the allowlist
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Boom()))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnsafeCheckpoint, match="posix.system|os.system"):
        sharded_checkpoint.SafeReader(ckpt).read_metadata()
    with pytest.raises(UnsafeCheckpoint):
        sharded_checkpoint.full_weights(ckpt)
    assert not (tmp_path / "PWNED").exists()


def test_non_tensor_items_load_without_arbitrary_globals(tmp_path):
    import io

    from genlab.train.checkpoint import UnsafeCheckpoint
    from genlab.train.sharded_checkpoint import SafeLoadPlanner

    planner = SafeLoadPlanner()
    planner.flatten_state_dict, planner.state_dict = False, {}

    class Item:
        class dest_index:
            fqn = "optimizers.main.param_groups"

    ok = io.BytesIO()
    torch.save([{"lr": 1e-3, "betas": (0.9, 0.99), "params": ["a.weight"]}], ok)
    ok.seek(0)
    planner.load_bytes(Item, ok)
    assert planner.state_dict[Item.dest_index.fqn][0]["betas"] == (0.9, 0.99)
    bad = io.BytesIO()
    torch.save(_Boom(), bad)
    bad.seek(0)
    with pytest.raises(UnsafeCheckpoint):
        planner.load_bytes(Item, bad)


def test_full_weights_of_a_sharded_checkpoint_load_into_a_plain_unet(tmp_path, group_of_one, one_thread):
    from diffusers import UNet2DModel

    from genlab.train.sharded_checkpoint import full_weights

    run = tmp_path / "run"
    run_training(compose(*TINY_DDPM, *STEPS, "strategy=fsdp", "trainer.ema=null"), run)
    weights = full_weights(run / "checkpoints" / "step_000004")["unet"]
    exported = UNet2DModel.from_pretrained(run / "export" / "unet")  # plain diffusers (no EMA: the trained weights)
    assert weights.keys() == exported.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in exported.state_dict().items())


def test_a_ddp_checkpoint_is_refused_under_fsdp_with_what_to_do(tmp_path, group_of_one, one_thread):
    from genlab.errors import GenlabError

    run = tmp_path / "run"
    run_training(compose(*TINY_DDPM, *STEPS, "trainer.max_steps=2"), run)
    with pytest.raises(GenlabError, match="strategy=ddp"):
        run_training(compose(*TINY_DDPM, *STEPS, "strategy=fsdp"), run, resume=True)


def test_family_wrap_units_are_sharded_one_by_one(group_of_one):
    from torch.distributed.fsdp import FSDPModule

    from genlab.config import build
    from genlab.train.strategy import FSDP, shard_units

    cfg = compose(*TINY_DDPM, "strategy=fsdp")
    family = build("model", cfg.model)
    units = shard_units(family)["unet"]
    assert len(units) == 5  # 2 down blocks, the middle block, 2 up blocks

    class Acc:
        device = torch.device("cpu")

    strategy = FSDP()
    strategy.setup(Acc(), "no")
    strategy.wrap(family.unet, units)
    assert all(isinstance(u, FSDPModule) for u in units) and isinstance(family.unet, FSDPModule)


@pytest.mark.slow  # four launches of the bench script (80 s on 2 shared cores)
def test_fsdp_halves_what_a_process_holds_and_ddp_does_not(tmp_path):
    """Parameters + gradients + optimizer states per process, measured at a step (scripts/bench_fsdp.py)."""
    import subprocess
    import sys

    out = tmp_path / "fsdp.json"
    script = Path(__file__).parents[1] / "scripts" / "bench_fsdp.py"
    subprocess.run([sys.executable, str(script), "--tiny", "--out", str(out)], check=True, timeout=900)
    summary = json.loads(out.read_text())["summary"]
    assert summary["fall_1_to_2_processes"]["fsdp"] >= 1.8
    assert summary["fall_1_to_2_processes"]["ddp"] < 1.05
    assert all(diff <= 1e-5 for diff in summary["max_loss_rel_diff_vs_ddp_1"].values()), summary
    assert all(summary["plan_states_equal_held"].values()), summary  # --plan's bytes are what each process held


@pytest.mark.slow  # six CLI runs on 1 and 2 gloo processes (200 s on 2 shared cores)
def test_genlab_train_processes_2_fsdp_is_the_run_of_ddp_and_resumes_on_2_and_on_1(tmp_path):
    env = {"OMP_NUM_THREADS": "1"}
    common = [*TINY_DDPM, *STEPS]
    _fsdp_on_2_is_ddp_on_1(tmp_path, common, 8, env)
    ckpt = tmp_path / "fsdp2" / "checkpoints" / "step_000004"
    assert {p.name for p in ckpt.iterdir()} >= {".metadata", "__0_0.distcp", "__1_0.distcp", "COMPLETE"}
    # Stopped at step 2 on 2 processes, resumed on 2: the same operations, bitwise.
    moved = [a for a in common if not a.startswith("trainer.max_steps")]
    genlab("train", "--processes", "2", *moved, "trainer.max_steps=2", "strategy=fsdp", "trainer.batch_size=4",
           f"hydra.run.dir={tmp_path / 'again'}", env=env)
    genlab("resume", str(tmp_path / "again"), "--processes", "2", "trainer.max_steps=4", env=env)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]  # noqa: E731
    assert strip(_rows(tmp_path / "again")) == strip(_rows(tmp_path / "fsdp2"))
    # The same 2-process checkpoint resumed on 1 process with the doubled batch: DCP reshards.
    genlab("train", "--processes", "2", *moved, "trainer.max_steps=2", "strategy=fsdp", "trainer.batch_size=4",
           f"hydra.run.dir={tmp_path / 'to_one'}", env=env)
    genlab("resume", str(tmp_path / "to_one"), "trainer.max_steps=4", "trainer.batch_size=8", env=env)
    _same_losses(tmp_path / "to_one", tmp_path / "ddp1")


@pytest.mark.slow  # three tiny FSDP runs in this process (17 s on 2 shared cores)
def test_the_gpu_checks_fsdp_part_passes_on_a_cpu(tmp_path, one_thread):
    """scripts/gpu_check.py's part 4 (wrap, DCP files, bitwise resume, plan = held), here at the tiny size."""
    from scripts import gpu_check

    result = gpu_check.fsdp_part(tmp_path / "fsdp.json", tmp_path)
    assert result["checks"] and all(result["checks"].values()), result
    assert json.loads((tmp_path / "fsdp.json").read_text())["checks"] == result["checks"]


KILLED_IN_THE_SAVE = """
import os, signal
from conftest import TINY_DDPM, compose
from genlab.train import checkpoint, sharded_checkpoint
from genlab.train.job import run_training

seal = checkpoint.seal
def die_at_step_4(root, final, tmp, step):
    if step == 4:  # every shard and .metadata written, COMPLETE not yet: SIGKILL, no clean-up runs
        os.kill(os.getpid(), signal.SIGKILL)
    return seal(root, final, tmp, step)
sharded_checkpoint.ckpt.seal = die_at_step_4
run_training(compose(*TINY_DDPM, *{steps!r}, "strategy=fsdp", "trainer.max_steps=6"), {run!r})
"""


@pytest.mark.slow  # a subprocess killed in its second save, then a resume (72 s on 2 loaded cores)
def test_an_fsdp_run_killed_during_a_save_resumes_from_the_previous_checkpoint(tmp_path, caplog):
    import signal
    import subprocess
    import sys

    caplog.set_level("INFO")
    run = tmp_path / "run"
    script = KILLED_IN_THE_SAVE.format(steps=STEPS[1:], run=str(run))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)})
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    left = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert left[0].startswith(".step_000004.") and left[1:] == ["step_000002"]  # the half-written one, never renamed
    assert {".metadata", "__0_0.distcp"} <= {p.name for p in (run / "checkpoints" / left[0]).iterdir()}
    import torch.distributed as dist

    try:
        run_training(compose(*TINY_DDPM, *STEPS, "strategy=fsdp", "trainer.max_steps=6"), run, resume=True)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert "step_000002 at step 2" in caplog.text
    assert json.loads((run / "status.json").read_text())["status"] == "finished"


TINY_GAN = ["model=gan", "model.arch=r3gan", "model.spectral_norm=false", "model.loss=rpgan", "model.r1_gamma=0",
            "trainer=debug", "logger=none", "data.image_size=8", "model.g_channels=8", "model.d_channels=8",
            "model.latent_dim=8"]


@pytest.mark.slow  # two families x (1 ddp process, 2 fsdp processes) of 3 steps (~3 min on 2 shared cores)
@pytest.mark.parametrize("family", ["gan", "lora_controlnet"])
def test_fsdp_on_2_processes_trains_the_gan_and_a_lora_controlnet_like_ddp_on_1(family, tmp_path):
    """The GAN alternates two optimizers over two sharded networks; the ControlNet trains beside the frozen,
    sharded base U-Net's LoRA (param groups over two networks). Tolerance: module docstring."""
    from tiny_bases import tiny_sd_export

    env = {"OMP_NUM_THREADS": "1"}
    if family == "gan":
        base, batch = TINY_GAN, 8
    else:
        sd = tiny_sd_export(tmp_path / "base")
        base, batch = ["model=controlnet", f"model.base={sd}", "data=fill_circles", "data.image_size=32",
                       "trainer=debug", "logger=none", "model.lora.rank=4"], 4
    common = [*base, "trainer.max_steps=3", "trainer.log_every=1", "trainer.sample_every=0",
              "trainer.checkpoint_every=0"]
    _fsdp_on_2_is_ddp_on_1(tmp_path, common, batch, env)


@pytest.mark.slow  # a tiny GAN step in this process (16 s of CPU; 36 s beside another test)
def test_a_gradient_penalty_under_fsdp_is_refused_with_one_sentence(tmp_path, group_of_one, one_thread):
    """R1 differentiates D twice (autograd.grad with create_graph, then backward); FSDP2 frees the gathered
    weights after the first: torch's 'data is not allocated' becomes genlab's sentence."""
    from genlab.errors import GenlabError

    cfg = compose(*TINY_GAN, "model.r1_gamma=0.5", "trainer.max_steps=1", "trainer.sample_every=0", "strategy=fsdp")
    with pytest.raises(GenlabError, match="set the penalty to 0 or train with strategy=ddp"):
        run_training(cfg, tmp_path / "run")


@pytest.mark.slow  # 1, 2 and 4 gloo processes of the tiny U-Net (~3 min on 2 shared cores)
def test_an_fsdp_checkpoint_of_2_processes_resumes_on_4_with_the_same_global_batch(tmp_path):
    env = {"OMP_NUM_THREADS": "1"}
    moved = [a for a in [*TINY_DDPM, *STEPS] if not a.startswith("trainer.max_steps")]
    genlab("train", *TINY_DDPM, *STEPS, "trainer.batch_size=8", f"hydra.run.dir={tmp_path / 'ddp1'}", env=env)
    genlab("train", "--processes", "2", *moved, "trainer.max_steps=2", "strategy=fsdp", "trainer.batch_size=4",
           f"hydra.run.dir={tmp_path / 'to_four'}", env=env)
    genlab("resume", str(tmp_path / "to_four"), "--processes", "4", "trainer.max_steps=4", "trainer.batch_size=2",
           env=env)
    _same_losses(tmp_path / "to_four", tmp_path / "ddp1")  # DCP read 2 shards' files into 4 shards each
    ckpt = tmp_path / "to_four" / "checkpoints" / "step_000004"
    assert {f"__{r}_0.distcp" for r in range(4)} <= {p.name for p in ckpt.iterdir()}
