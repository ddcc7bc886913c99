# genlab: `make demo` then `make test` on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
GENLAB := $(VENV)/bin/genlab
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1
export GENLAB_RUNS ?= runs

.PHONY: install demo test test-portable test-slow test-slurm test-full lint docs gpu-check bench bench-levers bench-mfu bench-controlnet quality clean

install: $(VENV)/.installed

# torch first, pinned, so that nothing below pulls another multi-GB build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e '.[dev]'
	touch $@

# The default model and data (a DDPM on the bundled digits), with the short-budget settings that
# scripts/quality.py validated: a large LR with cosine decay and min-SNR weighting, 600 steps.
# DDIM for the grids: the default UniPC left about 6 of 64 samples as speckled noise after these 600 steps.
DEMO_OVERRIDES := trainer.max_steps=600 trainer.lr=1e-3 lr_schedule=cosine lr_schedule.warmup_steps=50 \
	model.weighting=min_snr model.snr_gamma=5.0 model.sampler=ddim trainer.sample_every=300 trainer.checkpoint_every=300

demo: install  ## train a DDPM on the bundled digits (~3 min on 2 cores), then draw a sample grid
	$(GENLAB) train $(DEMO_OVERRIDES) hydra.run.dir=$(GENLAB_RUNS)/demo/ddpm_digits
	$(GENLAB) sample $(GENLAB_RUNS)/demo/ddpm_digits --n 64 --out $(GENLAB_RUNS)/demo/ddpm_digits_samples.png
	@echo "demo grid: $(GENLAB_RUNS)/demo/ddpm_digits_samples.png"

# Two pytest workers (pytest-xdist) of one torch thread each: the tests are small single-threaded
# runs and subprocess starts, so two workers use both cores where one process with two threads
# leaves one idle. TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2

test: install  ## the default suite: CPU, no network, under 5 minutes on 2 cores
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist worksteal

# The same suite computing like another CPU: ATEN_CPU_CAPABILITY makes PyTorch use its generic (or AVX2)
# kernels on any machine, so a test that holds only on this CPU's rounding fails here too.
PORTABLE_CAPABILITY ?= default
PORTABLE_THREADS ?= 1

test-portable: install  ## the default suite with PyTorch's generic CPU kernels (CI runs it after `make test`)
	ATEN_CPU_CAPABILITY=$(PORTABLE_CAPABILITY) OMP_NUM_THREADS=$(PORTABLE_THREADS) $(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist worksteal

test-slow: install  ## only the @pytest.mark.slow tests (CI runs them after `make test`)
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -q -m slow -n $(TEST_WORKERS) --dist worksteal

# A one-node SLURM cluster on this machine (munge + slurm-wlm, installed where root can), then the
# tests that sweep on it for real: sbatch, job arrays, USR2, scontrol requeue, time limits.
test-slurm: install  ## the @pytest.mark.slurm tests on a local SLURM cluster (skipped where it cannot start)
	bash scripts/slurm_local.sh up || echo "no local SLURM cluster: the slurm tests will be skipped"
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -q -m slurm

test-full: install  ## also the @pytest.mark.slow tests
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -q -m "not gpu" -n $(TEST_WORKERS) --dist worksteal

# ruff with the rules of pyproject.toml ([tool.ruff]): unused and undefined names, syntax, long lines. It only reads.
lint: install  ## ruff check over src/, tests/ and scripts/ (CI runs it first)
	$(VENV)/bin/ruff check src tests scripts

# The documentation site (mkdocs.yml, docs/): --strict fails on a broken link or anchor and on a page
# left out of the nav. Offline: the theme's fonts are the system's (theme.font: false). The end-of-life banner is muted:
# Material for MkDocs gets fixes until May 2027; Zensical, its successor, reads the same mkdocs.yml.
docs: install  ## build the documentation site into site/ (mkdocs --strict)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

gpu-check: install  ## a GPU, one command: GPU tests, MFU, ControlNet memory, FSDP on one GPU + the memory plan against max_memory_allocated -> benchmarks/gpu-check-<gpu>.json
	$(PY) scripts/gpu_check.py

bench: install  ## speed of genlab's loop against a bare PyTorch loop -> benchmarks/bench-<machine>.json
	$(PY) -m scripts.bench

bench-levers: install  ## each speed lever on and off -> "levers" in benchmarks/bench-<machine>.json
	$(PY) -m scripts.bench --levers

bench-mfu: install  ## GPU: images/s and MFU at CIFAR-10 size, bf16, compile off/on -> "mfu" in benchmarks/bench-<gpu>.json
	$(PY) -m scripts.bench --mfu

bench-controlnet: install  ## GPU: memory and it/s of SD-1.5-size ControlNet training -> benchmarks/controlnet-<gpu>.json
	$(PY) -m scripts.bench_controlnet

quality: install  ## CPU quality recipes -> benchmarks/quality.json
	$(PY) -m scripts.quality

clean:
	rm -rf $(VENV) runs outputs multirun site
