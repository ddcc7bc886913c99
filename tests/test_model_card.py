"""Model cards (export/README.md) and `genlab push`, offline: the Hub's upload calls are replaced."""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import cli, genlab

from genlab.model_card import metadata, write_model_card
from genlab.run_dir import RunDir


@pytest.fixture
def run(tiny_ddpm_run, tmp_path) -> RunDir:
    """A private copy of the tiny DDPM run (these tests rewrite its card and eval)."""
    copy = tmp_path / "run"
    shutil.copytree(tiny_ddpm_run, copy, ignore=shutil.ignore_patterns(".lock"))
    return RunDir(copy)


def test_training_writes_a_card_hub_can_parse(tiny_ddpm_run):
    from huggingface_hub import ModelCard

    card = ModelCard.load(tiny_ddpm_run / "export" / "README.md")
    assert card.data.to_dict() == {"library_name": "diffusers", "pipeline_tag": "unconditional-image-generation",
                                   "license": "apache-2.0", "tags": ["genlab", "diffusers", "ddpm", "diffusers:DDPMPipeline"]}
    assert "genlab train trainer=debug logger=none" in card.text  # the command
    assert "data=digits" in card.text and "scikit-learn's bundled digits" in card.text  # the training data
    assert "\n    block_out_channels: [16, 16]\n" in card.text  # the config (model.unet)
    assert "![Samples from the final weights, fixed noise](samples.png)" in card.text
    assert (tiny_ddpm_run / "export" / "samples.png").read_bytes() == (tiny_ddpm_run / "samples" / "final.png").read_bytes()
    assert "Not evaluated yet" in card.text


def card_metrics(run: RunDir) -> dict[str, float]:
    """The metrics table of the run's model card, as numbers."""
    from huggingface_hub import ModelCard

    text = ModelCard.load(run.export / "README.md").text
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| ") and "metric" not in line]
    return {k.strip(): float(v) for k, v in rows}


def eval_metrics(run: RunDir) -> dict[str, float]:
    metrics = json.loads((run.eval_dir / "metrics.json").read_text())
    return {k: v for k, v in metrics.items() if isinstance(v, float) and k != "seconds"}


def test_eval_command_refreshes_the_card(run, monkeypatch):
    """`genlab eval` rewrites the card; the evaluator itself is replaced (its real run is the slow test below)."""
    from genlab.eval.evaluate import Evaluator
    from genlab.eval.command import eval_command

    monkeypatch.setattr(Evaluator, "__init__", lambda self, cfg, device: None)
    monkeypatch.setattr(Evaluator, "evaluate", lambda self, family, n_samples=None: {"fid_digits_cnn": 12.3456789,
                                                                                      "precision": 0.5, "recall": 0.25})
    eval_command(run.path, n=4)
    assert card_metrics(run) == pytest.approx(eval_metrics(run), rel=1e-5) == {"fid_digits_cnn": 12.3456789,
                                                                               "precision": 0.5, "recall": 0.25}


@pytest.mark.slow
def test_real_eval_refreshes_the_card_with_its_metrics(run):
    genlab("eval", str(run.path), "--n", "16")
    assert len(eval_metrics(run)) >= 3
    assert card_metrics(run) == pytest.approx(eval_metrics(run), rel=1e-5)


def test_metadata_per_family():
    cn = {"model": {"_target_": "genlab.families.controlnet.ControlNet", "base": "stable-diffusion-v1-5/stable-diffusion-v1-5",
                    "lora": {"rank": 4}}, "card": {"license": "creativeml-openrail-m", "tags": ["sketch"]}}
    assert metadata(cn, "fill_circles") == {
        "library_name": "diffusers", "pipeline_tag": "text-to-image", "base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "license": "creativeml-openrail-m", "tags": ["genlab", "diffusers", "controlnet", "stable-diffusion", "text-to-image",
                                                     "diffusers:StableDiffusionControlNetPipeline", "lora", "sketch"]}
    local_sd = {"model": {"_target_": "genlab.families.sd.StableDiffusion", "base": "/nonexistent/runs/sd", "lora": {"rank": 0}},
                "data": {"name": "user/captions"}}
    meta = metadata(local_sd, "hf")
    assert "base_model" not in meta and meta["license"] == "other"  # a local base is no Hub id; its terms apply
    assert meta["pipeline_tag"] == "text-to-image" and meta["datasets"] == ["user/captions"]
    gan = metadata({"model": {"_target_": "genlab.families.gan.GAN"}}, "digits")
    assert "library_name" not in gan and gan["pipeline_tag"] == "unconditional-image-generation"
    vae = metadata({"model": {"_target_": "genlab.families.vae.VAE"}}, "digits")
    assert vae["library_name"] == "diffusers" and "pipeline_tag" not in vae


def test_push_sends_the_export_with_its_card(run, monkeypatch):
    from huggingface_hub import HfApi, ModelCard

    sent = {}
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_not_real")
    def create_repo(self, repo_id, **kw):
        sent["repo"] = (repo_id, kw)
        return f"https://huggingface.co/{repo_id}"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)

    def upload_folder(self, *, repo_id, folder_path, ignore_patterns=(), **kw):
        files = {p.relative_to(folder_path).as_posix(): p.read_bytes() for p in Path(folder_path).rglob("*") if p.is_file()}
        sent["files"] = {name: data for name, data in files.items()
                         if not any(fnmatch.fnmatch(part, pattern) for part in name.split("/") for pattern in ignore_patterns)}
        sent["upload"] = (repo_id, kw)

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    (run.export / ".README.md.123.tmp").write_text("half a card")  # an interrupted write is never sent
    from genlab.push import push_export

    url = push_export(run.path, "someone/ddpm-digits", private=True)
    assert url == "https://huggingface.co/someone/ddpm-digits"
    assert sent["repo"] == ("someone/ddpm-digits", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert set(sent["files"]) == {"README.md", "samples.png", "model_index.json", "scheduler/scheduler_config.json",
                                  "unet/config.json", "unet/diffusion_pytorch_model.safetensors"}
    card = ModelCard(sent["files"]["README.md"].decode())
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert 'DDPMPipeline.from_pretrained("someone/ddpm-digits")' in card.text  # the snippet loads from the Hub


def test_push_without_login_says_how(run, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", "")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    result = cli("push", str(run.path), "--repo", "someone/x", check=False)  # in this process: no 8 s start-up
    assert result.returncode == 1 and "huggingface-cli login" in result.stderr and "Traceback" not in result.stderr


def test_push_in_offline_mode_says_so(run, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_not_real")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    from genlab.errors import GenlabError
    from genlab.push import push_export

    with pytest.raises(GenlabError, match="HF_HUB_OFFLINE=1 is set"):
        push_export(run.path, "someone/x")


def test_card_needs_an_export(tmp_path):
    from genlab.errors import GenlabError

    run = RunDir(tmp_path)
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"model": {}, "trainer": {}}))
    with pytest.raises(GenlabError, match="has no export/ yet"):
        write_model_card(run)


@pytest.mark.parametrize("scheduler", ["FlowMatchEulerDiscreteScheduler", "DDPMScheduler"])
def test_controlnet_card_on_a_flow_sd_base_sets_the_scheduler_lines(tmp_path, scheduler):
    """A ControlNet on a `model=sd model.objective=flow` base: its snippet sets what the flow SD card sets."""
    base = tmp_path / "base"  # what a flow SD export has that the card reads: the pipeline class and scheduler
    (base / "scheduler").mkdir(parents=True)
    (base / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (base / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": scheduler}))
    run = RunDir(tmp_path / "run")
    (run.path / ".hydra").mkdir(parents=True)
    (run.path / "export").mkdir()
    (run.path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(
        {"model": {"_target_": "genlab.families.controlnet.ControlNet", "base": str(base)}, "trainer": {}}))
    text = write_model_card(run).read_text()
    snippet = text.split("```python")[1].split("```")[0]
    assert "StableDiffusionControlNetPipeline.from_pretrained" in snippet
    lines = ["pipe.scheduler.init_noise_sigma = 1.0", "pipe.scheduler.scale_model_input = lambda sample, timestep: sample"]
    assert all((line in snippet) == scheduler.startswith("FlowMatch") for line in lines)


# Per base kind: the Hub tag of the base, the pipeline and ControlNet classes, the base's name, its denoiser.
CONTROLNET_CARDS = {
    "sd": ("stable-diffusion", "StableDiffusionControlNetPipeline", "ControlNetModel", "Stable Diffusion 1.x/2.x", "U-Net"),
    "sdxl": ("stable-diffusion-xl", "StableDiffusionXLControlNetPipeline", "ControlNetModel", "SDXL", "U-Net"),
    "sd3": ("sd3", "StableDiffusion3ControlNetPipeline", "SD3ControlNetModel", "SD3.x", "transformer"),
    "flux": ("flux", "FluxControlNetPipeline", "FluxControlNetModel", "Flux", "transformer"),
}


@pytest.mark.parametrize("kind", sorted(CONTROLNET_CARDS))
def test_controlnet_card_is_tagged_by_its_base_kind(tmp_path, kind):
    """A ControlNet's card names the base kind it was trained on: Hub tags, pipeline tag, what it is, how to load it."""
    from huggingface_hub import ModelCard

    from genlab.families import stand_ins
    from tiny_bases import tiny_sd_export

    tag, pipeline, controlnet, name, denoiser = CONTROLNET_CARDS[kind]
    if kind == "sd":
        base = tiny_sd_export(tmp_path)
    else:
        base = getattr(stand_ins, f"save_{kind}")(tmp_path / "base", tokenizer_dir=str(tmp_path / "tok"))
    run = RunDir(tmp_path / "run")
    (run.path / ".hydra").mkdir(parents=True)
    (run.path / "export").mkdir()
    config = {"model": {"_target_": "genlab.families.controlnet.ControlNet", "base": str(base), "lora": {"rank": 4}},
              "trainer": {}}
    (run.path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    card = ModelCard.load(write_model_card(run))  # no genlab_export.json: the kind is read from model.base
    assert card.data.tags == ["genlab", "diffusers", "controlnet", tag, "text-to-image", f"diffusers:{pipeline}", "lora"]
    assert card.data.pipeline_tag == "text-to-image" and card.data.base_model is None  # a local base is no Hub id
    assert f"This is a ControlNet that makes its {name} base follow a sketch" in card.text
    assert f"plus the base {denoiser}'s LoRA in pytorch_lora_weights.safetensors" in card.text
    snippet = card.text.split("```python")[1].split("```")[0]
    assert f"from diffusers import {controlnet}, {pipeline}\n" in snippet
    assert f'{pipeline}.from_pretrained("{base}", controlnet=controlnet' in snippet
    assert ("control_image=sketch" in snippet) == (denoiser == "transformer")  # the flow pipelines' argument name

    # On a Hub base, what training exported (genlab_export.json) says which kind it is: nothing is downloaded.
    hub = {"model": {**config["model"], "base": "someone/a-base"}}
    meta = metadata(hub, "fill_circles", {"base_kind": kind, "base": "someone/a-base"})
    assert meta["base_model"] == "someone/a-base" and f"diffusers:{pipeline}" in meta["tags"] and tag in meta["tags"]


@pytest.mark.parametrize("kind, variant, file, loader", [
    ("sd3", "lora", "pytorch_lora_weights.safetensors", "pipe.load_lora_weights("),
    ("sd3", "dora", "pytorch_lora_weights.safetensors", "pipe.load_lora_weights("),
    ("sd3", "loha", "transformer_adapter/", "PeftModel.from_pretrained(pipe.transformer,"),
    ("flux", "lokr", "transformer_adapter/", "PeftModel.from_pretrained(pipe.transformer,"),
    ("sd", "lokr", "lora_kohya.safetensors", "diffusers cannot load it"),
    ("sd", "lora", None, None),  # rank 0: no adapter was trained, none is named or loaded
])
def test_controlnet_card_names_the_adapter_file_its_variant_exports(kind, variant, file, loader):
    """The card says where the base's adapter is and loads it the way its variant can be loaded (issue 15):
    LoHa/LoKr have no pytorch_lora_weights.safetensors, so load_lora_weights would fail on them."""
    from genlab.families.controlnet_card import controlnet_spec, controlnet_use

    lora = {"rank": 4 if file else 0, "variant": variant}
    config = {"model": {"base": "someone/a-base", "lora": lora}}
    what = controlnet_spec(kind, lora).what
    snippet = controlnet_use(config["model"], {"base_kind": kind, "base": "someone/a-base"}, "EXPORT")
    if file is None:
        assert "plus" not in what and "load_lora_weights" not in snippet and "PeftModel" not in snippet
        return
    assert file in what and ADAPTER_NAMES[variant] in what
    assert loader in snippet
    assert ("load_lora_weights" in snippet) == (variant in ("lora", "dora"))


ADAPTER_NAMES = {"lora": "LoRA", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr"}
