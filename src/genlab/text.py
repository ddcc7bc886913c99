"""Text for Stable Diffusion offline: a real CLIP tokenizer and tiny CLIP text encoders.

The open-clip-torch wheel ships OpenAI's CLIP BPE merges (`bpe_simple_vocab_16e6.txt.gz`).
Rebuilt the way open_clip's `SimpleTokenizer` builds it (256 byte tokens, the same with
`</w>`, 48,894 merges, start and end tokens) it is exactly the 49,408-token vocabulary of
SD 1.5's tokenizer, so prompts tokenize the same as with the hub's `openai/clip-vit-large-patch14`.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from genlab.config import cache_root, save_to_cache

VOCAB_SIZE = 49408
BOS_ID, EOS_ID = 49406, 49407


@lru_cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_tokens() -> list[str]:
    """The 256 byte-level BPE tokens (GPT-2's, CLIP's, Qwen's first 256), in byte order."""
    return [_bytes_to_unicode()[b] for b in range(256)]


def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    # As open_clip's SimpleTokenizer: skip the version line, keep the first 48,894 merges.
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    tokens = list(_bytes_to_unicode().values())
    tokens += [t + "</w>" for t in tokens]
    tokens += ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer(cache_dir: str | Path | None = None) -> CLIPTokenizer:
    """The CLIP tokenizer (77 tokens, padded with <|endoftext|>), built offline once and cached.

    Args:
        cache_dir: where the saved tokenizer lives (default: clip_tokenizer/ in `genlab.config.cache_root()`).

    Returns:
        A transformers `CLIPTokenizer`; `save_pretrained` it next to a model to ship it.
    """
    target = Path(cache_dir) if cache_dir is not None else cache_root() / "clip_tokenizer"
    if not (target / "tokenizer_config.json").exists():
        vocab, merges = _vocab_and_merges()
        tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
        save_to_cache(target, tokenizer.save_pretrained)
    return CLIPTokenizer.from_pretrained(target)


def tiny_text_config(hidden_size: int = 32, num_layers: int = 2, num_heads: int = 4, intermediate_size: int = 64,
                     max_length: int = 77) -> CLIPTextConfig:
    """A small CLIP text encoder config over the full CLIP vocabulary (for tests and offline runs)."""
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_length,
        projection_dim=hidden_size,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,  # the pooled output is read at the first EOS token
        pad_token_id=EOS_ID,
    )


def tiny_text_encoder(**kwargs) -> CLIPTextModel:
    """`CLIPTextModel(tiny_text_config(**kwargs))`, randomly initialised."""
    return CLIPTextModel(tiny_text_config(**kwargs))
