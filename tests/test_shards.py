"""Streamed webdataset shards: packing, exact resume, disjoint readers, bad samples."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import toy_config
from genlab.data.batches import BatchStream, make_order
from genlab.data.pack import pack
from genlab.data.shards import Shards
from genlab.errors import GenlabError
from test_resume_exact import _assert_resume_is_bitwise


def _photos(folder, n, size=8, sketches=False):
    """n PNGs, each with a caption naming it; optionally a sketch (its own negative) via metadata.jsonl."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    rows = []
    for i in range(n):
        pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:03d}.png")
        (folder / f"img{i:03d}.txt").write_text(f"sample {i}")
        if sketches:
            (folder / "sk").mkdir(exist_ok=True)
            Image.fromarray(255 - pixels).save(folder / "sk" / f"{i:03d}.png")
            rows.append({"file_name": f"img{i:03d}.png", "conditioning_image": f"sk/{i:03d}.png"})
    if sketches:
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture
def shards(tmp_path):
    """48 captioned samples in 8 train shards of 6 (no val)."""
    out = tmp_path / "shards"
    pack(str(_photos(tmp_path / "photos", 48)), out, shard_size=6, val_fraction=0.0)
    return out


def test_pack_a_folder_with_captions_and_sketches(tmp_path):
    out = tmp_path / "out"
    summary = pack(str(_photos(tmp_path / "photos", 10, sketches=True)), out, shard_size=4, val_fraction=0.2)
    assert summary == {"train": 8, "train_shards": 2, "val": 2, "val_shards": 1}  # sketches are not images
    index = json.loads((out / "train.json").read_text())
    assert [s["nsamples"] for s in index["shardlist"]] == [4, 4] and index["genlab"]["keys"] == ["image", "caption", "sketch"]
    train = Shards(str(out), "train", image_size=8, random_flip=False)
    captions = {train[i]["caption"] for i in range(8)} | {Shards(str(out), "val", image_size=8)[i]["caption"] for i in range(2)}
    assert captions == {f"sample {i}" for i in range(10)}  # every sample once, in one split
    item = train[0]
    assert item["image"].shape == item["sketch"].shape == (3, 8, 8)
    torch.testing.assert_close(item["sketch"], (1 - item["image"]) / 2, atol=1e-6, rtol=0)  # its own sketch


def test_sketch_flips_with_its_image(tmp_path):
    out = tmp_path / "out"
    pack(str(_photos(tmp_path / "photos", 8, sketches=True)), out, shard_size=4, val_fraction=0.0)
    ds = Shards(str(out), "train", image_size=8, random_flip=True)
    stream = BatchStream(ds, make_order(ds, 4, seed=0), num_workers=0)
    batches = [next(stream) for _ in range(8)]  # 4 epochs: both flips occur
    images, sketches = torch.cat([b["image"] for b in batches]), torch.cat([b["sketch"] for b in batches])
    torch.testing.assert_close(sketches, (1 - images) / 2, atol=1e-6, rtol=0)
    plain = {ds[i]["caption"]: ds[i]["image"] for i in range(8)}
    captions = [c for b in batches for c in b["caption"]]
    assert any(not torch.equal(x, plain[c]) for x, c in zip(images, captions))  # some were flipped


def _drain(stream, n):
    return [next(stream) for _ in range(n)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stream_resumes_exactly_mid_epoch(shards, num_workers):
    ds = Shards(str(shards), "train", image_size=8)
    order = make_order(ds, 3, seed=5, num_workers=num_workers)  # 8 batches per epoch
    kwargs = dict(num_workers=num_workers, persistent_workers=True, prefetch_factor=2)
    straight = _drain(BatchStream(ds, order, **kwargs), 13)
    first = BatchStream(ds, order, **kwargs)
    _drain(first, 5)
    resumed = _drain(BatchStream(ds, order, **kwargs, **first.position), 8)  # crosses into epoch 1
    for a, b in zip(straight[5:], resumed):
        assert a["caption"] == b["caption"] and torch.equal(a["image"], b["image"])
    epoch0 = [c for b in straight[:8] for c in b["caption"]]
    assert len(set(epoch0)) == 24 and epoch0 != [c for b in straight[8:13] for c in b["caption"]][:24]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_streamed_training_resumed_mid_epoch_is_bitwise(tmp_path, shards, num_workers):
    """The real loop on shards with random flips: 2N steps straight == N, stop, resume (losses and weights)."""
    def cfg_for(steps):
        cfg = toy_config(f"trainer.max_steps={steps}", "trainer.batch_size=3", "data=shards", f"data.path={shards}",
                         "data.image_size=8", f"data.num_workers={num_workers}", "trainer.checkpoint_every=3",
                         "trainer.keep_checkpoints=null", noise=True)
        cfg.model.channels = 3
        return cfg

    _assert_resume_is_bitwise(tmp_path, cfg_for, 3)  # 6 steps of 16 (2 workers) or 8 per epoch


def test_two_processes_read_disjoint_samples_covering_the_epoch(shards):
    """Two ranks with 2 DataLoader workers each: 4 readers of 2 shards each."""
    ds = Shards(str(shards), "train", image_size=8)
    seen = []
    for rank in (0, 1):
        order = make_order(ds, 3, seed=1, rank=rank, world_size=2, num_workers=2)
        assert order.batches_per_epoch == 8  # 2 readers x (12 samples // 3)
        stream = BatchStream(ds, order, num_workers=2)
        seen.append([c for b in _drain(stream, 8) for c in b["caption"]])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(f"sample {i}" for i in range(48))


def test_a_resume_with_another_reader_count_is_refused(shards):
    ds = Shards(str(shards), "train", image_size=8)
    position = BatchStream(ds, make_order(ds, 3, 0, num_workers=2), num_workers=2).position
    with pytest.raises(GenlabError, match="read by 2 readers .* now by 1"):
        BatchStream(ds, make_order(ds, 3, 0, num_workers=0), **position)


def test_a_bad_sample_is_skipped_counted_and_replaced(tmp_path, caplog):
    from webdataset import TarWriter

    out = tmp_path / "out"
    out.mkdir()
    good = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(good, format="PNG")
    with TarWriter(str(out / "train-000000.tar"), encoder=False) as writer:
        for i in range(4):
            data = b"not a png" if i == 2 else good.getvalue()
            writer.write({"__key__": f"{i:09d}", "png": data, "txt": f"sample {i}".encode()})
    index = {"shardlist": [{"url": "train-000000.tar", "nsamples": 4}], "genlab": {"keys": ["image", "caption"]}}
    (out / "train.json").write_text(json.dumps(index))
    ds = Shards(str(out), "train", image_size=8)
    with caplog.at_level(logging.WARNING):
        batch = next(BatchStream(ds, make_order(ds, 4, 0)))
    assert batch["image"].shape == (4, 3, 8, 8) and "sample 2" not in batch["caption"]
    assert ds.skipped == 1 and "000000002" in caplog.text and "1 skipped so far" in caplog.text


def test_pack_a_hugging_face_dataset_and_the_cli(tmp_path):
    import datasets
    from typer.testing import CliRunner

    from genlab.cli import app

    images = [Image.new("RGB", (8, 8), (i * 20, 0, 0)) for i in range(6)]
    sketches = [Image.new("RGB", (8, 8), (0, i * 20, 0)) for i in range(6)]
    saved = tmp_path / "fill"
    datasets.Dataset.from_dict({"image": images, "conditioning_image": sketches, "text": [f"t{i}" for i in range(6)]}
                               ).cast_column("image", datasets.Image()).cast_column(
        "conditioning_image", datasets.Image()).save_to_disk(str(saved))
    result = CliRunner().invoke(app, ["data", "pack", str(saved), str(tmp_path / "out"), "--shard-size", "2",
                                      "--val-fraction", "0.0"])
    assert result.exit_code == 0, result.output
    assert "wrote 6 train samples in 3 shard(s)" in result.output
    ds = Shards(str(tmp_path / "out"), "train", image_size=8, random_flip=False)
    item = next(ds[i] for i in range(6) if ds[i]["caption"] == "t3")
    assert ds.item_keys == ("image", "caption", "sketch")
    assert abs(item["image"][0].mean().item() - (60 / 127.5 - 1)) < 1e-6 and abs(item["sketch"][1].mean().item() - 60 / 255) < 1e-6
    again = CliRunner().invoke(app, ["data", "pack", str(saved), str(tmp_path / "out")])
    assert again.exit_code == 2 and "already holds a shard index" in again.output
