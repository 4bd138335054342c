# Two entry points: `make demo` (install, then the whole DAG on params.yaml with dvc) and `make test`.
VENV   ?= .venv
PYTHON ?= $(shell command -v python3.11 || command -v python3)
PY      = $(VENV)/bin/python
# CUDA=cu126|cu128|cu130: torch and torchvision built for that CUDA, from PyTorch's wheel index (README, "Many GPUs and
# nodes": the driver each needs); unset: PyPI's build (CUDA 13, driver R580+).
CUDA   ?=
CUDA_BUILDS = cu126 cu128 cu130
$(if $(filter-out $(CUDA_BUILDS),$(CUDA)),$(error CUDA=$(CUDA): expected one of $(CUDA_BUILDS), or unset))
TORCH_PINS = $(shell sed -n 's/^ *"\(torch\(vision\)\{0,1\}==[^"]*\)",*/\1/p' pyproject.toml)
STAMP   = $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)$(if $(CUDA),-$(CUDA))

export PATH := $(abspath $(VENV))/bin:$(PATH)
export HF_HUB_OFFLINE ?= 1
export MLFLOW_DISABLE_TELEMETRY = true
export PREFECT_SERVER_ANALYTICS_ENABLED = false
export DVC_NO_ANALYTICS = 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS = 90

.PHONY: install demo test test-slow test-all test-fast test-random mutants ablation sweep-sp study study-t2i bench clean

# Re-installs only when pyproject.toml changed (the stamp is named after its hash).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(if $(CUDA),$(PY) -m pip install --disable-pip-version-check -q --index-url https://download.pytorch.org/whl/$(CUDA) \
	  $(addsuffix +$(CUDA),$(TORCH_PINS)))
	$(PY) -m pip install --disable-pip-version-check -q -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

demo: $(STAMP)
	aligntok repro
	aligntok summary

# make test: every fast test plus the two end-to-end paths users take (dvc repro / aligntok repro, and a served
# Prefect deployment triggered over the API). The other slow tests (kill matrix, DDP and multi-node, tracking
# outage, distributed evaluate, DVC experiments) take ~30 min more on 2 cores: make test-slow runs them.
E2E = tests/test_pipeline.py tests/test_prefect_deployment.py

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests
	$(PY) -m pytest -q -m slow $(E2E)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow --deselect tests/test_pipeline.py --deselect tests/test_prefect_deployment.py tests

test-all: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# The fast tests in a random order (pytest-randomly), to catch a test that needs another's leftovers. The seed is
# printed ("Using --randomly-seed=N"); SEED=N runs that order again.
SEED ?=
test-random: $(STAMP)
	$(PY) -m pytest -q -p randomly $(if $(SEED),--randomly-seed=$(SEED)) -m "not slow" tests

# Mutation testing of the science core (files and tests: [tool.mutmut] in pyproject.toml): every small change
# mutmut makes to an objective, the sampler, the schedule/EMA, sampling, latent normalisation or a metric should
# fail a fast test. 91 min for all 1,634 mutants on 2 cores shared with other jobs; it resumes where it stopped and
# re-tests only functions that changed. Prints the score, then each survivor
# (`mutmut show NAME` shows its diff). tests/planted_bugs.py plants the bugs a review found, one at a time.
mutants: $(STAMP)
	$(VENV)/bin/mutmut run --max-children $(shell nproc)
	$(VENV)/bin/mutmut export-cicd-stats
	$(PY) tests/mutation_score.py
	$(VENV)/bin/mutmut results
	$(PY) tests/planted_bugs.py

# Runs the queued DVC experiments on JOBS workers until none is left; fails if any experiment failed.
JOBS ?= 1
define run-queue
	dvc queue start -j $(JOBS)
	while dvc queue status | grep -qE 'Queued|Running'; do sleep 10; done
	! dvc queue status | grep -q Failed
endef

# Semantic-preservation sweep as DVC experiments: queued (one per value), run by JOBS workers, then compared
# by DVC (committed metrics) and by MLflow.
ablation: $(STAMP)
	dvc exp run --queue -S 'tokenizer.stage2.semantic_weight=0,0.5,1'
	$(run-queue)
	dvc exp show --md --only-changed
	aligntok compare

# Semantic-preservation strength: the grid SP_WEIGHTS x SP_ENCODER_LRS (tokenizer.stage2.semantic_weight x
# tokenizer.stage2.encoder_lr), one queued DVC experiment per pair; read each with its stage-2 sp_grad_ratio curve
# in MLflow (the encoder gradient of the weighted L_sp over that of the rest) beside the final metrics.
SP_WEIGHTS     ?= 0.25,1,4
SP_ENCODER_LRS ?= 3e-6,1e-5,3e-5
sweep-sp: $(STAMP)
	dvc exp run --queue -S 'tokenizer.stage2.semantic_weight=$(SP_WEIGHTS)' \
	  -S 'tokenizer.stage2.encoder_lr=$(SP_ENCODER_LRS)'
	$(run-queue)
	dvc exp show --md --only-changed
	aligntok compare

# The small-scale study (reports/study.md): four tokenizer variants x STUDY_SEEDS as queued DVC experiments on the
# smoke profile, each with the diffusability probe on during DiT training, then the report from MLflow.
# (a) AlignTok (b) stage 1 only (c) no semantic preservation (d) from-scratch VAE; same latent shape, DiT, steps.
STUDY_SEEDS ?= 0 1 2
STUDY_SET   ?= -S dit.probe_every=100 -S tracking.experiment=aligntok-study
study: $(STAMP)
	for seed in $(STUDY_SEEDS); do \
	  dvc exp run --queue $(STUDY_SET) -S seed=$$seed && \
	  dvc exp run --queue $(STUDY_SET) -S seed=$$seed -S tokenizer.stage2.steps=0 -S tokenizer.stage3.steps=0 && \
	  dvc exp run --queue $(STUDY_SET) -S seed=$$seed -S tokenizer.stage2.semantic_weight=0 && \
	  dvc exp run --queue $(STUDY_SET) -S seed=$$seed -S tokenizer.kind=vae || exit 1; \
	done
	$(run-queue)
	aligntok study-report --experiment aligntok-study --command-line "make study STUDY_SEEDS='$(STUDY_SEEDS)'"

# The text-to-image study (reports/study-t2i.md): (a) AlignTok and (d) the from-scratch VAE on the t2i-smoke profile
# (switches params.yaml to it) x STUDY_SEEDS, queued DVC experiments with the caption-judge probe, then the report.
STUDY_T2I_SET ?= -S dit.probe_every=250 -S tracking.experiment=aligntok-study-t2i
study-t2i: $(STAMP)
	aligntok profile t2i-smoke
	for seed in $(STUDY_SEEDS); do \
	  dvc exp run --queue $(STUDY_T2I_SET) -S seed=$$seed && \
	  dvc exp run --queue $(STUDY_T2I_SET) -S seed=$$seed -S tokenizer.kind=vae || exit 1; \
	done
	$(run-queue)
	aligntok study-report --task text --experiment aligntok-study-t2i --command-line "make study-t2i STUDY_SEEDS='$(STUDY_SEEDS)'"

bench: $(STAMP)
	aligntok bench prepare && aligntok bench tokenizer && aligntok bench dit && aligntok bench eval

clean:
	rm -rf outputs checkpoints data mlflow.db mlartifacts

# One prepared GPU measurement of what a first paper-profile run needs (README, "Benchmarks"), in the environment at
# hand: nothing is installed. It runs this checkout's venv python when there is one, else python3 from PATH;
# `make gpu-check PY=/path/to/python` runs that one. GPU_CHECK_ARGS: more options (`python -m
# aligntok.bench.gpu_check -h`). Without CUDA it stops with one line and exit 1.
GPU_CHECK_PY = $(if $(or $(filter command line,$(origin PY)),$(wildcard $(PY))),$(PY),python3)
.PHONY: gpu-check
gpu-check:
	$(GPU_CHECK_PY) -m aligntok.bench.gpu_check --out outputs/gpu_check.json $(GPU_CHECK_ARGS)
