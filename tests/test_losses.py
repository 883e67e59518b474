"""Advantage estimators, KL estimators, policy losses and aggregation against hand-computed values and float64
re-derivations written here."""

import math
import statistics

import pytest
import torch

from dash_exp.algorithms import COMPONENTS, components_table
from dash_exp.algorithms.advantages import ADVANTAGES, gradient_filter
from dash_exp.algorithms.losses import POLICY_LOSSES, Clip, aggregate_sum, kl_estimate, normalizer
from dash_exp.algorithms.registry import Registry
from dash_exp.errors import ConfigError

pytestmark = pytest.mark.unit

# group 1: rewards 1,0,0,1 (mean .5, sample std sqrt(1/3)); group 2 all equal
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])


def test_grpo_advantage_by_hand():
    adv = ADVANTAGES["grpo"](REWARDS, 4, 1e-4)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert torch.allclose(adv, torch.tensor([a, -a, -a, a, 0, 0, 0, 0]), atol=1e-6)


def test_drgrpo_advantage_is_the_centered_reward():
    adv = ADVANTAGES["drgrpo"](torch.tensor([3.0, 1.0, 2.0, 2.0]), 2, 1e-4)
    assert torch.allclose(adv, torch.tensor([1.0, -1.0, 0.0, 0.0]))


def leave_one_out(rewards: list[float], group_size: int) -> list[float]:
    """r_i minus the mean of the other members of its group, by an explicit loop in float64."""
    out = []
    for i, r in enumerate(rewards):
        start = i - i % group_size
        others = [rewards[j] for j in range(start, start + group_size) if j != i]
        out.append(r - sum(others) / len(others))
    return out


@pytest.mark.parametrize("group_size", [2, 3, 4])
def test_rloo_advantage_is_the_leave_one_out_baseline(group_size):
    rewards = torch.rand(12, generator=torch.Generator().manual_seed(group_size), dtype=torch.float64).round()
    adv = ADVANTAGES["rloo"](rewards, group_size, 1e-4)
    assert adv.tolist() == pytest.approx(leave_one_out(rewards.tolist(), group_size), abs=1e-12)
    # by hand: 1 in {1, 0, 0, 1} -> 1 - 1/3; 0 -> 0 - 2/3
    assert ADVANTAGES["rloo"](REWARDS, 4, 1e-4)[:4].tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3])


def test_reinforce_pp_whitens_the_group_baseline_over_the_batch():
    rewards = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.5, 0.0, 2.0, 2.0, 2.0, 2.0]
    centered = [r - statistics.fmean(rewards[i - i % 4: i - i % 4 + 4]) for i, r in enumerate(rewards)]
    mean, std = statistics.fmean(centered), statistics.stdev(centered)
    expected = [(c - mean) / (std + 1e-4) for c in centered]
    adv = ADVANTAGES["reinforce_pp"](torch.tensor(rewards, dtype=torch.float64), 4, 1e-4)
    assert adv.tolist() == pytest.approx(expected, abs=1e-12)
    assert adv[8:].tolist() == [0.0] * 4  # a group of equal rewards stays exactly 0 (the filter drops it)
    # one std for the whole batch, not each group's: group 1's advantages differ from GRPO's
    assert not torch.allclose(adv[:4], ADVANTAGES["grpo"](torch.tensor(rewards, dtype=torch.float64), 4, 1e-4)[:4])


@pytest.mark.parametrize("name", ADVANTAGES.names())
def test_every_estimator_gives_a_group_of_equal_rewards_zero(name):
    adv = ADVANTAGES[name](torch.tensor([1.0, 0.0, 0.0, 0.5, 0.5, 0.5]), 3, 1e-4)
    assert adv[3:].tolist() == [0.0] * 3 and adv[:3].abs().min() > 0


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
    loss, clipped, capped = POLICY_LOSSES["ppo_clip"](logp, old, adv, torch.ones(4), Clip(0.2, 0.3))
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
    loss, clipped, capped = POLICY_LOSSES["ppo_clip"](logp, logp.detach(), torch.tensor([2.0, -3.0]), torch.ones(2),
                                                      Clip(0.2, 0.2, cap=3.0))
    loss.sum().backward()
    assert torch.allclose(loss, torch.tensor([-2.0, 3.0])) and not clipped.any() and not capped.any()
    assert torch.allclose(logp.grad, torch.tensor([-2.0, 3.0]))


def test_stale_samples_ratio_against_behaviour_logprobs_is_clipped_and_capped_by_hand():
    # behaviour log-probs (the sampler's, from older weights) against current ones: ratios 5, 5, 2, 0.5, 1
    behaviour = torch.log(torch.tensor([0.1, 0.1, 0.2, 0.4, 0.3]))
    logp = torch.log(torch.tensor([0.5, 0.5, 0.4, 0.2, 0.3])).requires_grad_()
    adv = torch.tensor([-2.0, 2.0, -2.0, -2.0, 1.0])
    cap = torch.tensor([3.0, 3.0, 3.0, 3.0, float("inf")])
    loss, clipped, capped = POLICY_LOSSES["ppo_clip"](logp, behaviour, adv, torch.ones(5), Clip(0.2, 0.2, cap))
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
    logp = torch.tensor([-0.5, -2.0])
    terms = POLICY_LOSSES["sft"](logp, logp + 1, torch.tensor([3.0, -1.0]), torch.ones(2), Clip())
    assert torch.equal(terms.loss, torch.tensor([0.5, 2.0])) and not terms.clipped.any() and not terms.capped.any()


def test_cispo_clips_the_weight_and_keeps_every_gradient_by_hand():
    old = torch.zeros(4, dtype=torch.float64)
    # ratios 1.5, 0.5, 1.0, 1.5 with advantages +1, -1, +2, -1; clip [0.8, 1.3]
    logp = torch.log(torch.tensor([1.5, 0.5, 1.0, 1.5], dtype=torch.float64)).requires_grad_()
    adv = torch.tensor([1.0, -1.0, 2.0, -1.0], dtype=torch.float64)
    terms = POLICY_LOSSES["cispo"](logp, old, adv, torch.ones(4), Clip(0.2, 0.3))
    weight = [1.3, 0.8, 1.0, 1.3]  # the clipped ratio, a constant
    expected = [-w * a * lp for w, a, lp in zip(weight, adv.tolist(), logp.tolist(), strict=True)]
    assert terms.loss.tolist() == pytest.approx(expected)
    assert terms.clipped.tolist() == [True, True, False, True] and not terms.capped.any()
    terms.loss.sum().backward()
    # every token keeps a gradient, -w A (PPO's clip would give the first and last none: the ratio left the region)
    assert logp.grad.tolist() == pytest.approx([-1.3, 0.8, -2.0, 1.3])


def gspo_objective_float64(logp, old, adv, lengths, low, high, cap):
    """GSPO's sequence objective as its paper writes it, summed over sequences of sequence means:
    -min(s_i A_i, clip(s_i) A_i) with s_i = exp(mean over the i-th response of logp - old), -cap A_i where A_i < 0
    and s_i > cap; one sequence at a time, in float64."""
    total = torch.zeros((), dtype=torch.float64)
    for i, n in enumerate(lengths):
        s = torch.exp((logp[i, :n] - old[i, :n]).mean())
        a = adv[i]
        if a < 0 and s > cap:
            total = total - cap * a
        else:
            total = total - torch.minimum(s * a, torch.clamp(s, 1 - low, 1 + high) * a)
    return total


def test_gspo_value_and_gradient_against_the_sequence_objective():
    g = torch.Generator().manual_seed(0)
    lengths = [3, 5, 2, 4]
    old = -torch.rand(4, 5, generator=g, dtype=torch.float64) - 0.5
    # sequence ratios: exactly 1, inside [0.8, 1.3], above (A > 0: clipped), above the cap (A < 0: capped)
    shifts = torch.tensor([0.0, 0.1, 0.5, 1.5], dtype=torch.float64)[:, None]
    logp = (old + shifts + 0.05 * torch.randn(4, 5, generator=g, dtype=torch.float64)).requires_grad_()
    mask = torch.tensor([[1.0] * n + [0.0] * (5 - n) for n in lengths], dtype=torch.float64)
    adv = torch.tensor([1.5, -0.7, 2.0, -1.0], dtype=torch.float64)
    low, high, cap = 0.2, 0.3, 3.0
    terms = POLICY_LOSSES["gspo"](logp, old, adv[:, None], mask, Clip(low, high, cap))
    ours = aggregate_sum(terms.loss, mask, "seq_mean_token_mean")
    (grad,) = torch.autograd.grad(ours, logp)
    theirs = gspo_objective_float64(logp, old, adv, lengths, low, high, cap)
    (expected,) = torch.autograd.grad(theirs, logp)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-12)
    assert torch.allclose(grad, expected, atol=1e-12)
    assert grad[0, :3].abs().min() > 0 and grad[2].abs().max() == 0 and grad[3].abs().max() == 0
    assert (grad * (1 - mask)).abs().max() == 0  # padding gets nothing
    # every token of a sample shares its sequence's clip and cap decision
    assert terms.clipped[2, :2].all() and not terms.clipped[1].any()
    assert terms.capped[3, :4].all() and not terms.capped[:3].any()


def test_gspo_on_policy_is_the_policy_gradient_of_sequence_means():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]]).requires_grad_()
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    terms = POLICY_LOSSES["gspo"](logp, logp.detach(), torch.tensor([[2.0], [-1.0]]), mask, Clip(3e-4, 4e-4))
    aggregate_sum(terms.loss, mask, "seq_mean_token_mean").backward()
    # ratio 1: d/d logp_t of -A mean_t ratio = -A / len
    assert torch.allclose(logp.grad, torch.tensor([[-2 / 3, -2 / 3, -2 / 3], [0.5, 0.5, 0.0]]))


def test_registries_name_their_key_and_options_and_refuse_doubles():
    with pytest.raises(ConfigError, match=r"^algorithm\.advantage='ppo': expected one of grpo, drgrpo, rloo"):
        ADVANTAGES.entry("ppo")
    demo: Registry = Registry("demo.key")
    demo.register("a", source="here")(len)
    with pytest.raises(ValueError, match="registered twice"):
        demo.register("a", source="there")(len)


def test_every_option_has_a_summary_and_a_source_and_the_readme_lists_them_all():
    from pathlib import Path

    for registry in COMPONENTS.values():
        for entry in registry:
            assert entry.summary and entry.source, (registry.key, entry.name)
    for page in ("README.md", "docs/algorithms.md"):
        text = (Path(__file__).parent.parent / page).read_text()
        assert components_table() in text, (f"{page}: component table is stale: run `python -m dash_exp.algorithms "
                                            "--readme README.md --readme docs/algorithms.md`")


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
    with pytest.raises(ConfigError, match="aggregation"):
        normalizer([1], "mean", 8)
    with pytest.raises(ConfigError, match="estimator"):
        kl_estimate(torch.zeros(1), torch.zeros(1), "k4")


RATIOS = torch.tensor([0.3, 0.8, 1.0, 1.5, 2.5, 6.0])


def test_tis_truncates_and_mis_masks_by_hand():
    from dash_exp.algorithms.correction import ROLLOUT_CORRECTIONS

    weights, changed = ROLLOUT_CORRECTIONS["tis"](RATIOS, 0.5, 2.0)
    assert weights.tolist() == pytest.approx([0.3, 0.8, 1.0, 1.5, 2.0, 2.0])
    assert changed.tolist() == [False, False, False, False, True, True]
    weights, changed = ROLLOUT_CORRECTIONS["mis"](RATIOS, 0.5, 2.0)
    assert weights.tolist() == pytest.approx([0.0, 0.8, 1.0, 1.5, 0.0, 0.0])
    assert changed.tolist() == [True, False, False, False, True, True]
    weights, changed = ROLLOUT_CORRECTIONS["none"](RATIOS, 0.5, 2.0)
    assert weights is None and not changed.any()


def test_mismatch_sums_count_the_ratio_and_the_tokens_outside_the_matched_band():
    from dash_exp.algorithms.correction import mismatch_sums

    mask = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0])  # the last token is padding
    ratio_sum, outside = mismatch_sums(RATIOS, mask)
    assert ratio_sum.item() == pytest.approx(0.3 + 0.8 + 1.0 + 1.5 + 2.5) and outside.item() == 4  # not 1.0
