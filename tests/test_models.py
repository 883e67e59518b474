"""Tokenizer round trip through every loading path; the tiny model loads through the hub code path."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from dash_exp.models import build_char_tokenizer, eos_token_ids, load_policy, load_tokenizer, resolve_model_path

TEXT = "12 + 7=?\n12+7=19\n\\boxed{19}\t(x, y) {a_b} ~!"


@pytest.mark.unit
def test_char_tokenizer_round_trip_through_every_loading_path(tmp_path):
    tok = build_char_tokenizer()
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert len(ids) == len(TEXT) and tok.unk_token_id not in ids
    assert tok.decode(ids) == TEXT
    tok.save_pretrained(tmp_path)
    for loaded in (AutoTokenizer.from_pretrained(tmp_path), PreTrainedTokenizerFast.from_pretrained(tmp_path),
                   load_tokenizer(str(tmp_path))):
        assert loaded.encode(TEXT, add_special_tokens=False) == ids, type(loaded)
        assert loaded.decode(ids) == TEXT
        assert (loaded.pad_token_id, loaded.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    assert load_tokenizer(str(tmp_path)).padding_side == "left"


@pytest.mark.unit
def test_unknown_characters_map_to_unk():
    tok = build_char_tokenizer()
    assert tok.encode("é", add_special_tokens=False) == [tok.unk_token_id]


@pytest.mark.integration
def test_tiny_base_model_is_cached_and_loads_like_a_hub_model(make_cfg):
    cfg = make_cfg()
    path = resolve_model_path(cfg.model, cfg.task)
    assert resolve_model_path(cfg.model, cfg.task) == path  # cached: same directory, no rebuild
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "llama"  # qwen2's AutoTokenizer would swap in Qwen's tokenizer
    policy, tok = load_policy(path), load_tokenizer(path)
    assert policy.training and next(policy.parameters()).dtype == torch.float32
    assert eos_token_ids(tok, policy) == [tok.eos_token_id]
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert tok.decode(ids) == TEXT


@pytest.mark.unit
def test_cache_key_changes_with_the_config(make_cfg):
    from dash_exp.models import tiny_model_key

    a, b = make_cfg(), make_cfg("model.tiny.warmup_steps=151")
    assert tiny_model_key(a.model.tiny, a.task) != tiny_model_key(b.model.tiny, b.task)
    assert tiny_model_key(a.model.tiny, a.task) == tiny_model_key(make_cfg().model.tiny, a.task)


@pytest.mark.unit
def test_the_sft_m_teacher_is_a_larger_longer_trained_tiny_model_cached_apart(make_cfg):
    """model=tiny-teacher (what `make traces` samples) composes to a wider, deeper tiny model warmed up longer on
    cleaner traces of the same task, under its own cache key; the student keeps the base."""
    from dash_exp.models import tiny_model_key

    base, teacher = make_cfg(), make_cfg("model=tiny-teacher")
    b, t = base.model.tiny, teacher.model.tiny
    assert teacher.model.source == "tiny" and teacher.model.name == "tiny-teacher"
    assert t.hidden_size > b.hidden_size and t.num_layers > b.num_layers and t.intermediate_size > b.intermediate_size
    assert t.warmup_steps > b.warmup_steps and t.warmup_noise < b.warmup_noise
    assert t.warmup_restate == b.warmup_restate and t.hidden_size % t.num_heads == 0
    assert tiny_model_key(t, teacher.task) != tiny_model_key(b, base.task)


# a small warm-up (a few seconds) through the real build path: the default architecture at a quarter of its width
SMALL_BASE = ["model.tiny.hidden_size=64", "model.tiny.intermediate_size=256", "model.tiny.warmup_steps=25",
              "model.tiny.warmup_batch=16"]
BUILD = """
import hashlib, sys, torch
from pathlib import Path
from dash_exp.config import compose_config
from dash_exp.factory import seed_everything
from dash_exp.models import resolve_model_path
cfg = compose_config(sys.argv[2:])
seed_everything(cfg.seed, cfg.threads)
path = Path(resolve_model_path(cfg.model, cfg.task))
assert torch.get_num_threads() == cfg.threads
print(hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest(), path.name)
"""


@pytest.mark.integration
def test_the_base_model_holds_the_same_weights_whatever_process_builds_it(tmp_path, cli_env):
    """The same key, built by a one-thread process (as the suite and make reproduce run: OMP_NUM_THREADS=1,
    threads=1) and by a two-thread one (as make run: no OMP_NUM_THREADS, threads=2), holds bit-identical weights."""
    import subprocess
    import sys

    def build(threads: int, cache: str) -> str:
        env = dict(cli_env)
        if threads > 1:
            env.pop("OMP_NUM_THREADS", None)
        args = [f"threads={threads}", f"model.cache_dir={tmp_path / cache}", *SMALL_BASE]
        proc = subprocess.run([sys.executable, "-c", BUILD, "-", *args], env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout.split()[-2:]

    one, two = build(1, "one"), build(2, "two")
    assert one == two  # same key, same sha256 of model.safetensors


@pytest.mark.integration
def test_building_the_base_leaves_the_callers_threads_and_random_state_alone(tmp_path, make_cfg):
    """The warm-up runs on model.tiny.warmup_threads from its own seed; afterwards the caller's thread count and torch
    RNG are as before, so a run that found the base cached and one that built it go on identically."""
    cfg = make_cfg(f"model.cache_dir={tmp_path}", "model.tiny.warmup_threads=2", *SMALL_BASE)
    torch.set_num_threads(1)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    resolve_model_path(cfg.model, cfg.task)  # builds
    assert torch.get_num_threads() == 1
    assert torch.equal(torch.rand(3), expected)
