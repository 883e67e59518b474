"""analysis.stats and the findings' verdicts on hand-built runs whose intervals are known: a part is yes / no only
when its interval excludes the threshold, inconclusive otherwise; seeds that match are paired."""

from __future__ import annotations

import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO))  # analysis/ is not an installed package: import it from the checkout

from test_analysis import write_run  # noqa: E402

from analysis import findings as FD  # noqa: E402
from analysis.runs import load_runs  # noqa: E402
from analysis.stats import accuracy_se, combine, compare, rate_verdict  # noqa: E402

pytestmark = pytest.mark.unit


def test_paired_percentile_interval_of_three_seeds_is_hand_computable():
    # differences 1, 2, 3: a resample of three is all 1s with probability 1/27 = 3.7% > 2.5% (likewise all 3s), so
    # the 2.5% and 97.5% quantiles of the resampled means are exactly 1 and 3
    c = compare({0: 81.0, 1: 82.0, 2: 83.0}, {0: 80.0, 1: 80.0, 2: 80.0})
    assert c.paired and (c.diff, c.low, c.high) == (2.0, 1.0, 3.0)
    assert c.verdict() == "yes" and c.verdict(threshold=1.5) == "inconclusive" and c.verdict(threshold=3.5) == "no"
    assert c.verdict(greater=False) == "no"
    assert c.text("points") == "+2.0 [+1.0, +3.0] points (95% CI, paired by seed, n=3; P(improve) 1.00)"


def test_pairing_by_seed_is_what_separates_a_consistent_small_gain_from_noise():
    a, b = {0: 80.0, 1: 90.0, 2: 70.0}, {0: 79.0, 1: 89.0, 2: 69.0}
    paired = compare(a, b)
    assert paired.paired and (paired.low, paired.high) == (1.0, 1.0) and paired.verdict() == "yes"
    unpaired = compare(a, {3: 79.0, 4: 89.0, 5: 69.0})  # the same values from other seeds: nothing to pair
    assert not unpaired.paired and unpaired.low < 0 < unpaired.high and unpaired.verdict() == "inconclusive"
    assert "unpaired, n=3 vs 3" in unpaired.text()


def test_probability_of_improvement_counts_pairs_with_ties_as_half():
    # pairs a > b: 1>0, 2>0, 3>2 twice, 3>0 = 5; ties 2=2 twice = 1; of 9
    assert compare({0: 1.0, 1: 2.0, 2: 3.0}, {3: 2.0, 4: 2.0, 5: 0.0}).p_improve == pytest.approx(6 / 9)


def test_one_run_a_side_has_no_interval_and_decides_nothing():
    c = compare({0: 90.0}, {0: 10.0})
    assert c.diff == 80.0 and c.verdict() == "inconclusive" and "[no interval]" in c.text()
    assert compare({}, {0: 1.0}).verdict() == "inconclusive"


def test_rate_verdict_is_a_one_sided_fisher_exact_test():
    assert rate_verdict(4, 4, 0, 4) == ("yes", pytest.approx(1 / 70))
    assert rate_verdict(3, 3, 0, 3)[0] == "inconclusive"  # p = 1/20: not below 0.05
    assert rate_verdict(0, 4, 4, 4)[0] == "no"
    assert rate_verdict(0, 3, 0, 3) == ("inconclusive", 1.0)


def test_accuracy_standard_error_and_combined_verdicts():
    assert accuracy_se(0.8, 100) == pytest.approx(0.04) and accuracy_se(0.8, 500) == pytest.approx(0.0178885, abs=1e-6)
    assert combine({"a": "yes", "b": "yes"}) == "yes" and combine({"a": "no"}) == "no"
    assert combine({"a": "yes", "b": "inconclusive"}) == "partly"
    assert combine({"a": "inconclusive", "b": "inconclusive"}) == "inconclusive"


def _runs(root, sweep: str, specs: list[tuple], start: float = 0.6):
    """specs: (label, kl, {seed: final accuracy}, extra write_run kwargs)."""
    for label, kl, finals, extra in specs:
        for seed, final in finals.items():
            write_run(root, sweep, label, seed, {0: start, 10: final}, kl=kl, **extra)
    return load_runs(root)


# the rerun of 2026-12-03, finding 3: KL 81.3 ± 2.5, No-KL 83.0 ± 2.0 over seeds 0-2; lengths 33.3 -> 32.9
KL_ON = {0: 0.79, 1: 0.81, 2: 0.84}
KL_OFF = {0: 0.81, 1: 0.85, 2: 0.83}


def test_finding3_a_small_difference_within_the_seed_spread_is_inconclusive(tmp_path):
    runs, steps = _runs(tmp_path, "kl", [("dash", "on", KL_ON, {"lengths": (33.0, 33.3)}),
                                         ("dash", "off", KL_OFF, {"lengths": (33.0, 32.9)})])
    v = FD.finding3(runs, steps)
    acc = v.comparisons["higher accuracy"]
    assert acc.paired and acc.diff == pytest.approx(5 / 3) and acc.low < 0 < acc.high
    # the same length difference in every seed: the interval is that point, below zero
    assert v.parts == {"shorter": "yes", "higher accuracy": "inconclusive"} and v.verdict == "partly"
    assert "Inconclusive (higher accuracy)" in v.evidence and "SEEDS=5" in v.evidence
    assert "No-KL − KL +1.7 [" in v.evidence and "paired by seed, n=3" in v.evidence


def test_finding1_yes_no_and_inconclusive_parts(tmp_path):
    dash = {0: 0.80, 1: 0.82, 2: 0.84}
    runs, steps = _runs(tmp_path, "sft_vs_rl", [
        ("dash", "off", dash, {}),
        ("sft_h", "off", {0: 0.10, 1: 0.12, 2: 0.11}, {}),  # far below DASH in every seed
        ("sft_m", "off", {0: 0.83, 1: 0.79, 2: 0.85}, {}),  # differences -3, +3, -1: straddle zero
    ])
    v = FD.finding1(runs, steps)
    assert v.parts == {"DASH > SFT-M": "inconclusive", "DASH > SFT-H": "yes"} and v.verdict == "partly"
    runs, steps = _runs(tmp_path / "b", "sft_vs_rl", [("dash", "off", dash, {}),
                                                      ("sft_m", "off", {0: 0.90, 1: 0.93, 2: 0.95}, {})])
    assert FD.finding1(runs, steps).parts == {"DASH > SFT-M": "no"}


def test_finding2_accuracy_needs_an_interval_above_dash(tmp_path):
    runs, steps = _runs(tmp_path, "pg_vs_ppo", [
        ("dash", "off", {0: 0.70, 1: 0.72, 2: 0.74}, {}),
        ("ppo_multi", "off", {0: 0.73, 1: 0.71, 2: 0.77}, {}),  # +3, -1, +3: inconclusive
        ("ppo_mini", "off", {0: 0.50, 1: 0.52, 2: 0.54}, {}),  # credibly lower
    ])
    v = FD.finding2(runs, steps)
    assert v.comparisons["PPO Multi > DASH"].verdict() == "inconclusive"
    assert v.comparisons["PPO Mini > DASH"].verdict() == "no"
    # no variant credibly higher, one not credibly lower: inconclusive; Mini falls 6-10 points in 3/3 runs (p 0.05)
    assert v.parts == {"accuracy": "inconclusive", "stability": "inconclusive"} and v.verdict == "inconclusive"
    assert "PPO Mini 3/3" in v.evidence


def test_finding4_equal_accuracy_is_a_non_inferiority_margin(tmp_path):
    grpo = {0: 0.80, 1: 0.82, 2: 0.84}
    def verdict(dash: dict, name: str):
        runs, steps = _runs(tmp_path / name, "algorithms", [("grpo", "off", grpo, {"step_s": 3.0}),
                                                              ("dash", "off", dash, {"step_s": 1.0})])
        return FD.finding4(runs, steps)

    close = verdict({0: 0.795, 1: 0.815, 2: 0.835}, "a")  # 0.5 points lower in every seed: within 2
    assert close.parts == {"faster": "yes", "equal accuracy": "yes"} and close.verdict == "yes"
    assert verdict({0: 0.70, 1: 0.72, 2: 0.74}, "b").parts["equal accuracy"] == "no"  # 10 points lower
    assert verdict({0: 0.76, 1: 0.83, 2: 0.82}, "c").parts["equal accuracy"] == "inconclusive"  # -4, +1, -2
