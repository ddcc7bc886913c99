"""One `unwrap` for every layer: DDP/Accelerate (`.module`) and torch.compile (`._orig_mod`), in either order."""

from __future__ import annotations

import torch
from torch import nn

from genlab.wrappers import unwrap


class Wrapped(nn.Module):
    """What DDP and Accelerate do to a network: hold it as `.module`."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module


def test_unwrap_sees_through_ddp_and_compile_in_either_order():
    net = nn.Linear(2, 2)
    compiled = torch.compile(net)  # wrapping only: nothing compiles until it is called
    assert unwrap(net) is net and unwrap(compiled) is net
    assert unwrap(Wrapped(compiled)) is net and unwrap(torch.compile(Wrapped(net))) is net


def test_cached_text_of_a_compiled_encoder_is_found_under_the_bare_weights(tmp_path, monkeypatch):
    """trainer.compile wraps a text encoder: its cached embeddings are those of the same weights, bare."""
    from collections import OrderedDict

    from transformers import CLIPTextModel

    from genlab.data import latent_cache
    from genlab.data.latent_cache import cached_or_encoded_text
    from genlab.text import clip_tokenizer, tiny_text_config

    monkeypatch.setattr(latent_cache, "_TEXT_MEMORY", OrderedDict())  # the process's memory of embeddings: this test's own

    torch.manual_seed(0)
    encoder = CLIPTextModel(tiny_text_config()).eval().requires_grad_(False)
    batch, captions = {"latent_cache": str(tmp_path)}, ["a red circle", "a blue square"]
    bare = cached_or_encoded_text(batch, captions, clip_tokenizer(), encoder)
    # No tokenizer: encoding again would fail, so the embeddings must come from the cache.
    assert torch.equal(cached_or_encoded_text(batch, captions, None, torch.compile(encoder)), bare)
