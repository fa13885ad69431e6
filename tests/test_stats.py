"""diffrl.stats against values computed by hand: clustered stderr, the mean over tags and its stderr, the paired
difference of two models on the same images."""

import math

import pytest

from diffrl.stats import by_tag, headline, paired, score_summary, summarize


def test_summarize_by_hand():
    # prompts 0 and 1, two images each: prompt means 1 and 3 -> stderr = stdev([1, 3]) / sqrt(2) = 1
    s = summarize([0.0, 2.0, 3.0, 3.0, math.nan], [0, 0, 1, 1, 1])
    assert s["mean"] == 2.0 and s["n"] == 4 and s["nonfinite"] == 1 and s["n_prompts"] == 2
    assert s["std"] == pytest.approx(math.sqrt(2.0))  # deviations -2, 0, 1, 1 -> 6 / 3
    assert s["stderr"] == pytest.approx(1.0)
    assert s["ci95"] == pytest.approx([2.0 - 12.706, 2.0 + 12.706])


def test_mean_over_tags_and_its_stderr_by_hand():
    # tag a: prompts 0, 1 with one image each, values 0 and 1 -> mean 0.5, stderr stdev([0, 1]) / sqrt(2) = 0.5
    # tag b: prompts 2, 3, 4, values 1, 1, 0 -> mean 2/3, stderr sqrt(1/3) / sqrt(3) = 1/3
    values, groups, tags = [0.0, 1.0, 1.0, 1.0, 0.0], [0, 1, 2, 3, 4], ["a", "a", "b", "b", "b"]
    s = by_tag(values, groups, tags)
    assert s["tags"]["a"]["mean"] == 0.5 and s["tags"]["b"]["mean"] == pytest.approx(2 / 3)
    assert s["mean_over_tags"] == pytest.approx((0.5 + 2 / 3) / 2)  # unweighted: not the per-image mean 0.6
    assert s["mean_over_tags_stderr"] == pytest.approx(math.sqrt(0.5**2 + (1 / 3) ** 2) / 2)
    assert headline(score_summary(values, groups, tags)) == (s["mean_over_tags"], s["mean_over_tags_stderr"])
    assert headline(score_summary(values, groups)) == (pytest.approx(0.6), summarize(values, groups)["stderr"])


def test_paired_difference_cancels_what_both_images_share():
    # per-prompt scores vary a lot, the change is +1 on every image: the paired stderr is 0, the unpaired one is not
    before = [0.0, 5.0, 10.0, 20.0]
    after = [1.0, 6.0, 11.0, 21.0]
    d = paired(before, after, [0, 1, 2, 3])
    assert d["mean"] == 1.0 and d["stderr"] == 0.0
    assert summarize(after, [0, 1, 2, 3])["stderr"] > 4
    # a pair with a non-finite score is left out
    d = paired([0.0, 1.0, math.nan], [1.0, 1.0, 3.0], [0, 1, 2])
    assert d["n"] == 2 and d["nonfinite"] == 1 and d["mean"] == 0.5
    with pytest.raises(ValueError, match="same images"):
        paired([0.0], [1.0, 2.0], [0])
