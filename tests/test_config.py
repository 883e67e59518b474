"""Hydra composition and validation: bad configs fail with one line naming the key, before any model loads."""

import subprocess
import sys
from pathlib import Path

import pytest

from dash_exp.config import ConfigError, compose_config

REPO = Path(__file__).resolve().parent.parent


PRESETS = sorted(p.stem for p in (REPO / "conf" / "algorithm").glob("*.yaml"))


@pytest.mark.unit
@pytest.mark.parametrize(("algorithm", "kl"), [(a, k) for a in PRESETS for k in ("on", "off")])
def test_every_algorithm_kl_combination_composes(algorithm, kl):
    cfg = compose_config([f"algorithm={algorithm}", f"kl={kl}", "run_dir=x"])
    # a preset's name is its own, or that of the preset it extends (dash_nogf, ppo_mini, sft_m, dash_entropy)
    assert algorithm.startswith(cfg.algorithm.name) and cfg.algorithm.label
    assert cfg.kl.name == kl and cfg.kl.beta == (0.04 if kl == "on" else 0.0)


@pytest.mark.unit
def test_the_presets_beyond_the_paper_are_compositions_of_components():
    def pick(name):
        a = compose_config([f"algorithm={name}", "run_dir=x"]).algorithm
        return a.advantage, a.policy_loss, a.aggregation, a.ppo_minibatches

    assert pick("rloo") == ("rloo", "ppo_clip", "token_mean", 1)
    assert pick("reinforce_pp") == ("reinforce_pp", "ppo_clip", "token_mean", 1)
    assert pick("drgrpo") == ("drgrpo", "ppo_clip", "seq_mean_token_sum_norm", 1)
    assert pick("gspo") == ("grpo", "gspo", "seq_mean_token_mean", 4)
    dapo = compose_config(["algorithm=dapo", "run_dir=x"]).algorithm
    assert (dapo.clip_high, dapo.dynamic_sampling_rounds, dapo.overlong_buffer) == (0.28, 3, 0.2)
    assert pick("sft")[1] == "sft" and not compose_config(["algorithm=base", "run_dir=x"]).algorithm.train
    # any component goes with any preset: the name is a label, never a branch
    assert compose_config(["algorithm=grpo", "algorithm.advantage=rloo", "algorithm.ppo_epochs=2",
                           "run_dir=x"]).algorithm.advantage == "rloo"


@pytest.mark.unit
def test_rollout_auto_is_vllm_with_cuda_and_on_cpu_for_large_models_where_vllm_is_installed():
    import torch

    from dash_exp.rollout.registry import resolved_rollout, vllm_installed

    assert compose_config(["run_dir=x"]).rollout.name == "auto"
    assert resolved_rollout("auto") == ("vllm" if torch.cuda.is_available() else "hf")
    assert resolved_rollout("hf") == "hf" and resolved_rollout("vllm") == "vllm"
    # on CPU by model size: the tiny model (about 1M parameters) samples faster with HF, SmolLM2-135M with vLLM
    if not torch.cuda.is_available():
        large = "vllm" if vllm_installed() else "hf"  # without vLLM (make install alone) auto keeps to HF
        assert resolved_rollout("auto", 1_000_000) == "hf" and resolved_rollout("auto", 134_515_008) == large
        assert resolved_rollout("hf", 134_515_008) == "hf"


@pytest.mark.unit
def test_presets_follow_the_paper():
    grpo, dash = compose_config(["algorithm=grpo", "run_dir=x"]), compose_config(["algorithm=dash", "run_dir=x"])
    assert grpo.inference_batch == grpo.train_microbatch and grpo.filter_threshold is None
    assert dash.inference_batch is None and dash.filter_threshold == 0.1
    multi, mini = compose_config(["algorithm=ppo", "run_dir=x"]), compose_config(["algorithm=ppo_mini", "run_dir=x"])
    assert (multi.algorithm.ppo_epochs, multi.algorithm.ppo_minibatches) == (3, 1)
    assert (mini.algorithm.ppo_epochs, mini.algorithm.ppo_minibatches) == (1, 32)
    qwen = compose_config(["model=qwen2.5-0.5b", "run_dir=x"])
    assert (qwen.lr, qwen.group_size, qwen.prompts_per_step, qwen.train_microbatch) == (3e-6, 4, 64, 8)
    assert qwen.model.path_or_id == "Qwen/Qwen2.5-0.5B" and qwen.model.dtype == "bfloat16"
    assert qwen.model.gradient_checkpointing and qwen.model.arch == "qwen2.5-0.5b"
    for size in ("1.5b", "3b"):
        assert compose_config([f"model=qwen2.5-{size}", "run_dir=x"]).model.arch == f"qwen2.5-{size}"
    proxy = compose_config(["model=qwen2.5-test", "run_dir=x"]).model
    assert (proxy.source, proxy.arch, proxy.dtype) == ("random", "qwen2.5-test", "bfloat16")


BAD = [
    (["algorithm=grpo", "inference_batch=12"], "inference_batch=12: expected a multiple of group_size=8"),
    (["train_microbatch=64", "inference_batch=32"], "train_microbatch=64: expected <= inference_batch=32"),
    (["filter_threshold=-0.1"], "filter_threshold=-0.1: expected a number >= 0"),
    (["algorithm=ppo", "algorithm.ppo_minibatches=3"], "algorithm.ppo_minibatches=3: expected a divisor"),
    (["algorithm.aggregation=mean"], "algorithm.aggregation='mean': expected one of token_mean"),
    (["kl.estimator=k4"], "kl.estimator='k4': expected one of k1, k2, k3"),
    (["group_size=1"], "group_size=1: group-relative advantages need >= 2"),
    (["lr=0"], "lr=0.0: expected a number > 0"),
    (["top_p=1.5"], "top_p=1.5: expected a number in (0, 1]"),
    (["inference_batch=256"], "inference_batch=256: expected <= the step batch"),
    (["algorithm.advantage=gae"], "algorithm.advantage='gae': expected one of grpo, drgrpo, rloo, reinforce_pp"),
    (["algorithm.policy_loss=dpo"], "algorithm.policy_loss='dpo': expected one of ppo_clip, gspo, cispo, sft"),
    (["algorithm.rollout_correction=is"], "algorithm.rollout_correction='is': expected one of none, tis, mis"),
    (["algorithm.correction_high=0.9"], "algorithm.correction_low/correction_high=0.5/0.9: expected 0 <= low <= 1"),
    (["algorithm.overlong_buffer=1.5"], "algorithm.overlong_buffer=1.5: expected a fraction of max_new_tokens"),
    (["algorithm.entropy_coef=-0.1"], "algorithm.entropy_coef=-0.1: expected a number >= 0"),
    (["algorithm=dapo", "rollout.generator_ranks=1"], "algorithm.dynamic_sampling_rounds=3: generator ranks sample"),
    (["algorithm=sft", "algorithm.sft_source=traces"], "algorithm.traces_path: required"),
    (["task.eval_size=500"], "task.eval_size=500: expected <= task.n_test=200"),
    (["logger.mode=cloud"], "logger.mode='cloud': expected one of online, offline, disabled"),
    (["model=qwen2.5-0.5b", "model.path_or_id=null"], "model.path_or_id: required when model.source=hub"),
    (["rollout=vllm", "rollout.gpu_memory_utilization=1.5"], "rollout.gpu_memory_utilization=1.5: expected"),
    (["rollout.max_model_len=32"], "rollout.max_model_len=32: expected > max_new_tokens=64"),
    (["model.dtype=float16"], "model.dtype='float16': expected one of float32, bfloat16"),
    (["rollout.dtype=float16"], "rollout.dtype='float16': expected one of float32, bfloat16"),
    (["model.logprob_chunk=0"], "model.logprob_chunk=0: expected a number > 0"),
    (["model.source=random"], "model.arch=None: expected one of qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-3b"),
    (["max_prompt_tokens=0"], "max_prompt_tokens=0: expected a number > 0"),
    (["eval_temperature=0"], "eval_temperature=0.0: expected a number > 0"),
    (["eval_top_p=1.5"], "eval_top_p=1.5: expected a number in (0, 1]"),
]


@pytest.mark.unit
@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_config_is_rejected_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        compose_config([*overrides, "run_dir=x"])
    assert message in str(info.value) and "\n" not in str(info.value)


# rejected by Hydra itself while composing (wrong type, unknown group option): its own message, exit 1
HYDRA_BAD = [(["steps=abc"], "steps"), (["rollout=sglang"], "rollout")]


@pytest.mark.integration
@pytest.mark.parametrize(("overrides", "message"), [*BAD, *HYDRA_BAD],
                         ids=[" ".join(o) for o, _ in BAD + HYDRA_BAD])
def test_cli_rejects_bad_config_before_any_model_loads(tmp_path, cli_env, overrides, message):
    cache = tmp_path / "cache"
    proc = subprocess.run(
        [sys.executable, "-m", "dash_exp.run", *overrides, f"model.cache_dir={cache}", f"hydra.run.dir={tmp_path}/run"],
        cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert message.split(":")[0] in proc.stderr
    if (overrides, message) not in HYDRA_BAD:  # ours: exit 2 and exactly one line
        assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert not cache.exists(), "a model was built/loaded before validation failed"
    assert "Traceback" not in proc.stderr
