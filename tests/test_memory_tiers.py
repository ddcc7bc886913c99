"""Memory tiers: the trainer presets (vram_12gb/24gb/80gb) compose and build on CPU; the quantised frozen
base (torchao int8, LoRA on top) trains through the loop, checkpoints, resumes bitwise and samples."""

from __future__ import annotations

import sys

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import default_collate

from conftest import compose, rng
from genlab.config import check_values
from genlab.data import build_dataset
from genlab.errors import ConfigError, GenlabError
from genlab.families import offload, quantize
from genlab.families.controlnet import ControlNet
from genlab.sample import load_family
from test_optimizers import HAVE_8BIT
from test_resume_exact import _assert_identical, _losses, _straight_and_resumed
from tiny_bases import tiny_sd_export

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
# preset -> (micro-batch, accumulation, gradient checkpointing, quantised base)
PRESETS = {"vram_12gb": (1, 4, True, "int8"), "vram_24gb": (4, 2, True, None), "vram_80gb": (16, 1, False, None)}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_sd_export(tmp_path_factory.mktemp("base"))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_compose_and_build_on_cpu(preset, base):
    batch, accum, checkpointing, quantized = PRESETS[preset]
    cfg = compose("model=controlnet", f"model.base={base}", f"trainer={preset}", "data=fill_circles", "data.count=8",
                  "data.val_count=2")
    check_values(cfg)
    # Each preset picks its optimizer: 8-bit AdamW where memory is short.
    assert cfg.optimizer._target_.endswith("adamw8bit" if preset != "vram_80gb" else "AdamW")
    assert (cfg.trainer.batch_size, cfg.trainer.grad_accum, cfg.trainer.mixed_precision) == (batch, accum, "bf16")
    family = instantiate(OmegaConf.to_container(cfg.model, resolve=True), _convert_="all").to(CPU, torch.bfloat16)
    assert family.unet.is_gradient_checkpointing == family.controlnet.is_gradient_checkpointing == checkpointing
    assert quantize.is_quantized(family.unet) == bool(quantized) and not quantize.is_quantized(family.controlnet)
    # Around int8 linear layers the frozen U-Net's convolutions and norms are bf16, as without quantisation.
    assert family.unet.conv_in.weight.dtype == family.unet.down_blocks[0].resnets[0].norm1.weight.dtype == torch.bfloat16
    data = build_dataset(cfg.data, "train")
    family.controlnet.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = family.loss("main", default_collate([data[i] for i in range(2)]), 0, rng(0))
    loss.backward()
    trainable = [p for g in family.param_groups()["main"] for p in g["params"]]
    assert torch.isfinite(loss) and all(p.grad is not None and p.dtype == torch.float32 for p in trainable)
    if not HAVE_8BIT and preset != "vram_80gb":  # 8-bit Adam on a machine without bitsandbytes and a GPU: one sentence
        with pytest.raises(GenlabError, match="optimizer=adamw8bit"):
            instantiate(cfg.optimizer)([{"params": trainable, "lr": 1e-4}])


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_quantized_base_is_smaller_and_close_to_the_full_one(base, scheme):
    torch.manual_seed(0)
    full = ControlNet(32, base=str(base), lora=dict(rank=0))
    torch.manual_seed(0)
    small = ControlNet(32, base=str(base), lora=dict(rank=0), quantize_base=scheme)
    linear = lambda net: sum(quantize.weight_bytes(m) for m in net.modules() if isinstance(m, torch.nn.Linear))  # noqa: E731
    assert linear(small.unet) < 0.3 * linear(full.unet)  # 1-byte values + a scale per row instead of fp32
    assert quantize.weight_bytes(small.unet) < quantize.weight_bytes(full.unet)
    # The ControlNet was copied from the full-precision U-Net, before quantisation.
    assert all(torch.equal(a, b) for a, b in zip(full.controlnet.state_dict().values(), small.controlnet.state_dict().values()))
    latents, t, text = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        ours, theirs = small.unet(latents, t, text).sample, full.unet(latents, t, text).sample
    assert 0 < (ours - theirs).abs().max() < 0.05 * theirs.abs().max()


def test_quantized_base_trains_resumes_bitwise_and_samples(base, tmp_path):
    def cfg_for(steps):
        return compose("model=controlnet", f"model.base={base}", "model.lora.rank=4", "trainer.quantize_base=int8",
                       "data=fill_circles", "data.count=16", "data.val_count=2", "trainer=debug", "logger=none",
                       "trainer.batch_size=2", "trainer.grad_accum=2", f"trainer.max_steps={steps}",
                       "trainer.sample_every=0", "model.sample_steps=2", "trainer.checkpoint_every=1",
                       "trainer.keep_checkpoints=null")

    straight, resumed = _straight_and_resumed(tmp_path, cfg_for, 1)
    assert _losses(straight) == _losses(resumed)
    _assert_identical(straight, resumed)
    (straight / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(cfg_for(2), straight / ".hydra" / "config.yaml")
    family, _ = load_family(straight, "latest")
    assert quantize.is_quantized(family.unet)
    assert type(family.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q).__name__ == "TorchaoLoraLinear"
    assert torch.isfinite(family.sample(1, seed=0, steps=2)).all()


def test_quantize_base_says_what_is_missing_or_wrong(base, monkeypatch):
    with pytest.raises(ConfigError, match="model.quantize_base='nf4': use null, int8, fp8, int4"):
        quantize.quantize_frozen(torch.nn.Linear(2, 2), "nf4")
    with pytest.raises(ConfigError, match="set model.lora.variant=lora, not dora"):
        ControlNet(32, base=str(base), lora=dict(rank=4, variant="dora"), quantize_base="int8")
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # as if torchao were not installed
    with pytest.raises(GenlabError, match=r"needs torchao: `pip install torchao`"):
        quantize.quantize_frozen(torch.nn.Linear(2, 2), "int8")


def test_an_offloaded_unet_gives_the_same_loss_and_gradients(base):
    """model.offload_base=cpu on an SD base: the frozen U-Net's blocks move in one at a time; nothing else changes."""
    from genlab.data.fill_circles import FillCircles

    data = FillCircles("train", image_size=32, count=4)
    batch = default_collate([data[i] for i in range(2)])
    runs = {}
    for mode in (None, "cpu"):
        torch.manual_seed(0)
        family = ControlNet(32, base=str(base), lora=dict(rank=0), offload_base=mode).to(CPU)
        loss, _ = family.loss("main", batch, 0, rng(0))
        loss.backward()
        runs[mode] = (loss.detach(), [p.grad for p in family.controlnet.parameters() if p.grad is not None])
        assert offload.is_offloaded(family.unet) == (mode == "cpu")
    assert torch.equal(runs[None][0], runs["cpu"][0]) and len(runs["cpu"][1]) > 0
    assert all(torch.equal(a, b) for a, b in zip(runs[None][1], runs["cpu"][1]))
    with pytest.raises(ConfigError, match="two answers to the same problem"):
        ControlNet(32, base=str(base), lora=dict(rank=0), offload_base="cpu", quantize_base="int8")
