"""Advantages, KL estimators, PPO clipping and aggregation against hand-computed values."""

import math

import pytest
import torch

from dash_exp.algorithms.advantages import gradient_filter, group_advantages
from dash_exp.algorithms.losses import aggregate_sum, kl_estimate, normalizer, policy_loss, sft_loss


def test_group_advantages_std_by_hand():
    # group 1: rewards 1,0,0,1 -> mean .5, sample std sqrt(1/3); group 2 all equal -> 0
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv = group_advantages(rewards, group_size=4, norm="std", eps=1e-4)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert torch.allclose(adv, torch.tensor([a, -a, -a, a, 0, 0, 0, 0]), atol=1e-6)


def test_group_advantages_all_equal_group_is_zero():
    adv = group_advantages(torch.zeros(6), group_size=3)
    assert torch.equal(adv, torch.zeros(6))


def test_group_advantages_mean_only():
    adv = group_advantages(torch.tensor([3.0, 1.0, 2.0, 2.0]), group_size=2, norm="mean")
    assert torch.allclose(adv, torch.tensor([1.0, -1.0, 0.0, 0.0]))


def test_gradient_filter_drops_at_or_below_threshold():
    adv = torch.tensor([0.0, 0.1, -0.1, 0.11, -0.5])
    assert gradient_filter(adv, 0.1).tolist() == [False, False, False, True, True]
    assert gradient_filter(adv, None).all()


@pytest.mark.parametrize(
    ("estimator", "expected"),
    # logp = log .5, ref = log .25: log_r = log(.5) ; k1 = -log .5 = log 2; k2 = (log .5)^2 / 2; k3 = .5 - 1 + log 2
    [("k1", math.log(2)), ("k2", math.log(2) ** 2 / 2), ("k3", 0.5 - 1 + math.log(2))],
)
def test_kl_estimators_by_hand(estimator, expected):
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_estimate(logp, ref, estimator).item() == pytest.approx(expected, rel=1e-6)


def test_kl_estimators_zero_when_equal_and_k3_nonnegative():
    x = torch.randn(100)
    for est in ("k1", "k2", "k3"):
        assert torch.allclose(kl_estimate(x, x, est), torch.zeros(100))
    assert (kl_estimate(x, torch.randn(100), "k3") >= 0).all()


def test_ppo_clip_both_sides_by_hand():
    old = torch.zeros(4)
    # ratios 1.5, 1.5, 0.5, 0.5 with advantages +1, -1, +1, -1; eps_low 0.2, eps_high 0.3
    logp = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5])).requires_grad_()
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, clipped, capped = policy_loss(logp, old, adv, clip_low=0.2, clip_high=0.3)
    assert not capped.any()  # no cap by default
    # A>0, r>1+eh: min(1.5, 1.3) = 1.3 (clipped) ; A<0, r=1.5: min(-1.5, -1.3) = -1.5 (unclipped)
    # A>0, r=.5: min(.5, .8) = .5 (unclipped)   ; A<0, r<1-el: min(-.5, -.8) = -.8 (clipped)
    assert torch.allclose(loss, torch.tensor([-1.3, 1.5, -0.5, 0.8]))
    assert clipped.tolist() == [True, False, False, True]
    loss.sum().backward()
    # clipped tokens carry no gradient; unclipped: d(-r A)/d logp = -r A
    assert torch.allclose(logp.grad, torch.tensor([0.0, 1.5, -0.5, 0.0]))


def test_on_policy_ratio_is_one_and_gradient_is_policy_gradient():
    logp = torch.tensor([-1.0, -2.0]).requires_grad_()
    loss, clipped, capped = policy_loss(logp, logp.detach(), torch.tensor([2.0, -3.0]), 0.2, 0.2, cap=3.0)
    loss.sum().backward()
    assert torch.allclose(loss, torch.tensor([-2.0, 3.0])) and not clipped.any() and not capped.any()
    assert torch.allclose(logp.grad, torch.tensor([-2.0, 3.0]))


def test_stale_samples_ratio_against_behaviour_logprobs_is_clipped_and_capped_by_hand():
    # behaviour log-probs (the sampler's, from older weights) against current ones: ratios 5, 5, 2, 0.5, 1
    behaviour = torch.log(torch.tensor([0.1, 0.1, 0.2, 0.4, 0.3]))
    logp = torch.log(torch.tensor([0.5, 0.5, 0.4, 0.2, 0.3])).requires_grad_()
    adv = torch.tensor([-2.0, 2.0, -2.0, -2.0, 1.0])
    cap = torch.tensor([3.0, 3.0, 3.0, 3.0, float("inf")])
    loss, clipped, capped = policy_loss(logp, behaviour, adv, 0.2, 0.2, cap)
    # r=5, A<0: PPO alone gives -min(-10, -2.4) = 10; the cap at 3: -3 * -2 = 6, constant
    # r=5, A>0: clipped at 1.2 -> -2.4 (the cap acts only where A < 0)
    # r=2, A<0: under the cap: -min(-4, -2.4) = 4, gradient -r A = 4
    # r=0.5, A<0: below 1 - eps: -(0.8 * -2) = 1.6, clipped, no gradient
    # r=1 (no cap: inf): -1 * 1 = -1, gradient -1
    assert torch.allclose(loss, torch.tensor([6.0, -2.4, 4.0, 1.6, -1.0]))
    assert capped.tolist() == [True, False, False, False, False]
    assert clipped.tolist() == [False, True, False, True, False]
    loss.sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([0.0, 0.0, 4.0, 0.0, -1.0]))


def test_sft_loss_is_negative_logprob():
    assert torch.equal(sft_loss(torch.tensor([-0.5, -2.0])), torch.tensor([0.5, 2.0]))


# two sequences: lengths 2 and 3 (mask), per-token losses below
TOKENS = torch.tensor([[1.0, 2.0, 9.0], [3.0, 4.0, 5.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])


@pytest.mark.parametrize(
    ("aggregation", "total", "norm"),
    [
        ("token_mean", 15.0, 5.0),  # (1+2+3+4+5) / 5 tokens
        ("seq_mean_token_mean", 1.5 + 4.0, 2.0),  # (mean(1,2) + mean(3,4,5)) / 2 sequences
        ("seq_mean_token_sum_norm", 15.0, 2 * 8.0),  # Dr.GRPO: sum / (sequences * max_new_tokens=8)
    ],
)
def test_aggregation_modes_by_hand(aggregation, total, norm):
    assert aggregate_sum(TOKENS, MASK, aggregation).item() == pytest.approx(total)
    assert normalizer([2, 3], aggregation, max_new_tokens=8) == norm


def test_unknown_modes_raise():
    with pytest.raises(ValueError, match="aggregation"):
        normalizer([1], "mean", 8)
    with pytest.raises(ValueError, match="estimator"):
        kl_estimate(torch.zeros(1), torch.zeros(1), "k4")
