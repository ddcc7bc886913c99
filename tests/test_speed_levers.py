"""Speed levers change how fast batches and attention are computed, never what is computed."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils.data import Dataset

from genlab.data.batches import BatchOrder, BatchStream, loader_options
from genlab.data.digits import Digits
from genlab.errors import GenlabError


class _Pids(Dataset):
    """Items that say which process loaded them."""

    def __len__(self):
        return 12

    def __getitem__(self, i):
        return {"image": torch.full((1,), float(i)), "pid": os.getpid()}


@pytest.mark.parametrize("persistent", [True, False])
def test_persistent_workers_live_across_epochs_and_change_no_batch(persistent):
    order = BatchOrder(12, 4, seed=0)  # 3 batches per epoch
    stream = BatchStream(_Pids(), order, num_workers=2, persistent_workers=persistent, prefetch_factor=2)
    batches = [next(stream) for _ in range(6)]  # two epochs
    pids = [set(b["pid"].tolist()) for b in batches]
    first, second = set().union(*pids[:3]), set().union(*pids[3:])
    assert (first == second) == persistent
    reference = BatchStream(_Pids(), order)  # no workers
    for batch in batches:
        assert torch.equal(batch["image"], next(reference)["image"])


def test_digits_through_a_dataloader_equal_the_in_memory_batches():
    """data.on_device=false (per-item DataLoader) gives the very batches of on_device=true."""
    digits = Digits("train", image_size=8)
    order = BatchOrder(len(digits), 400, seed=3)  # 4 batches per epoch: crosses an epoch boundary
    options = loader_options({"num_workers": 0, "on_device": False}, torch.device("cpu"))
    assert options["pin_memory"] is False  # pinning only helps copies to a GPU
    indexed, loaded = BatchStream(digits, order), BatchStream(digits, order, **options)
    for _ in range(6):
        a, b = next(indexed), next(loaded)
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_ddpm_attention_sdpa_and_eager_agree():
    from genlab.families.ddpm import DDPM

    unet = dict(block_out_channels=[8, 8], down_block_types=["DownBlock2D", "AttnDownBlock2D"],
                up_block_types=["AttnUpBlock2D", "UpBlock2D"], norm_num_groups=4, attention_head_dim=8)
    outputs = {}
    for attention in ("sdpa", "eager"):
        torch.manual_seed(0)
        family = DDPM(8, 1, unet, attention=attention)
        outputs[attention] = family.unet(torch.ones(2, 1, 8, 8), torch.tensor([10, 500])).sample
    torch.testing.assert_close(outputs["sdpa"], outputs["eager"], atol=1e-5, rtol=1e-4)
    with pytest.raises(GenlabError, match="model.attention='flash'"):
        DDPM(8, 1, unet, attention="flash")
