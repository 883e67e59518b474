"""Qwen-shaped proxy models: built locally, loaded through the hub code path, tokenizer intact, cached by arch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO
from safetensors import safe_open
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from dash_exp.models import build_char_tokenizer, eos_token_ids, load_policy, load_tokenizer
from dash_exp.random_model import QWEN2_5_ARCH, random_model_key, resolve_random_model

# Qwen-shaped but tiny: the real vocabulary, 2 layers of width 64, grouped-query attention, tied embeddings
ARCH = {
    "vocab_size": 151936, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "intermediate_size": 128, "tie_word_embeddings": True, "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
}
TEXTS = [
    "12 + 7=?\n12+7=19\n\\boxed{3}", "  two  spaces\n\n\nthree newlines\t\ttabs \t \n", "\\frac{1}{2} \\\\ x^2",
    "I'm 's 've ~!@#$%^&*()_+`-=[]{}|;:,.<>/?\"", " ", "\n", "0123456789",
]


@pytest.fixture(scope="module")
def proxy(tmp_path_factory) -> str:
    return resolve_random_model(ARCH, str(tmp_path_factory.mktemp("cache")), "bfloat16")


@pytest.mark.unit
def test_proxy_loads_like_a_hub_qwen_checkpoint(proxy):
    with safe_open(Path(proxy) / "model.safetensors", "pt") as f:  # saved in bf16, like the hub's Qwen2.5 files
        names = f.keys()
        assert {f.get_slice(k).get_dtype() for k in names} == {"BF16"}
    model = load_policy(proxy)
    assert type(model) is Qwen2ForCausalLM and model.config.model_type == "qwen2"
    assert model.config.vocab_size == 151936 and model.get_input_embeddings().weight.shape == (151936, 64)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    assert model.config.rope_parameters["rope_theta"] == 1e6
    attn = model.model.layers[0].self_attn
    assert all(p.bias is not None for p in (attn.q_proj, attn.k_proj, attn.v_proj)) and attn.o_proj.bias is None
    assert attn.k_proj.weight.shape == (2 * 16, 64)  # 2 kv heads of head_dim 16
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # bf16 checkpoint, fp32 after loading
    tok = load_tokenizer(proxy)
    assert eos_token_ids(tok, model) == [tok.eos_token_id] == [build_char_tokenizer().eos_token_id]
    batch = tok(TEXTS[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], 151936) and torch.isfinite(logits).all()


@pytest.mark.unit
def test_proxy_tokenizer_is_the_character_tokenizer(proxy):
    char = build_char_tokenizer()
    for tok in (load_tokenizer(proxy), AutoTokenizer.from_pretrained(proxy),
                PreTrainedTokenizerFast.from_pretrained(proxy)):
        for text in TEXTS:
            ids = char.encode(text, add_special_tokens=False)
            assert tok.encode(text, add_special_tokens=False) == ids, (type(tok), text)
            assert tok.encode(text) == char.encode(text)
            assert tok.decode(ids) == text
        specials = ("pad_token_id", "eos_token_id", "unk_token_id")
        assert [getattr(tok, a) for a in specials] == [getattr(char, a) for a in specials]
    tok = load_tokenizer(proxy)
    assert tok.padding_side == "left"
    padded = [[char.pad_token_id, *char.encode("ab")], char.encode("a b")]
    assert tok(["ab", "a b"], padding=True)["input_ids"] == padded
    # non-ASCII: UTF-8 bytes on ids after the character tokenizer's (it gives <unk>), lossless, in the model's range
    ids = tok.encode("é∞", add_special_tokens=False)
    assert len(ids) == 5 and min(ids) >= len(char) and max(ids) < ARCH["vocab_size"] and tok.decode(ids) == "é∞"


@pytest.mark.unit
def test_plain_character_tokenizer_in_a_qwen2_directory_loses_whitespace(tmp_path):
    """Why the proxy tokenizer is a byte-level Qwen2Tokenizer: a qwen2 config makes AutoTokenizer rebuild the saved
    tokenizer as Qwen2Tokenizer, even with tokenizer_class PreTrainedTokenizerFast, and " ", "\\n", "\\t" vanish."""
    char = build_char_tokenizer()
    char.save_pretrained(tmp_path)
    Qwen2Config(**ARCH).save_pretrained(tmp_path)
    tokenizer_config = tmp_path / "tokenizer_config.json"
    tokenizer_config.write_text(json.dumps({**json.loads(tokenizer_config.read_text()),
                                            "tokenizer_class": "PreTrainedTokenizerFast"}))
    tok = load_tokenizer(str(tmp_path))
    assert type(tok).__name__ == "Qwen2Tokenizer"
    assert tok.decode(tok.encode("a b\nc\td", add_special_tokens=False)) == "abcd"


@pytest.mark.unit
def test_proxy_is_built_once_per_arch_and_dtype(proxy):
    cache_dir = str(Path(proxy).parent)
    stamps = [os.stat(Path(proxy) / f).st_mtime_ns for f in ("config.json", "model.safetensors")]
    assert resolve_random_model(dict(ARCH), cache_dir, "bfloat16") == proxy
    assert [os.stat(Path(proxy) / f).st_mtime_ns for f in ("config.json", "model.safetensors")] == stamps
    assert Path(proxy).name == f"random-qwen2-{random_model_key(ARCH, 'bfloat16')}"
    assert [p.name for p in Path(cache_dir).iterdir()] == [Path(proxy).name]  # no leftover temp dirs
    assert random_model_key({**ARCH, "num_hidden_layers": 3}, "bfloat16") != random_model_key(ARCH, "bfloat16")
    assert random_model_key(ARCH, "float32") != random_model_key(ARCH, "bfloat16")
    from omegaconf import OmegaConf  # a Hydra preset's DictConfig hashes like the plain dict

    assert random_model_key(OmegaConf.create(ARCH), "bfloat16") == random_model_key(ARCH, "bfloat16")


@pytest.mark.unit
@pytest.mark.parametrize(("name", "n_params"), [
    ("qwen2.5-0.5b", 494_032_768), ("qwen2.5-1.5b", 1_543_714_304), ("qwen2.5-3b", 3_085_938_688),
])
def test_qwen2_5_arch_has_the_real_parameter_count(name, n_params):
    with torch.device("meta"):  # shapes only, no memory
        model = Qwen2ForCausalLM(Qwen2Config(**QWEN2_5_ARCH[name]))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == n_params


@pytest.mark.unit
def test_every_config_arch_has_an_architecture():
    from dash_exp.config import ARCHS

    assert set(ARCHS) == set(QWEN2_5_ARCH)


@pytest.mark.integration
@pytest.mark.real_model
@pytest.mark.xdist_group("memory")
def test_a_run_on_the_random_qwen2_5_0_5b_proxy_trains_two_steps_on_cpu(tmp_path, cli_env):
    # the GPU recipe's model (exact Qwen2.5-0.5B shapes, bf16 compute, gradient checkpointing, chunked log-probs)
    # through the real entrypoint, at tiny step sizes. kl=off: the fp32 policy and its AdamW state (7.4 GB) are what
    # this run is about, and with the bf16 reference beside them (1.2 GB more) it would be the suite's largest process
    # by far; the reference's own precision and build are tested on the tiny model (test_precision.py)
    run_dir = tmp_path / "run"
    args = ["model=qwen2.5-0.5b", "model.source=random", "algorithm=grpo", "kl=off", "steps=2", "epochs=null",
            "prompts_per_step=2", "group_size=2", "train_microbatch=2", "max_new_tokens=8", "task.eval_size=2",
            "eval_samples=1", "logger=none", "threads=2", "rollout=hf", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run([sys.executable, "-m", "dash_exp.run", *args], cwd=REPO, env=cli_env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "time/step" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(r["response/length_mean"] > 0 for r in steps)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["model"]["gradient_checkpointing"] and config["model"]["dtype"] == "bfloat16"
