"""No shell command runs from data: `pipe:` URLs in a shard index, a shared run's config or a
config file are refused in one sentence before anything opens; a `pipe:` typed on the command
line still runs; object storage never goes through a shell (genlab.urls)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import TINY_DDPM, cli
from genlab.data.pack import pack
from genlab.data.shards import Shards
from genlab.errors import ConfigError
from genlab.run_dir import RunDir
from genlab.urls import UntrustedCommand, command_line_values, commands_allowed, open_url
from test_shards import _photos

SHARD_TRAIN = [*TINY_DDPM, "data=shards", "data.num_workers=0", "trainer.batch_size=4", "trainer.sample_every=0",
               "trainer.max_steps=2"]


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    """16 captioned 8 px images: 3 train shards of 4, 1 val shard."""
    root = tmp_path_factory.mktemp("packed")
    pack(str(_photos(root / "photos", 16)), root / "shards", shard_size=4, val_fraction=0.25)
    return root / "shards"


@pytest.fixture(scope="module")
def shard_run(packed, tmp_path_factory) -> Path:
    """A finished 2-step tiny DDPM run on `packed`."""
    run = tmp_path_factory.mktemp("runs") / "shard_run"
    cli("train", *SHARD_TRAIN, f"data.path={packed}", f"hydra.run.dir={run}")
    return run


@pytest.fixture
def data(packed, tmp_path) -> Path:
    """A copy of the packed data that a test may tamper with."""
    return Path(shutil.copytree(packed, tmp_path / "data"))


def assert_refused(result, *expected: str) -> None:
    """One sentence on stderr, exit 2, no traceback."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    for text in expected:
        assert text in result.stdout + result.stderr, result.stdout + result.stderr


def tamper_index(folder: Path, url: str, position: int = 0) -> None:
    index = json.loads((folder / "train.json").read_text())
    index["shardlist"][position]["url"] = url
    (folder / "train.json").write_text(json.dumps(index))


def test_a_pipe_in_a_shard_index_never_runs_in_train(data, tmp_path):
    marker = tmp_path / "MARKER"
    tamper_index(data, f"pipe:touch {marker}; cat {data}/train-000000.tar")
    result = cli("train", *SHARD_TRAIN, f"data.path={data}", f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert not marker.exists(), "the index's command ran"
    assert_refused(result, "train.json: shardlist[0] names 'pipe:touch", "nothing was read")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("name, why", [
    ("../x.tar", "climbs out"), ("sub/../../x.tar", "climbs out"), ("%2e%2e/x.tar", "climbs out"),
    ("/abs.tar", "absolute path"), ("~/x.tar", "absolute path"), ("..\\x.tar", "absolute path"),
    ("PIPE:touch {marker}", "outside the index's own folder"), (" pipe:touch {marker}", "outside"),
    ("s3://bucket/x.tar", "outside"), ("file:///etc/passwd", "outside"), ("x:y.tar", "outside"), ("", "not a file"),
])
def test_an_index_naming_anything_outside_its_folder_is_refused_before_anything_opens(data, tmp_path, name, why):
    marker = tmp_path / "MARKER"
    tamper_index(data, name.format(marker=marker), position=2)  # a later entry: nothing before it opens either
    with pytest.raises(UntrustedCommand, match=why), commands_allowed(trust_all=True):  # even a trusted run's index
        Shards(str(data), "train", image_size=8)
    assert not marker.exists()


def test_a_relative_name_in_a_subfolder_is_read(data):
    (data / "sub").mkdir()
    shutil.move(data / "train-000001.tar", data / "sub" / "train-000001.tar")
    tamper_index(data, "sub/train-000001.tar", position=1)
    dataset = Shards(str(data), "train", image_size=8)
    assert dataset.urls[1] == str(data / "sub" / "train-000001.tar") and len({dataset[i]["caption"] for i in range(12)}) == 12


def test_a_shared_runs_pipe_data_path_never_runs_in_eval_resume_or_sample(shard_run, packed, tmp_path):
    """The reproduction: a finished run copied and its saved data.path made a command."""
    marker = tmp_path / "MARKER"
    run = Path(shutil.copytree(shard_run, tmp_path / "run"))
    config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    config["data"]["path"] = f"pipe:touch {marker}; cat {packed}"  # a working command: nothing else would stop it
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    for args in (["eval", run, "--n", "2"], ["resume", run, "trainer.max_steps=3"],
                 ["sample", run, "--n", "2", "--out", tmp_path / "x.png"]):
        result = cli(*args, check=False)
        assert not marker.exists(), f"genlab {args[0]} ran the saved config's command"
        assert_refused(result, "data.path", "config.yaml", "not typed on this command line", "--trust-run")
    assert RunDir(run).read_status()["step"] == 2

    # Trusted on purpose, the same command runs (and the run trains through it).
    cli("resume", run, "trainer.max_steps=3", "--trust-run")
    assert marker.exists() and RunDir(run).read_status()["step"] == 3


def test_a_requeued_job_refuses_a_command_its_index_gained(data, tmp_path):
    """A `genlab train` rerun into an interrupted run (a requeue) reads the index again: refused."""
    run = tmp_path / "run"
    args = ["train", *SHARD_TRAIN, f"data.path={data}", f"hydra.run.dir={run}"]
    cli(*args)
    RunDir(run).write_status("interrupted", step=2)
    marker = tmp_path / "MARKER"
    tamper_index(data, f"pipe:touch {marker}; cat {data}/train-000000.tar")
    result = cli(*args, check=False)  # the same command, as a scheduler requeues it
    assert not marker.exists(), "the requeued job ran the index's command"
    assert_refused(result, "shardlist[0]")
    assert RunDir(run).read_status()["status"] == "interrupted"  # left as it was, still resumable


def test_a_pipe_from_a_config_file_is_refused_and_typed_it_runs(packed, tmp_path):
    """The same command from a config group (--config-dir) is refused; typed as an override it runs."""
    marker = tmp_path / "MARKER"
    command = f"pipe:touch {marker}; cat {packed}"
    groups = tmp_path / "my_configs" / "data"
    groups.mkdir(parents=True)
    (groups / "piped.yaml").write_text(yaml.safe_dump({"defaults": ["shards", "_self_"], "path": command}))
    result = cli("train", "--config-dir", tmp_path / "my_configs", *SHARD_TRAIN, "data=piped",
                 f"hydra.run.dir={tmp_path / 'from_file'}", check=False)
    assert not marker.exists(), "a config file's command ran"
    assert_refused(result, "the composed config: data.path=", "give it as an override on this command line")

    run = tmp_path / "typed"
    result = cli("train", *SHARD_TRAIN, f"data.path='{command}'", f"hydra.run.dir={run}")  # quoted for Hydra: ';'
    assert marker.exists() and "done: 2 steps" in result.stdout
    saved = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    assert saved["data"]["path"] == command  # kept as typed, not made a path under the working directory


def test_names_under_a_typed_pipe_cannot_add_shell_syntax(data, tmp_path):
    marker = tmp_path / "MARKER"
    tamper_index(data, f"train-000000.tar; touch {marker}")
    typed = f"pipe:cat {data}"
    with commands_allowed(typed=[typed]), pytest.raises(UntrustedCommand, match="characters a shell would read"):
        Shards(typed, "train", image_size=8)
    assert not marker.exists()


def test_the_python_api_runs_no_command_unless_allowed(packed, tmp_path):
    marker = tmp_path / "MARKER"
    command = f"pipe:touch {marker}; cat {packed}"
    with pytest.raises(UntrustedCommand, match="not typed on this command line"):
        Shards(command, "train", image_size=8)
    with commands_allowed(typed=["pipe:something else"]), pytest.raises(UntrustedCommand):
        Shards(command, "train", image_size=8)
    with pytest.raises(UntrustedCommand):  # the opener itself runs a command only when its caller checked it
        open_url(command)
    assert not marker.exists()
    with commands_allowed(typed=[command]):
        dataset = Shards(command, "train", image_size=8)
    assert marker.exists() and dataset[5]["image"].shape == (3, 8, 8)


def test_typed_commands_are_the_override_values_hydra_parses(monkeypatch):
    assert command_line_values(["data.path=pipe:cat a.tar", "trainer.lr=1e-3", "model=ddpm"]) == {"pipe:cat a.tar"}
    assert command_line_values(["data.path='pipe:curl -s x | tar x'"]) == {"pipe:curl -s x | tar x"}
    assert command_line_values(["data.path=pipe:a,pipe:b"]) == {"pipe:a", "pipe:b"}  # a sweep's choices
    assert command_line_values(["--config-dir", "pipe:x"]) == set()
    monkeypatch.setenv("GENLAB_ALLOW_COMMANDS", json.dumps(["pipe:cat b.tar"]))
    with commands_allowed():
        from genlab.urls import check_command

        check_command("pipe:cat b.tar", "data.path")
        with pytest.raises(UntrustedCommand):
            check_command("pipe:cat c.tar", "data.path")
    monkeypatch.setenv("GENLAB_ALLOW_COMMANDS", "pipe:cat b.tar")
    with pytest.raises(ConfigError, match="JSON list"), commands_allowed():
        pass


class _LocalS3:
    """An fsspec filesystem for s3:// that serves one local folder and records every path asked for."""

    def __init__(self, prefix: str, folder: Path):
        self.prefix, self.folder, self.opened = prefix, folder, []

    def __call__(self, *args, **kwargs):  # fsspec.filesystem("s3") instantiates the class
        return self

    def open(self, path: str, mode: str = "rb"):
        self.opened.append(path)
        assert path.startswith(self.prefix + "/"), path
        return io.BytesIO((self.folder / path[len(self.prefix) + 1:]).read_bytes())


@pytest.fixture
def no_subprocess(monkeypatch):
    """Any process start (webdataset's Pipe, subprocess, os.system) fails the test."""
    import importlib
    import os

    def refuse(*args, **kwargs):
        raise AssertionError(f"a process was started: {args}")

    for target in (subprocess, importlib.import_module("webdataset.gopen")):  # gopen binds its own Popen
        monkeypatch.setattr(target, "Popen", refuse)
    monkeypatch.setattr(os, "system", refuse)


def test_an_s3_path_with_shell_syntax_goes_to_fsspec_unchanged(packed, tmp_path, monkeypatch, no_subprocess):
    """data.path=s3://...;touch M: fsspec gets the URL as it is, no shell ever sees it."""
    from fsspec.registry import _registry

    marker = tmp_path / "MARKER"
    prefix = f"s3://bucket/data;touch {marker} #"
    fake = _LocalS3(prefix, packed)
    monkeypatch.setitem(_registry, "s3", fake)
    run = tmp_path / "run"
    result = cli("train", *SHARD_TRAIN, f"data.path='{prefix}'", f"hydra.run.dir={run}")
    assert "done: 2 steps" in result.stdout and not marker.exists()
    assert fake.opened[0] == f"{prefix}/train.json" and f"{prefix}/train-000000.tar" in fake.opened
    assert yaml.safe_load((run / ".hydra" / "config.yaml").read_text())["data"]["path"] == prefix


def test_s3_without_s3fs_says_what_to_install(monkeypatch, no_subprocess):
    import sys

    from fsspec.registry import _registry

    monkeypatch.delitem(_registry, "s3", raising=False)
    monkeypatch.setitem(sys.modules, "s3fs", None)  # import s3fs fails, as where it is not installed
    with pytest.raises(ConfigError, match=r"needs the s3fs package, which is not installed: pip install s3fs"):
        Shards("s3://bucket/data", "train", image_size=8)


def test_a_cached_file_list_naming_files_outside_its_folder_is_rebuilt(tmp_path):
    """data.cache_dir may come from a shared run: its cached list names only files under the folder."""
    from PIL import Image

    from genlab.data.file_list import list_images

    folder, cache, outside = tmp_path / "images", tmp_path / "cache", tmp_path / "secret.png"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (4, 4)).save(folder / f"{i}.png")
    Image.new("RGB", (4, 4)).save(outside)
    files, _ = list_images(folder, cache)
    (listing,) = cache.glob("*.json")
    saved = json.loads(listing.read_text())
    saved["files"].append("../secret.png")
    listing.write_text(json.dumps(saved))
    again, _ = list_images(folder, cache)
    assert again == files and all(Path(f).parent == folder.resolve() for f in again)


@pytest.mark.slow  # submitit starts a process per job: ~15-30 s
def test_a_typed_pipe_reaches_a_job_that_a_launcher_runs_in_another_process(packed, tmp_path):
    """hydra/launcher=local (submitit, the SLURM launcher's twin): the job's process has submitit's argv,
    so the typed command reaches it through $GENLAB_ALLOW_COMMANDS, which a requeue inherits too."""
    from conftest import genlab

    marker = tmp_path / "MARKER"
    sweep = tmp_path / "sweep"
    genlab("train", "-m", "hydra/launcher=local", *SHARD_TRAIN, f"data.path='pipe:touch {marker}; cat {packed}'",
           f"hydra.sweep.dir={sweep}", env={"OMP_NUM_THREADS": "1"})
    assert (sweep / ".submitit").is_dir() and marker.exists()
    assert json.loads((sweep / "0_ddpm" / "status.json").read_text())["step"] == 2
