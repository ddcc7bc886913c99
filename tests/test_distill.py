"""model=distill: a few-step student of a finished genlab flow run (reflow), through the family and the CLI.

The teacher is a 2-step tiny flow run; the student starts as its EMA weights, learns the straight line
between each noise and the teacher's image from that noise, samples at 1/2/4 Euler steps, resumes
bitwise, and exports what the teacher exports (loadable in plain diffusers, the same images).
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel
from safetensors.torch import load_file

from conftest import TINY_DDPM, cli, compose
from genlab.errors import GenlabError
from genlab.families.distill import Distill
from genlab.run_dir import load_family
from genlab.step_random import StepRandom
from test_resume_exact import _assert_resume_is_bitwise

pytestmark = pytest.mark.usefixtures("one_thread")

TEACHER = [*TINY_DDPM, "model.objective=flow", "model.conditional=true", "model.guidance=2.0",
           "model.sample_steps=2", "trainer.max_steps=2", "trainer.sample_every=0", "trainer.ema=0.9"]
STUDENT = ["model=distill", "trainer=debug", "logger=none", "data.image_size=8", "model.pool_size=16",
           "model.pool_batch=8", "trainer.sample_every=0"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    run = tmp_path_factory.mktemp("distill") / "teacher"
    cli("train", *TEACHER, f"hydra.run.dir={run}")
    return run


def student_of(teacher, **kw) -> Distill:
    return Distill(str(teacher), image_size=8, channels=1, pool_size=16, pool_batch=8, **kw)


def test_the_student_starts_as_the_teachers_ema_weights_and_the_teacher_is_frozen(teacher):
    family = student_of(teacher)
    ema = load_family(teacher, use_ema=True, device="cpu")[0].denoiser.state_dict()
    assert all(torch.equal(v, ema[k]) for k, v in family.student.denoiser.state_dict().items())
    raw = load_file(sorted((teacher / "checkpoints").iterdir())[-1] / "unet.safetensors")
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)  # the EMA weights, not the raw ones
    assert all(p.requires_grad for p in family.student.denoiser.parameters())
    assert not any(p.requires_grad for p in family.teacher.denoiser.parameters())
    assert family.student.denoiser is not family.teacher.denoiser


@pytest.mark.parametrize("pool_size", [16, 0])
def test_couplings_are_the_teachers_images_from_the_same_noise(teacher, pool_size):
    family = student_of(teacher, teacher_steps=2)
    family.pool_size = pool_size
    noise, images, labels = family.couplings(6, StepRandom(0, 3, "main", 0), torch.device("cpu"))
    assert labels is not None and labels.dtype == torch.long
    again = family.teacher.denoise(noise, labels, "euler", 2, 2.0)  # the teacher's sampler, steps and guidance
    assert torch.allclose(images, again, atol=1e-6)
    other = family.teacher.denoise(torch.randn_like(noise), labels, "euler", 2, 2.0)
    assert not torch.allclose(images, other, atol=1e-3)


def test_the_student_learns_each_coupling_with_its_class(teacher):
    """A conditional teacher's image of class k is the student's target given class k, not 'no class'."""
    family = student_of(teacher)
    seen = []
    hook = family.student.denoiser.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["class_labels"]), with_kwargs=True)
    batch = {"image": torch.zeros(6, 1, 8, 8)}
    family.loss("main", batch, 0, StepRandom(0, 0, "main", 0))
    hook.remove()
    labels = family.couplings(6, StepRandom(0, 0, "main", 0), torch.device("cpu"))[2]  # the same first draw
    assert torch.equal(seen[0], labels) and len(set(labels.tolist())) > 1


def test_the_straight_path_leads_from_the_image_to_its_noise():
    noise, image = torch.randn(3, 1, 4, 4), torch.rand(3, 1, 4, 4)
    s = torch.tensor([1.0, 0.5, 0.001])
    x_s, velocity = Distill.straight_path(noise, image, s)
    assert torch.allclose(x_s - s.view(-1, 1, 1, 1) * velocity, image, atol=1e-6)  # Euler from s to 0
    assert torch.allclose(x_s + (1 - s.view(-1, 1, 1, 1)) * velocity, noise, atol=1e-6)
    assert torch.equal(x_s[0], noise[0])


def test_noise_levels_favour_the_one_and_two_step_grid(teacher):
    family = student_of(teacher)
    s = family.noise_levels(4000, StepRandom(0, 0, "main", 0), torch.device("cpu"))
    assert 0 < s.min() and s.max() <= 1
    assert 0.25 < (s == 1.0).float().mean() < 0.35  # 0.5 x (1/3 + 1/6 + 1/12) of them at s = 1


def test_train_sample_at_1_2_4_steps_and_export_loads_in_diffusers(teacher, tmp_path):
    run = tmp_path / "student"
    cli("train", *STUDENT, f"model.teacher={teacher}", "trainer.max_steps=3", f"hydra.run.dir={run}")
    cfg = json.loads((run / "export" / "genlab_export.json").read_text())
    assert cfg["teacher"] == str(teacher) and cfg["couplings"]["guidance"] == 2.0
    for steps in (1, 2, 4):
        out = tmp_path / f"grid{steps}.png"
        cli("sample", run, "--n", "4", "--steps", str(steps), "--out", out)
        assert out.stat().st_size > 100
    refused = cli("sample", run, "--n", "4", "--guidance", "3", check=False)
    assert refused.returncode == 1 and "built in" in refused.stdout + refused.stderr

    family = load_family(run, device="cpu")[0]
    unet = UNet2DModel.from_pretrained(run / "export" / "unet")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(run / "export" / "scheduler")
    for steps in (1, 2):
        ours = family.sample(4, seed=5, steps=steps)
        scheduler.set_timesteps(steps)
        x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(5))
        labels = torch.arange(4)  # genlab cycles the classes; no guidance on top of the student's own
        with torch.no_grad():
            for t in scheduler.timesteps:
                x = scheduler.step(unet(x, t.expand(4), class_labels=labels).sample, t, x).prev_sample
        assert torch.allclose(ours, x.clamp(-1, 1), atol=1e-5)
        assert ours.std() > 0.01


def test_resume_is_bitwise(teacher, tmp_path):
    def cfg_for(steps):
        return compose(*STUDENT, f"model.teacher={teacher}", f"trainer.max_steps={steps}", "trainer.ema=0.9",
                       "trainer.checkpoint_every=2", "trainer.keep_checkpoints=null", "trainer.grad_accum=2")

    _assert_resume_is_bitwise(tmp_path, cfg_for, 2)


def test_a_bad_teacher_is_one_sentence(tmp_path, tiny_ddpm_run):
    for i, (teacher, says) in enumerate([(tmp_path / "nowhere", "does not exist"),
                                         (tiny_ddpm_run, "trained with objective epsilon")]):
        result = cli("train", *STUDENT, f"model.teacher={teacher}", f"hydra.run.dir={tmp_path / str(i)}", check=False)
        error = [line for line in (result.stdout + result.stderr).splitlines() if "model.teacher=" in line]
        assert result.returncode != 0 and len(error) == 1, result.stdout + result.stderr
        assert f"model.teacher={teacher}" in error[0] and says in error[0], error[0]
        assert not re.search(r"\.\s+[A-Z]", error[0]) and "Traceback" not in result.stdout + result.stderr
    with pytest.raises(GenlabError, match="is not a genlab run to distil"):
        student_of(tmp_path)


# ---- method=lcm: consistency distillation of a DDPM-objective (epsilon) teacher -------------------
def test_lcm_student_samples_with_lcmscheduler_and_exports_a_ddpm_pipeline(tiny_ddpm_run, tmp_path):
    from diffusers import DDPMPipeline, LCMScheduler

    run = tmp_path / "lcm"
    cli("train", *STUDENT, "model.method=lcm", f"model.teacher={tiny_ddpm_run}", "trainer.max_steps=3",
        f"hydra.run.dir={run}")
    family = load_family(run, device="cpu")[0]
    pipe = DDPMPipeline.from_pretrained(run / "export")
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, LCMScheduler)
    for steps in (1, 2, 4):
        ours = (family.sample(3, seed=7, steps=steps) + 1) / 2
        theirs = pipe(batch_size=3, generator=torch.Generator().manual_seed(7), num_inference_steps=steps,
                      output_type="np").images
        assert torch.allclose(ours.permute(0, 2, 3, 1), torch.from_numpy(theirs), atol=1e-5)
        assert ours.std() > 0.01
    refused = cli("sample", run, "--n", "2", "--sampler", "ddim", check=False)
    assert refused.returncode == 1 and "samples with lcm only" in refused.stdout + refused.stderr


def test_lcm_consistency_function_and_teacher_step(tiny_ddpm_run):
    family = Distill(str(tiny_ddpm_run), image_size=8, channels=1, method="lcm")
    x = torch.randn(3, 1, 8, 8)
    zero, t = torch.zeros(3, dtype=torch.long), torch.tensor([19, 499, 999])
    assert torch.allclose(family.consistency(x, zero, None), x, atol=1e-6)  # the boundary: f(x, 0) = x
    assert torch.allclose(family.teacher_step(x, t, t, None), x, atol=1e-4)  # a DDIM step to where it is
    prev = family.teacher_step(x, t, t - 20, None)
    assert not torch.allclose(prev, x, atol=1e-3)
    # The target is the student one teacher step on, so the loss is not 0 for the student as it starts.
    loss, _ = family.loss("main", {"image": torch.rand(4, 1, 8, 8) * 2 - 1}, 0, StepRandom(0, 0, "main", 0))
    assert loss > 1e-6
    ema = load_family(tiny_ddpm_run, use_ema=True, device="cpu")[0].denoiser.state_dict()
    assert all(torch.equal(v, ema[k]) for k, v in family.student.denoiser.state_dict().items())


@pytest.mark.parametrize("method", ["lcm"])
def test_lcm_resume_is_bitwise(tiny_ddpm_run, tmp_path, method):
    def cfg_for(steps):
        return compose(*STUDENT, f"model.method={method}", f"model.teacher={tiny_ddpm_run}",
                       f"trainer.max_steps={steps}", "trainer.ema=0.9", "trainer.checkpoint_every=2",
                       "trainer.keep_checkpoints=null", "trainer.grad_accum=2")

    _assert_resume_is_bitwise(tmp_path, cfg_for, 2)


def test_lcm_refuses_a_flow_teacher(teacher):
    with pytest.raises(GenlabError, match="objective flow; model.method=lcm needs a teacher of objective "
                                          "epsilon / v / x0: use model.method=reflow"):
        Distill(str(teacher), image_size=8, channels=1, method="lcm")


@pytest.mark.parametrize("objective", ["epsilon", "v", "x0"])
def test_image_and_noise_inverts_each_objective(objective):
    from genlab.families.consistency import image_and_noise

    x0, noise, alphas = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4), torch.tensor([0.9, 0.5, 0.01]).view(-1, 1, 1, 1)
    a, b = alphas.sqrt(), (1 - alphas).sqrt()
    out = {"epsilon": noise, "v": a * noise - b * x0, "x0": x0}[objective]  # diffusers' targets
    image, found = image_and_noise(objective, alphas, out, a * x0 + b * noise)
    assert torch.allclose(image, x0, atol=1e-4) and torch.allclose(found, noise, atol=1e-4)


# ---- LCM-LoRA: model.lora_rank > 0 on an SD-style base --------------------------------------------
def test_lcm_lora_of_an_sd_base_loads_with_load_lora_weights_and_samples_the_same(tmp_path):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from genlab.families import latent_diffusion as ld
    from tiny_bases import tiny_sd_export

    base = tiny_sd_export(tmp_path / "base")
    run = tmp_path / "lcm_lora"
    cli("train", "model=distill", "model.lora_rank=4", f"model.teacher={base}", "data=fill_circles", "data.count=16",
        "data.val_count=4", "trainer=debug", "logger=none", "trainer.batch_size=4", "trainer.max_steps=2",
        "trainer.sample_every=0", "trainer.lr=1e-2", f"hydra.run.dir={run}")
    assert (run / "export" / "pytorch_lora_weights.safetensors").exists()
    family = load_family(run, device="cpu")[0]
    prompt = "a red circle on a blue background"
    ours = family.sample(2, seed=3, prompt=prompt, steps=2)

    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)

    def plain():
        return pipe([prompt] * 2, height=32, width=32, num_inference_steps=2, guidance_scale=1.0,
                    generator=ld.generators(2, 3), output_type="pt").images * 2 - 1

    without_lora = plain()
    pipe.load_lora_weights(run / "export")
    theirs = plain()
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert (theirs - without_lora).abs().max() > 1e-4  # the LoRA was trained and is what loads
    for steps in (1, 4):
        assert family.sample(1, seed=0, prompt=prompt, steps=steps).shape == (1, 3, 32, 32)


def test_lcm_lora_teacher_is_the_base_with_its_guidance(tmp_path):
    from diffusers import UNet2DConditionModel

    from genlab.families.consistency import ddim_step
    from genlab.families.distill import distill
    from tiny_bases import tiny_sd_export

    base = tiny_sd_export(tmp_path / "base")
    family = distill(str(base), lora_rank=4, image_size=32, channels=3, guidance=3.0)
    with torch.no_grad():  # a trained LoRA: the student is no longer the base
        for name, p in family.unet.named_parameters():
            if "lora_B" in name:
                p.add_(0.1 * torch.randn_like(p))
    x, t, t_prev = torch.randn(2, 4, 8, 8), torch.tensor([499, 19]), torch.tensor([479, 0])
    text, empty = torch.randn(2, 77, 32), torch.randn(2, 77, 32)
    plain = UNet2DConditionModel.from_pretrained(base / "unet")
    with torch.no_grad():
        cond, uncond = (plain(x, t, encoder_hidden_states=e).sample for e in (text, empty))
    expected = ddim_step(family.diffusion.scheduler.alphas_cumprod, "epsilon", uncond + 3.0 * (cond - uncond), x, t, t_prev)
    assert torch.allclose(family.teacher_step(x, t, t_prev, text, empty), expected, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(family.unet(x, t, encoder_hidden_states=text).sample, cond, atol=1e-4)


def test_cards_say_what_each_export_is():
    assert "LCMScheduler" in Distill.card_for({"lora_rank": 4, "teacher": "SD"}).use
    flow = Distill.card_for({"method": "reflow"}, {"teacher_model": {"backbone": "unet", "conditional": True}})
    assert "DDPMPipeline" in flow.use and any("1-4 sampling steps" in n for n in flow.notes)
