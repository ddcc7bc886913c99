"""The offline CLIP tokenizer matches open_clip's own, and tiny text encoders encode prompts."""

import open_clip
import pytest
import torch
from transformers import CLIPTokenizer

from genlab.text import BOS_ID, EOS_ID, VOCAB_SIZE, clip_tokenizer, tiny_text_encoder

PROMPTS = ["a red circle on a blue background", "Hello, World!! it's 2024", "naïve café  über\ttabs", ""]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return clip_tokenizer(tmp_path_factory.mktemp("tok"))


def test_vocabulary_and_special_tokens(tokenizer):
    assert len(tokenizer) == VOCAB_SIZE and tokenizer.model_max_length == 77
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (BOS_ID, EOS_ID, EOS_ID)
    # Ids known from SD 1.5's tokenizer.
    assert tokenizer("a red circle").input_ids == [BOS_ID, 320, 736, 7117, EOS_ID]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_same_ids_as_open_clip(tokenizer, prompt):
    ours = tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    theirs = open_clip.tokenize([prompt])[0].tolist()
    n = sum(1 for t in theirs if t)  # open_clip pads with 0, SD's tokenizer with EOS
    assert ours[:n] == theirs[:n] and set(ours[n:]) <= {EOS_ID} and len(ours) == 77


def test_long_prompts_truncate_with_eos(tokenizer):
    ids = tokenizer("circle " * 200, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and ids[0] == BOS_ID and ids[-1] == EOS_ID


def test_cached_tokenizer_reloads(tokenizer, tmp_path):
    first = clip_tokenizer(tmp_path / "t")
    assert (tmp_path / "t" / "tokenizer_config.json").exists()
    again = CLIPTokenizer.from_pretrained(tmp_path / "t")
    assert again(PROMPTS[0]).input_ids == first(PROMPTS[0]).input_ids == tokenizer(PROMPTS[0]).input_ids


def test_tiny_text_encoder_tells_prompts_apart(tokenizer):
    torch.manual_seed(0)
    model = tiny_text_encoder(hidden_size=32, num_layers=2).eval()
    ids = tokenizer(["a red circle", "a blue circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(ids)
    assert out.last_hidden_state.shape == (2, 77, 32)
    assert not torch.allclose(out.last_hidden_state[0], out.last_hidden_state[1])
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
