"""Cached VAE posteriors and text embeddings: same draws as encoding, encoders run once, keyed by weights."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL
from transformers import CLIPTextModel

from conftest import rng
from genlab.data.latent_cache import cached_or_encoded_latents, cached_or_encoded_text, cached_posteriors
from genlab.text import clip_tokenizer, tiny_text_config

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_vae(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                         layers_per_block=1, sample_size=16).eval().requires_grad_(False)


class CountingEncoder:
    """Counts how many images go through `encode`."""

    def __init__(self, vae):
        self.vae, self.images = vae, 0
        self.device, self.dtype, self.config = vae.device, vae.dtype, vae.config

    def encode(self, x):
        self.images += len(x)
        return self.vae.encode(x)

    def state_dict(self):
        return self.vae.state_dict()


def test_cached_latents_are_the_encoded_ones_and_the_vae_runs_once_per_image(tmp_path):
    vae = CountingEncoder(tiny_vae(0))
    images = torch.rand(6, 3, 16, 16) * 2 - 1
    plain = cached_or_encoded_latents({"image": images}, vae, rng(3))
    assert vae.images == 6
    cached = {"image": images, "latent_cache": str(tmp_path)}
    first = cached_or_encoded_latents(cached, vae, rng(3))
    assert vae.images == 12 and torch.equal(first, plain)  # same posterior, same draw from the step's RNG
    again = cached_or_encoded_latents({"image": images[[5, 0]], "latent_cache": str(tmp_path)}, vae, rng(4))
    assert vae.images == 12  # read back: the VAE did not run
    expect = cached_or_encoded_latents({"image": images[[5, 0]]}, vae, rng(4))
    torch.testing.assert_close(again, expect, atol=1e-6, rtol=1e-5)
    flipped = cached_or_encoded_latents({"image": images.flip(-1), "latent_cache": str(tmp_path)}, vae, rng(3))
    assert vae.images == 12 + 2 + 6 and not torch.equal(flipped, first)  # another augmentation, another entry


def test_the_cache_is_invalidated_when_the_base_changes(tmp_path):
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    a, b = CountingEncoder(tiny_vae(0)), CountingEncoder(tiny_vae(1))
    mean_a, _ = cached_posteriors(a, images, tmp_path)
    mean_b, _ = cached_posteriors(b, images, tmp_path)
    assert b.images == 4 and not torch.allclose(mean_a, mean_b)  # the new base encodes; its entries are its own
    torch.testing.assert_close(mean_b, b.vae.encode(images).latent_dist.mean)
    assert len(list(tmp_path.glob("vae-*"))) == 2
    with torch.no_grad():
        b.vae.encoder.conv_in.weight[0, 0, 0, 0] += 1e-3  # the same module with a changed weight
    c = CountingEncoder(b.vae)
    cached_posteriors(c, images, tmp_path)
    assert len(list(tmp_path.glob("vae-*"))) == 3 and c.images == 4


def test_text_embeddings_cached_only_for_a_frozen_encoder(tmp_path, monkeypatch):
    from genlab.data import latent_cache

    tokenizer = clip_tokenizer(str(tmp_path / "tok"))
    torch.manual_seed(0)
    encoder = CLIPTextModel(tiny_text_config(hidden_size=32)).eval().requires_grad_(False)
    calls = []
    real = latent_cache.encode_text
    monkeypatch.setattr(latent_cache, "encode_text", lambda t, e, c: calls.append(list(c)) or real(t, e, c))
    batch = {"latent_cache": str(tmp_path / "cache")}
    captions = ["a red circle", "", "a red circle"]
    with torch.no_grad():
        expect = real(tokenizer, encoder, captions)
        first = cached_or_encoded_text(batch, captions, tokenizer, encoder)
        latent_cache._TEXT_MEMORY.clear()  # from disk this time
        second = cached_or_encoded_text(batch, ["", "a red circle"], tokenizer, encoder)
    assert calls == [["a red circle", ""]]  # each caption once, then never again
    torch.testing.assert_close(first, expect)
    assert torch.equal(second, first[[1, 0]])
    encoder.requires_grad_(True)  # a text encoder that trains is never cached
    out = cached_or_encoded_text(batch, captions, tokenizer, encoder)
    assert len(calls) == 2 and out.requires_grad


from test_resume_sd import cn_config, sd_config, sd_run, train, vae_run  # noqa: E402,F401  (fixtures)
from test_resume_exact import _losses  # noqa: E402


def test_controlnet_trains_the_same_from_the_cache(tmp_path, sd_run):
    """The loop with data.cache_latents: a cold cache (filled as it goes) and a warm one (read back)
    give the same losses, those of encoding every batch up to float rounding (the encoders see
    other batch compositions: only the missing images, each caption once)."""
    cache = ["data.cache_latents=true", f"data.latent_cache_dir={tmp_path / 'cache'}"]
    runs = {}
    for name, extra in (("plain", []), ("cold", cache), ("warm", cache)):
        train(cn_config(sd_run, 3, "trainer.log_every=1", *extra), tmp_path / name)
        runs[name] = [row["loss"] for row in _losses(tmp_path / name)]
    assert runs["cold"] == runs["warm"] and runs["plain"] == pytest.approx(runs["cold"], rel=1e-5)
    assert len(list((tmp_path / "cache").glob("vae-*/*/*.safetensors"))) == 3 * 2 * 4  # steps x accum x batch
    assert len(list((tmp_path / "cache").glob("text-*/*/*.safetensors"))) >= 2


def test_a_batch_holds_only_declared_keys(tmp_path):
    """What the batch stream adds to the items (the cache folder) is a declared batch key, with its meaning."""
    from genlab.data import BATCH_KEYS
    from genlab.data.batches import BatchOrder, BatchStream
    from genlab.data.fill_circles import FillCircles

    dataset = FillCircles("train", image_size=16, count=8)
    stream = BatchStream(dataset, BatchOrder(len(dataset), 4, seed=0), latent_cache=str(tmp_path))
    batch = next(stream)
    assert batch["latent_cache"] == str(tmp_path)
    assert set(batch) - set(dataset.item_keys) <= set(BATCH_KEYS)
    assert set(BATCH_KEYS) - {"label"} <= set(batch)  # fill_circles has no classes
