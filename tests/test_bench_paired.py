"""scripts/bench.py's ratio: genlab's Trainer and the bare loop taking turns in one process (issue 14)."""

from pathlib import Path

import pytest

from genlab.train import tracking
from scripts import bench_loop

ROOT = Path(__file__).resolve().parents[1]

TINY = ["model.unet.block_out_channels=[16,16,16]", "model.unet.attention_head_dim=8", "trainer.batch_size=8"]


@pytest.mark.slow  # two real loops of a few steps each, ~20-60 s on 2 cores; `make test-slow` (CI) runs it
def test_paired_windows_take_turns_and_leave_the_tracker_as_it_was():
    log = tracking.Tracker.log
    result = bench_loop.measure_paired("ddpm", ["model.objective=flow", *TINY], steps=4, warmup=2, window=2)
    assert tracking.Tracker.log is log  # the bare loop's hook is gone again
    # warmup 2 = the first window, not counted; steps 4 = two counted windows of each loop
    assert result["windows"] == 2 and len(result["windows_bare"]) == len(result["windows_genlab"]) == 2
    assert all(r > 0 for r in result["windows_bare"] + result["windows_genlab"])
    assert result["window_ratios"] == [g / b for g, b in zip(result["windows_genlab"], result["windows_bare"])]
    # images/s over both windows: each holds 2 steps x 8 images, so the total is the harmonic mean
    genlab = result["windows_genlab"]
    assert result["images_per_s_genlab"] == pytest.approx(32 / (16 / genlab[0] + 16 / genlab[1]))
    assert result["ratio"] == pytest.approx(result["images_per_s_genlab"] / result["images_per_s_bare"])


def test_time_to_first_step_refuses_a_run_that_never_steps():
    """A start that fails (here at composition, as a model that cannot train fails at build) times nothing."""
    with pytest.raises(RuntimeError, match="exited 2 before its first step: .*did you mean 'ddpm'"):
        bench_loop.time_to_first_step("ddpn", [])


@pytest.mark.slow  # two real loops of a few steps; ~20 s on 2 cores
def test_folder_path_and_the_diffusers_script_take_turns_on_the_same_folder(tmp_path):
    import numpy as np
    from PIL import Image

    from scripts import bench_data

    folder = tmp_path / "pngs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    common = ["data.channels=3", "data.image_size=8", "trainer.sample_n=0", *TINY]
    genlab = ["data=imagefolder", f"data.path={folder}", "data.val_fraction=0.1",
              f"data.cache_dir={tmp_path / 'lists'}", "data.num_workers=0", *common]
    result = bench_data.measure_paired_with_diffusers(str(folder), genlab, ["data=digits", *common], steps=4,
                                                      warmup=2, window=2)
    assert result["windows"] == 2 and len(result["windows_bare"]) == 2
    assert all(r > 0 for r in result["windows_bare"] + result["windows_genlab"])
    script = bench_data.DiffusersScript(str(folder), ["data=digits", *common])
    assert script.batch_size == 8 and script.run(6) > 0  # six steps: past the end of an epoch (36 images, batch 8)
    # As the script leaves them: AdamW and EMAModel at their defaults; same_updates gives it genlab's.
    assert not script.optimizer.optimizer.defaults["foreach"] and not script.ema.foreach
    same = bench_data.DiffusersScript(str(folder), ["data=digits", *common], same_updates=True)
    assert same.optimizer.optimizer.defaults["foreach"] and same.ema.foreach


def test_pooled_ratio_is_over_the_total_time_of_every_window():
    """Windows hold the same images: the ratio is one loop's total time over the other's, not a mean of ratios."""
    runs = [{"windows_genlab": [100.0, 50.0], "windows_bare": [100.0, 100.0], "window_ratios": [1.0, 0.5]},
            {"windows_genlab": [200.0], "windows_bare": [100.0], "window_ratios": [2.0]}]
    ratio, quartiles, ratios = bench_loop.pooled(runs)
    # time per image: genlab 1/100 + 1/50 + 1/200 = 0.035, bare 0.03
    assert ratio == pytest.approx(0.03 / 0.035)
    assert ratios == [0.5, 1.0, 2.0] and quartiles == [0.5, 1.0, 2.0]


def test_interval_is_the_geometric_mean_of_the_ratios_plus_minus_two_standard_errors():
    # logs -1, 0, 1 (times ln 2): mean 0, standard deviation ln 2, standard error ln 2 / sqrt 3
    low, high = bench_loop.interval_95([0.5, 1.0, 2.0])
    assert low == pytest.approx(2 ** (-2 / 3 ** 0.5)) and high == pytest.approx(2 ** (2 / 3 ** 0.5))
    assert bench_loop.interval_95([1.1, 1.1]) == pytest.approx([1.1, 1.1])
