"""Qwen-shaped proxy models: randomly initialised Qwen2 checkpoints with the exact architecture of a Qwen2.5 preset.

Accuracy is meaningless, but speed and memory are real: the weights have the real shapes (the real 151,936-token
vocabulary included, so the embedding, LM head and logits cost what they cost for Qwen2.5) and are saved like a hub
checkpoint (bf16 safetensors + config + tokenizer), then loaded by the normal hub code path
(`dash_exp.models.load_policy` / `load_tokenizer`). Built once per (arch, dtype) into a cache directory.

The tokenizer is the project's character tokenizer (`build_char_tokenizer`) written as a byte-level BPE
`Qwen2Tokenizer` without merges. It has to be: for `model_type` qwen2, transformers 5's `AutoTokenizer` always
rebuilds the tokenizer as `Qwen2Tokenizer` from the saved vocabulary (qwen2 is in
`MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS`, so `tokenizer_class` in tokenizer_config.json or config.json is
overruled) with Qwen's byte-level pre-tokenizer, which maps " " to "Ġ", "\\n" to "Ċ", "\\t" to "ĉ"; a plain
character vocabulary has none of those, so spaces, newlines and tabs were silently dropped. Keying the same ids by
their byte-level symbols makes the rebuilt tokenizer encode ASCII to exactly the character tokenizer's ids.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

from dash_exp.char_tokenizer import build_char_tokenizer

# bump when the build recipe (init, tokenizer, saved files) changes in a way the key does not capture
RANDOM_RECIPE_VERSION = 1

_SHARED: dict[str, Any] = {
    "vocab_size": 151936, "tie_word_embeddings": True, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 32768,
}
# Keys are transformers `Qwen2Config` arguments (`rope_theta` is the hub config.json key; Qwen2Config maps it to
# `rope_parameters`). Sliding window is off in all three (use_sliding_window: false), as in the Qwen2Config default.
QWEN2_5_ARCH: dict[str, dict[str, Any]] = {
    # https://huggingface.co/Qwen/Qwen2.5-0.5B/blob/main/config.json (494,032,768 parameters, tied)
    "qwen2.5-0.5b": {**_SHARED, "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
                     "num_key_value_heads": 2, "intermediate_size": 4864},
    # https://huggingface.co/Qwen/Qwen2.5-1.5B/blob/main/config.json (1,543,714,304 parameters, tied)
    "qwen2.5-1.5b": {**_SHARED, "hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12,
                     "num_key_value_heads": 2, "intermediate_size": 8960},
    # https://huggingface.co/Qwen/Qwen2.5-3B/blob/main/config.json (3,085,938,688 parameters, tied)
    "qwen2.5-3b": {**_SHARED, "hidden_size": 2048, "num_hidden_layers": 36, "num_attention_heads": 16,
                   "num_key_value_heads": 2, "intermediate_size": 11008},
    # test size: Qwen2.5's vocabulary (so the LM head and logits are real) with tiny width and depth
    "qwen2.5-test": {**_SHARED, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 4096},
}


@cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of byte-level BPE (Qwen's too)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_proxy_tokenizer(model_max_length: int = 32768) -> Qwen2Tokenizer:
    """The character tokenizer as a merge-free byte-level `Qwen2Tokenizer`, so a qwen2 directory reloads it intact.

    Ids 0..len(build_char_tokenizer())-1 are the character tokenizer's (<pad>=0, <eos>=1, <unk>=2, then one id per
    printable ASCII character, tab and newline); the remaining byte symbols get the ids after them, so non-ASCII
    text is encoded losslessly as UTF-8 bytes (where the character tokenizer gives <unk>) instead of being dropped.
    """
    char = build_char_tokenizer()
    specials = {char.pad_token, char.eos_token, char.unk_token}
    b2u = _bytes_to_unicode()
    vocab = {t if t in specials else "".join(b2u[b] for b in t.encode()): i for t, i in char.get_vocab().items()}
    for symbol in b2u.values():
        vocab.setdefault(symbol, len(vocab))
    return Qwen2Tokenizer(
        vocab=vocab, merges=[], pad_token=char.pad_token, eos_token=char.eos_token, unk_token=char.unk_token,
        bos_token=None, padding_side="left", model_max_length=model_max_length,
    )


def _arch_dict(arch: Mapping[str, Any]) -> dict[str, Any]:
    # a plain dict from a dict or an OmegaConf DictConfig (Hydra preset)
    return {str(k): arch[k] for k in arch}


def random_model_key(arch: Mapping[str, Any], dtype: str) -> str:
    """Short hash of everything that determines a proxy model's files."""
    payload = {
        "arch": _arch_dict(arch), "dtype": dtype, "recipe": RANDOM_RECIPE_VERSION,
        "torch": ".".join(torch.__version__.split("+")[0].split(".")[:2]),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def build_random_model(arch: Mapping[str, Any], out_dir: Path, dtype: str = "bfloat16", seed: int = 0) -> None:
    """Randomly initialise a `Qwen2ForCausalLM` of shape `arch` in `dtype`; save it and the proxy tokenizer atomically.

    The weights are initialised directly in `dtype` (transformers' own init, std `initializer_range`), which halves
    peak memory and init time for bf16 compared with a float32 init followed by a cast.
    """
    arch = _arch_dict(arch)
    tokenizer = build_proxy_tokenizer(arch.get("max_position_embeddings", 32768))
    config = Qwen2Config(
        **arch, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        use_cache=True,
    )
    if config.vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {config.vocab_size} < {len(tokenizer)} tokenizer ids")
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM._from_config(config, dtype=getattr(torch, dtype))
    attn = model.model.layers[0].self_attn
    if any(p.bias is None for p in (attn.q_proj, attn.k_proj, attn.v_proj)):
        raise RuntimeError("Qwen2 q/k/v projections must have biases")
    if config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
        raise RuntimeError("lm_head is not tied to embed_tokens")
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.replace(tmp, out_dir)
    except OSError:  # another process finished the same build first
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_random_model(arch: Mapping[str, Any], cache_dir: str, dtype: str) -> str:
    """Directory of the proxy model for `arch` in `dtype`: `<cache_dir>/random-qwen2-<key>`, built once."""
    path = Path(os.path.expanduser(cache_dir)) / f"random-qwen2-{random_model_key(arch, dtype)}"
    if not (path / "config.json").exists():
        build_random_model(arch, path, dtype)
    return str(path)
