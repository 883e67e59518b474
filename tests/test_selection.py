"""Sample selection and reward shaping: what dynamic sampling, overlong filtering and the soft overlong punishment
keep, drop and give, by hand and through the trainer's scoring of real draws."""

import json

import pytest
import torch

from dash_exp.algorithms.selection import informative_groups, overlong_penalty
from dash_exp.reward import GradeResult
from dash_exp.rollout.base import Rollout
from dash_exp.run import train
from dash_exp.trainer import Draw


@pytest.mark.unit
def test_informative_groups_are_those_whose_rewards_differ():
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0])
    assert informative_groups(rewards, 3).tolist() == [True, False, True, False]


@pytest.mark.unit
def test_soft_overlong_punishment_by_hand():
    # L = 64, buffer 16: no penalty up to 48 tokens, then a ramp to -1 at 64
    assert overlong_penalty([10, 48, 52, 56, 64], 64, 16).tolist() == [0.0, 0.0, -0.25, -0.5, -1.0]
    assert overlong_penalty([56, 64], 64, 16, factor=0.5).tolist() == [-0.25, -0.5]
    assert overlong_penalty([64], 64, 0).tolist() == [0.0]


def draw(rewards, lengths=None, truncated=None, first_token=0):
    """A graded draw of len(rewards) rollouts (their response ids tell them apart)."""
    n = len(rewards)
    lengths = lengths or [4] * n
    truncated = truncated or [False] * n
    rollouts = [Rollout([1], [first_token + i] + [2] * (lengths[i] - 1), [-0.5] * lengths[i], truncated[i])
                for i in range(n)]
    return Draw(rollouts, GradeResult(list(rewards), 0, 0), 1.0)


@pytest.fixture
def trainer(make_cfg):
    """A real trainer on the tiny model (its score() is what is tested; nothing is sampled)."""
    from pathlib import Path

    from dash_exp.factory import build
    from dash_exp.tracking import MetricSink
    from dash_exp.trainer import Trainer

    def make(*overrides):
        cfg = make_cfg("prompts_per_step=2", "group_size=2", "train_microbatch=2", "max_new_tokens=8", *overrides)
        parts = build(cfg)
        parts.task.close()
        run_dir = Path(cfg.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        sink = MetricSink(run_dir, cfg.logger, "t", "t", {})
        return Trainer(cfg, parts.policy, parts.tokenizer, parts.sampler, parts.task, sink, run_dir)

    return make


@pytest.mark.integration
def test_dynamic_sampling_trains_on_the_first_informative_groups_in_draw_order(trainer):
    t = trainer("algorithm.dynamic_sampling_rounds=2", "filter_threshold=null")
    # round 0: group 0 equal, group 1 informative; round 1: group 2 informative, group 3 informative
    draws = [draw([1.0, 1.0, 1.0, 0.0]), draw([0.0, 1.0, 1.0, 0.0], first_token=10)]
    samples, keep, metrics = t.score(draws)
    assert [s.response_ids[0] for s in samples] == [2, 3, 10, 11]  # group 1 of round 0, group 2 (round 1's first)
    assert [s.advantage > 0 for s in samples] == [True, False, False, True] and all(keep)
    assert (metrics["sampling/rounds"], metrics["sampling/groups"], metrics["sampling/samples_drawn"]) == (2, 2, 8)
    # reward/* describe the step's own prompts (round 0), as in every other arm
    assert metrics["reward/mean"] == 0.75
    # nothing informative anywhere: the step's own groups, all of advantage 0
    samples, _, metrics = t.score([draw([1.0, 1.0, 0.0, 0.0]), draw([1.0, 1.0, 1.0, 1.0], first_token=10)])
    assert [s.response_ids[0] for s in samples] == [0, 1, 2, 3] and all(s.advantage == 0 for s in samples)
    assert metrics["sampling/groups"] == 2


@pytest.mark.integration
def test_overlong_filter_drops_truncated_samples_and_the_penalty_shapes_rewards(trainer):
    t = trainer("algorithm.overlong_filter=true", "algorithm.overlong_buffer=0.5", "algorithm.advantage=drgrpo",
                "filter_threshold=null")
    # max_new_tokens 8, buffer 4: lengths 4 (no penalty), 6 (-0.5), 8 truncated (-1), 2 (none)
    samples, keep, metrics = t.score([draw([1.0, 1.0, 0.0, 0.0], [4, 6, 8, 2], [False, False, True, False])])
    shaped = [1.0, 0.5, -1.0, 0.0]
    expected = [shaped[0] - 0.75, shaped[1] - 0.75, shaped[2] + 0.5, shaped[3] + 0.5]  # r - group mean (drgrpo)
    assert [s.advantage for s in samples] == pytest.approx(expected)
    assert keep == [True, True, False, True]
    assert metrics["reward/overlong_penalty"] == pytest.approx(-1.5 / 4)
    assert metrics["filter/overlong_frac"] == 0.25


@pytest.mark.integration
def test_dapo_runs_end_to_end_and_refills_its_batch(make_cfg, tmp_path):
    cfg = make_cfg("algorithm=dapo", "steps=2", "prompts_per_step=4", "group_size=4", "train_microbatch=4")
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "time/step" in r]
    assert len(steps) == 2
    for r in steps:
        assert 1 <= r["sampling/rounds"] <= 4 and 1 <= r["sampling/groups"] <= 4
        assert r["sampling/samples_drawn"] == 16 * r["sampling/rounds"]
        # it stops drawing once the batch is full, or after the last extra round
        assert r["sampling/groups"] == 4 or r["sampling/rounds"] == 4
        assert "reward/overlong_penalty" in r and "mismatch/ratio_mean" in r
