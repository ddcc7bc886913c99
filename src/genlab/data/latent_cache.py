"""Latents and text embeddings computed once by the frozen encoders of latent diffusion.

SD and ControlNet training run the frozen VAE encoder and text encoder on every batch; the
tools that train at scale (kohya-ss/sd-scripts, SimpleTuner, OneTrainer, EDM2) encode once
and train from the cache. With `data.cache_latents=true` the batch stream names a folder
in every batch ("latent_cache", declared in `genlab.data.BATCH_KEYS`) and the two functions
below, which the families call in place of encoding, keep there:

- per image, the VAE posterior (mean, std), not a sample: the latent of each step is
  still drawn as mean + std * noise from the step's StepRandom, exactly as without the
  cache. The entry is keyed by the image's pixels, so each augmentation (a flip, a
  crop) of an image gets its own entry and stays exact; nothing is fixed by caching.
- per caption, the text encoder's hidden states (only while the text encoder is frozen).

Entries live under `<folder>/<digest of the encoder's weights>/`, so another base or VAE
(or another dtype) never reads the old ones. Misses of a batch are encoded together and
the stored values are the ones used, so a run depends only on what the cache holds.
The VAE still sees each image the first time it appears, and the data loader still
decodes images; what the cache saves is every later encoder pass.
"""

from __future__ import annotations

import hashlib
import logging
import os
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from genlab.wrappers import unwrap

log = logging.getLogger(__name__)
_DIGESTS: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()
_TEXT_MEMORY: "OrderedDict[tuple[str, str], torch.Tensor]" = OrderedDict()  # recent captions, in memory too
TEXT_MEMORY_ITEMS = 1024


def weights_digest(module: nn.Module) -> str:
    """A short hash of every weight of `module` (names, dtypes, shapes, values), computed once per module."""
    if module not in _DIGESTS:
        h = hashlib.blake2b(digest_size=8)
        for name, tensor in module.state_dict().items():
            tensor = tensor.detach().cpu().contiguous()
            h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
            h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        _DIGESTS[module] = h.hexdigest()
    return _DIGESTS[module]


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # write then rename: a reader never sees half a file
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _load(path: Path, keys: tuple[str, ...]) -> dict[str, torch.Tensor] | None:
    """A cache entry, or None when it is missing or damaged (truncated, not safetensors, keys
    missing): a damaged entry is encoded again and rewritten, never the end of a run."""
    if not path.is_file():
        return None
    try:
        entry = load_file(str(path))
    except Exception:  # noqa: BLE001  (safetensors raises its own SafetensorError, or OSError)
        log.warning("latent cache entry %s is damaged; encoding it again", path)
        return None
    return entry if all(k in entry for k in keys) else None


@torch.no_grad()
def cached_posteriors(vae: nn.Module, images: torch.Tensor, folder: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE posterior of each image, (B, c, h, w) each, from the cache or encoded and stored."""
    root = Path(folder) / f"vae-{weights_digest(vae)}"
    pixels = images.detach().float().cpu().contiguous()
    keys = [hashlib.blake2b(f"{tuple(p.shape)}".encode() + p.numpy().tobytes(), digest_size=16).hexdigest()
            for p in pixels]
    paths = [root / k[:2] / f"{k}.safetensors" for k in keys]
    entries = {i: entry for i, p in enumerate(paths) if (entry := _load(p, ("mean", "std"))) is not None}
    missing = [i for i in range(len(paths)) if i not in entries]
    if missing:
        posterior = vae.encode(images[missing].to(vae.device, vae.dtype)).latent_dist
        for j, i in enumerate(missing):
            entries[i] = {"mean": posterior.mean[j].cpu(), "std": posterior.std[j].cpu()}
            _save(paths[i], entries[i])
    mean = torch.stack([entries[i]["mean"] for i in range(len(paths))]).to(vae.device)
    std = torch.stack([entries[i]["std"] for i in range(len(paths))]).to(vae.device)
    return mean, std


@torch.no_grad()
def cached_or_encoded_latents(batch: dict[str, Any], vae: nn.Module, rng: Any) -> torch.Tensor:
    """Scaled latents of `batch["image"]` (B, C, H, W) in [-1, 1] -> (B, c, H/f, W/f) float32:
    a posterior sample, drawn from `rng` (the step's StepRandom).

    The posterior comes from the cache when the batch names one ("latent_cache"), else from
    the VAE now; the draw is the same either way.
    """
    if batch.get("latent_cache"):
        mean, std = cached_posteriors(vae, batch["image"], batch["latent_cache"])
    else:
        posterior = vae.encode(batch["image"].to(vae.device, vae.dtype)).latent_dist
        mean, std = posterior.mean, posterior.std
    sample = mean + std * rng.randn_like(mean)
    return sample.float() * vae.config.scaling_factor


def encode_text(tokenizer: Any, text_encoder: nn.Module, captions: list[str]) -> torch.Tensor:
    """Captions -> the text encoder's last hidden states (B, 77, D), as SD pipelines compute them."""
    ids = tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids.to(unwrap(text_encoder).device))[0]


def cached_or_encoded_text(batch: dict[str, Any], captions: list[str], tokenizer: Any,
                           text_encoder: nn.Module) -> torch.Tensor:
    """Text embeddings (B, 77, D) of `captions` (after caption dropout): from the cache when
    the batch names one and the text encoder is frozen, else encoded now (with gradients when
    the encoder trains and grad mode is on)."""
    encoder = unwrap(text_encoder)  # DDP and torch.compile alike: the digest is of the bare weights
    if not batch.get("latent_cache") or any(p.requires_grad for p in encoder.parameters()):
        return encode_text(tokenizer, text_encoder, captions)
    digest = weights_digest(encoder)
    root = Path(batch["latent_cache"]) / f"text-{digest}"
    found: dict[str, torch.Tensor] = {}
    for caption in dict.fromkeys(captions):
        key = hashlib.blake2b(caption.encode("utf-8"), digest_size=16).hexdigest()
        path = root / key[:2] / f"{key}.safetensors"
        if (digest, caption) in _TEXT_MEMORY:
            _TEXT_MEMORY.move_to_end((digest, caption))
            found[caption] = _TEXT_MEMORY[(digest, caption)]
        elif (entry := _load(path, ("hidden",))) is not None:
            found[caption] = entry["hidden"]
    missing = [c for c in dict.fromkeys(captions) if c not in found]
    if missing:
        with torch.no_grad():
            hidden = encode_text(tokenizer, text_encoder, missing).cpu()
        for caption, h in zip(missing, hidden):
            found[caption] = h.clone()
            key = hashlib.blake2b(caption.encode("utf-8"), digest_size=16).hexdigest()
            _save(root / key[:2] / f"{key}.safetensors", {"hidden": found[caption]})
    for caption, h in found.items():
        _TEXT_MEMORY[(digest, caption)] = h
    while len(_TEXT_MEMORY) > TEXT_MEMORY_ITEMS:
        _TEXT_MEMORY.popitem(last=False)
    return torch.stack([found[c] for c in captions]).to(encoder.device)
