"""A shared run is untrusted input (issue 35): crafted runs never run code, write, delete or
embed anything outside themselves, never lose a finished run, never leak the environment, and
every bad input gets one sentence.

Each test copies one tiny finished DDPM run (the session's `tiny_ddpm_run`) and tampers with it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import cli


class Payload:
    """Unpickling this runs code: it writes a marker file (what an attacker's pickle would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.fixture
def run(tiny_ddpm_run, tmp_path) -> Path:
    """A copy of the shared tiny DDPM run that a test may tamper with."""
    copy = tmp_path / "run"
    shutil.copytree(tiny_ddpm_run, copy, symlinks=True)
    return copy


def tree_hashes(root: Path) -> dict[str, str]:
    """Every file (and link) under `root` by its relative path: the sha256 of its bytes (or the link's target)."""
    hashes = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            hashes[key] = "link:" + os.readlink(path)
        elif path.is_file():
            hashes[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def assert_one_sentence(result, code: int, *expected: str) -> None:
    """Refused with exit `code`, one line on stderr naming `expected`, no traceback."""
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    for text in expected:
        assert text in errors[0], output


def set_target(run: Path, target: str, **kwargs) -> None:
    config = run / ".hydra" / "config.yaml"
    cfg = yaml.safe_load(config.read_text())
    cfg["model"] = {"_target_": target, **kwargs}
    config.write_text(yaml.safe_dump(cfg))


# ---- 1. the `_target_` allowlist is checked on the object, not the string ------------------------------------
@pytest.mark.parametrize("target", ["torch.optim.optimizer.torch.load", "genlab.train.checkpoint.torch.load"])
def test_a_target_walking_around_the_allowlist_never_runs(run, tmp_path, target):
    """Hydra's locate follows module attributes: `<allowed module>.torch.load` is torch.load on a pickle."""
    marker = tmp_path / "marker"
    torch.save(Payload(marker), tmp_path / "payload.pt")
    set_target(run, target, f=str(tmp_path / "payload.pt"), weights_only=False)
    before = tree_hashes(run)
    for args in (["sample", run, "--n", "1", "--out", tmp_path / "x.png"], ["eval", run, "--n", "1"],
                 ["resume", run, "trainer.max_steps=6"]):
        result = cli(*args, check=False)
        assert not marker.exists(), f"{args[0]} ran the payload"
        assert_one_sentence(result, 2, f"model._target_='{target}'", "module torch", "nothing was loaded")
    assert tree_hashes(run) == before


def test_targets_are_checked_by_what_they_resolve_to():
    from genlab.run_dir import UntrustedConfig, check_targets

    for fine in ("torch.optim.AdamW", "torch.optim.lr_scheduler.ReduceLROnPlateau", "genlab.families.ddpm.DDPM",
                 "genlab.train.lr_schedules.cosine", "genlab.not_a_module.X"):  # the last: build() says so
        check_targets({"m": {"_target_": fine}}, "config.yaml")
    for bad, why in (("genlab.train.checkpoint.torch.load", "module torch"),
                     ("torch.optim.Adam.__init__.__globals__", "not a class or function"),
                     ("genlab.data.images.Path", "pathlib.Path, defined outside the allowed modules"),
                     # a function of genlab's that no config names: it writes any file it is given
                     ("genlab.run_dir.directory.atomic_write", "a function that no genlab config names"),
                     ("genlab.run_dir.directory.RunDir.write_config", "a function that no genlab config names")):
        with pytest.raises(UntrustedConfig, match=why):
            check_targets({"m": {"_target_": bad}}, "config.yaml")
    check_targets({"m": {"_target_": "genlab.train.lr_schedules.cosine"}}, "config.yaml")  # a builder a config names
    check_targets({"m": {"_target_": "genlab.run_dir.directory.atomic_write"}}, "config.yaml",
                  allow=("genlab.run_dir.directory.atomic_write",))  # trusted on purpose


# ---- 2. links in a run never lead a write, a delete or an embed outside it ----------------------------------
@pytest.fixture
def outside(tmp_path) -> Path:
    """Files that are not the run's: another run's checkpoints and a file someone cares about."""
    folder = tmp_path / "outside"
    (folder / "checkpoints" / "step_000001").mkdir(parents=True)
    (folder / "checkpoints" / "step_000001" / "COMPLETE").write_text("")
    (folder / "precious.txt").write_text("keep me\n")
    shutil.copyfile(Path(__file__).parent.parent / "docs" / "index.md", folder / "secret.png")  # any bytes
    return folder


def relink(run: Path, entry: str, target: Path) -> None:
    path = run / entry
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    path.symlink_to(target)


@pytest.mark.parametrize("entry, target, command", [
    ("checkpoints", "checkpoints", "resume"),          # retention would delete the other run's checkpoints
    (".lock", "precious.txt", "resume"),               # the lock would overwrite it
    ("train.log", "precious.txt", "resume"),           # the log would append to it
    ("export/samples.png", "precious.txt", "push"),    # the card's grid would overwrite it (no login needed)
    ("samples/final.png", "secret.png", "eval"),       # eval's card would copy it into export/
    ("samples/final.png", "secret.png", "report"),     # the page would embed it
])
def test_a_link_out_of_the_run_is_refused(run, outside, tmp_path, entry, target, command):
    if entry == "checkpoints":
        shutil.copytree(run / "checkpoints", outside / "checkpoints", dirs_exist_ok=True)
    relink(run, entry, outside / target)
    before_out, before_run = tree_hashes(outside), tree_hashes(run)
    args = {"resume": ["resume", run, "trainer.max_steps=8", "trainer.keep_checkpoints=1"],
            "push": ["push", run, "--repo", "someone/x"], "eval": ["eval", run, "--n", "2"],
            "report": ["report", run]}[command]
    result = cli(*args, check=False)
    assert tree_hashes(outside) == before_out, "something outside the run changed"
    assert tree_hashes(run) == before_run
    assert_one_sentence(result, 1, f"a link leads out of the run ({run / entry} -> {outside / target})")


def test_a_report_of_many_runs_never_embeds_a_file_from_outside(run, outside):
    relink(run, "samples/final.png", outside / "secret.png")
    import base64

    result = cli("report", run.parent, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    page = (run.parent / "report.html").read_text()
    assert base64.b64encode((outside / "secret.png").read_bytes()).decode()[:200] not in page
    assert "a link leads out of the run" in page  # the run's row says why it shows nothing


def test_the_lock_is_never_taken_through_a_link(run):
    """Even a link within the run: the lock would truncate the file it points at."""
    from genlab.errors import GenlabError
    from genlab.run_dir.lock import RunLock

    relink(run, ".lock", run / "metrics.jsonl")
    before = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(GenlabError, match="must be a plain file"):
        RunLock(run / ".lock").acquire()
    assert (run / "metrics.jsonl").read_bytes() == before


def test_links_within_the_run_and_w_and_b_links_are_fine(run, tmp_path):
    from genlab.run_dir import RunDir

    (run / "samples" / "latest.png").symlink_to("final.png")
    (run / "wandb").mkdir(exist_ok=True)
    (run / "wandb" / "debug.log").symlink_to(tmp_path / "elsewhere" / "debug.log")  # W&B links by absolute path
    assert RunDir(run).links_out() == []
    RunDir(run).require()


# ---- 4. no environment value and no local path reaches a report or a card ----------------------------------
def test_no_environment_value_or_local_path_reaches_a_report_or_a_card(run, monkeypatch):
    monkeypatch.setenv("SOME_TOKEN", "hf_SECRETSECRET")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(run.parent / "hf"))  # no saved login: push stops after writing the card
    config = run / ".hydra" / "config.yaml"
    cfg = yaml.safe_load(config.read_text())
    cfg["data"]["path"] = "/home/someone/private/photos"
    cfg["note"] = "${oc.env:SOME_TOKEN}"
    cfg["copy_of_note"] = "${note}"
    config.write_text(yaml.safe_dump(cfg))
    overrides = run / ".hydra" / "overrides.yaml"
    overrides.write_text(yaml.safe_dump([*yaml.safe_load(overrides.read_text()), "data.path=/home/someone/private/photos"]))

    cli("report", run)
    result = cli("push", run, "--repo", "someone/x", check=False)
    assert "not logged in" in result.stderr, result.stderr
    page, card = (run / "report.html").read_text(), (run / "export" / "README.md").read_text()
    for text in (page, card):
        assert "hf_SECRETSECRET" not in text
        assert "${oc.env:SOME_TOKEN}" in text  # the interpolation is shown as written
    assert "/home/someone" not in card and "data.path=photos" in card


def test_retention_never_deletes_through_a_linked_checkpoints_folder(run, outside):
    from genlab.train.checkpoint import prune

    shutil.copytree(run / "checkpoints", outside / "checkpoints", dirs_exist_ok=True)
    relink(run, "checkpoints", outside / "checkpoints")
    before = tree_hashes(outside)
    prune(run / "checkpoints", keep=1)
    assert tree_hashes(outside) == before


# ---- 3. a path with `..` never reaches a finished run ----------------------------------------------------------
@pytest.mark.parametrize("how", ["run.dir", "sweep.subdir"])
def test_a_path_with_dot_dot_never_overwrites_a_finished_run(run, tmp_path, how):
    from conftest import TINY_DDPM

    before = tree_hashes(run)
    if how == "run.dir":  # runs/<missing>/../RUN is RUN once Hydra has made <missing>
        args = ["train", *TINY_DDPM, f"hydra.run.dir={tmp_path}/missing/../{run.name}", "trainer.max_steps=2"]
        expected = ("already holds a run", "nothing was changed")
    else:
        args = ["train", "-m", *TINY_DDPM, f"hydra.sweep.dir={tmp_path}/sweep", f"hydra.sweep.subdir=../{run.name}",
                "trainer.max_steps=2"]
        expected = ("leaves the sweep folder", "nothing was changed")
    result = cli(*args, check=False)
    assert tree_hashes(run) == before, "the finished run changed"
    assert_one_sentence(result, 2, *expected)
    assert not (tmp_path / "missing").exists() and not (tmp_path / "sweep").exists()


# ---- 5. `genlab data pack` packs SRC and nothing else, into a new folder ---------------------------------------
def small_png(path: Path, colour: int = 128) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (colour, 0, 0)).save(path)
    return path


@pytest.mark.parametrize("how", ["linked image", "sketch path", "linked caption", "linked metadata"])
def test_pack_refuses_a_file_outside_src(tmp_path, how):
    src, secret = tmp_path / "src", small_png(tmp_path / "private" / "secret.png", 7)
    small_png(src / "a.png")
    if how == "linked image":
        (src / "b.png").symlink_to(secret)
        expected = f"{src / 'b.png'} leads outside {src}"
    elif how == "sketch path":
        (src / "metadata.jsonl").write_text('{"file_name": "a.png", "conditioning_image": "../private/secret.png"}\n')
        expected = f"leads outside {src}"
    elif how == "linked caption":
        (tmp_path / "private" / "notes.txt").write_text("my diary")
        (src / "a.txt").symlink_to(tmp_path / "private" / "notes.txt")
        expected = f"{src / 'a.txt'} leads outside {src}"
    else:
        (tmp_path / "private" / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "my diary"}\n')
        (src / "metadata.jsonl").symlink_to(tmp_path / "private" / "metadata.jsonl")
        expected = f"{src / 'metadata.jsonl'} leads outside {src}"
    result = cli("data", "pack", src, tmp_path / "out", check=False)
    assert_one_sentence(result, 2, expected, "nothing was packed")
    assert not (tmp_path / "out").exists()


def test_pack_never_overwrites_a_folder_that_holds_files(tmp_path):
    small_png(tmp_path / "src" / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "train-000000.tar").write_text("someone's shard")
    result = cli("data", "pack", tmp_path / "src", out, check=False)
    assert_one_sentence(result, 2, f"{out} is not an empty folder", "nothing was packed")
    assert [p.name for p in out.iterdir()] == ["train-000000.tar"]
    assert (out / "train-000000.tar").read_text() == "someone's shard"


# ---- 6. no hang, no cache that fails every start, no decompression bomb, no traceback ----------------------
def test_a_fifo_named_like_an_image_never_hangs_start_up(tmp_path):
    import threading

    from genlab.data.imagefolder import ImageFolder

    folder = tmp_path / "images"
    for i in range(4):
        small_png(folder / f"{i}.png", 40 * i)
    os.mkfifo(folder / "x.png")  # opening it for reading blocks until someone writes
    done = []
    thread = threading.Thread(target=lambda: done.append(len(ImageFolder(str(folder), val_fraction=0.0))), daemon=True)
    thread.start()
    thread.join(timeout=30)
    if thread.is_alive():  # unblock the reader so the test process can end
        os.close(os.open(folder / "x.png", os.O_WRONLY | os.O_NONBLOCK))
        thread.join(timeout=5)
    assert done == [4], "start-up hung on the FIFO (or listed it)"


def test_a_damaged_bucket_dims_cache_is_rebuilt(tmp_path):
    from genlab.data.buckets import image_dims

    files = [str(small_png(tmp_path / "images" / f"{i}.png")) for i in range(3)]
    cache = tmp_path / "cache"
    assert image_dims(files, cache) == [(8, 8)] * 3
    (dims_file,) = cache.glob("dims-*.json")
    stat = os.stat(files[0])
    for damage in ('{"torn', '["not", "a", "mapping"]', '{"%s": [%d, %d, 0, "x"]}' % (files[0], stat.st_size, stat.st_mtime_ns)):
        dims_file.write_text(damage)
        assert image_dims(files, cache) == [(8, 8)] * 3
        assert len(yaml.safe_load(dims_file.read_text())) == 3  # rewritten whole


def test_a_truncated_latent_cache_entry_is_encoded_again(tmp_path):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    from genlab.data import latent_cache
    from genlab.text import clip_tokenizer, tiny_text_config

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, sample_size=16).eval().requires_grad_(False)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    mean, std = latent_cache.cached_posteriors(vae, images, tmp_path)
    tokenizer, encoder = clip_tokenizer(str(tmp_path / "tok")), CLIPTextModel(tiny_text_config(hidden_size=32)).eval()
    encoder.requires_grad_(False)
    batch = {"latent_cache": str(tmp_path)}
    with torch.no_grad():
        hidden = latent_cache.cached_or_encoded_text(batch, ["a red circle"], tokenizer, encoder)
    entries = sorted(tmp_path.glob("vae-*/*/*.safetensors"))[:1] + sorted(tmp_path.glob("text-*/*/*.safetensors"))
    for entry in entries:
        entry.write_bytes(entry.read_bytes()[:40])  # a kill mid-copy, a full disk
    latent_cache._TEXT_MEMORY.clear()  # from disk this time
    again, again_std = latent_cache.cached_posteriors(vae, images, tmp_path)
    with torch.no_grad():
        hidden_again = latent_cache.cached_or_encoded_text(batch, ["a red circle"], tokenizer, encoder)
    torch.testing.assert_close(again, mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(again_std, std, rtol=0, atol=1e-6)
    torch.testing.assert_close(hidden_again, hidden, rtol=0, atol=1e-6)
    assert len(entries) == 2 and all(len(entry.read_bytes()) > 40 for entry in entries)  # rewritten


def test_a_huge_image_is_refused_before_it_is_decoded(tmp_path):
    """A few-kB PNG whose header says 13000 x 13000 (0.5 GB once decoded)."""
    import struct
    import zlib

    from genlab.data.images import load_image
    from genlab.errors import GenlabError

    path = small_png(tmp_path / "bomb.png")
    data = bytearray(path.read_bytes())
    ihdr = struct.pack(">II", 13000, 13000) + bytes(data[24:29])  # width, height, then depth/colour/... as saved
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    path.write_bytes(bytes(data))
    with pytest.raises(GenlabError, match=r"bomb.png is 13000 x 13000 pixels, more than genlab decodes"):
        load_image(path, 8)


@pytest.fixture
def read_only_folder(tmp_path):
    """A read-only tmpfs (root ignores file modes; skipped where mounting is not allowed)."""
    import subprocess

    target = tmp_path / "ro"
    target.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100k,ro", "tmpfs", str(target)], capture_output=True)
    if result.returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here")
    yield target
    subprocess.run(["umount", "-l", str(target)], capture_output=True)


def test_a_read_only_runs_folder_or_a_file_as_runs_folder_is_one_sentence(tmp_path, read_only_folder, monkeypatch):
    from conftest import TINY_DDPM

    (tmp_path / "a_file").write_text("")
    for root, expected in ((read_only_folder / "runs", "is read-only"), (tmp_path / "a_file", "is a file")):
        monkeypatch.setenv("GENLAB_RUNS", str(root))
        for multirun in ([], ["-m"]):
            result = cli("train", *multirun, *TINY_DDPM, check=False)
            assert_one_sentence(result, 2, f"runs folder {root}", expected)


def test_out_options_naming_a_folder_are_one_sentence(run, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    assert_one_sentence(cli("sample", run, "--n", "1", "--out", folder, check=False), 2, f"--out {folder} is a folder")
    assert_one_sentence(cli("sample", run, "--n", "1", "--out", tmp_path / "x.txt", check=False), 2,
                        "not an image file name")
    assert_one_sentence(cli("report", run, "--out", folder, check=False), 1, f"--out {folder} is a folder")
    assert list(folder.iterdir()) == []


def test_push_with_no_network_is_one_sentence(run, monkeypatch):
    """The client's own connection error, as `create_repo` raises it when no network is there."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HTTPError as TransportError

    connect_error = next(c for c in type.__subclasses__(TransportError) if c.__name__ == "RequestError")

    def no_network(*args, **kwargs):
        raise connect_error("[Errno 101] Network is unreachable")

    monkeypatch.setenv("HF_TOKEN", "hf_not_a_token")
    monkeypatch.setattr(HfApi, "create_repo", no_network)
    result = cli("push", run, "--repo", "someone/x", check=False)
    assert_one_sentence(result, 1, "could not reach the Hub", "Network is unreachable")


@pytest.mark.slow
def test_push_to_a_closed_port_is_one_sentence(run):
    """The real client in a process of its own (online mode, its retries: ~30 s)."""
    from conftest import genlab

    result = genlab("push", str(run), "--repo", "someone/x", check=False,
                    env={"HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_not_a_token", "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert_one_sentence(result, 1, "could not reach the Hub", "someone/x")


def test_a_requeued_train_never_appends_through_a_linked_log(run, outside):
    """`genlab train` rerun into an interrupted run resumes it; Hydra opens train.log before genlab's lock."""
    import json

    from conftest import TINY_DDPM

    status = json.loads((run / "status.json").read_text())
    (run / "status.json").write_text(json.dumps({**status, "status": "running", "pid": 2**22 + 1}))  # killed
    relink(run, "train.log", outside / "precious.txt")
    before = tree_hashes(outside)
    result = cli("train", *TINY_DDPM, f"hydra.run.dir={run}", check=False)
    assert tree_hashes(outside) == before, "Hydra wrote through the link"
    assert_one_sentence(result, 1, f"a link leads out of the run ({run / 'train.log'} -> {outside / 'precious.txt'})")


def test_a_continued_sweep_never_writes_through_a_linked_job_folder(run, tmp_path):
    from conftest import TINY_DDPM
    from genlab.cluster.study import STUDY_FILE

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / STUDY_FILE).write_text("")  # a study's folder: a rerun continues it
    (sweep / "0_ddpm").symlink_to(run)  # job 0's folder (hydra.sweep.subdir) is someone's finished run
    before = tree_hashes(run)
    result = cli("train", "-m", *TINY_DDPM, f"hydra.sweep.dir={sweep}", "trainer.max_steps=2", check=False)
    assert tree_hashes(run) == before
    assert_one_sentence(result, 1, f"a link leads out of the run ({sweep / '0_ddpm'} -> {run})")
