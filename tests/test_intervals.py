"""The results pages' intervals and paired tests against values computed by hand."""

import pytest

from modalkv.eval.intervals import average_interval, bootstrap, compare, interval, mcnemar, sign_flip, wilson


def test_wilson_matches_the_textbook_values():
    assert wilson(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)


def test_exact_mcnemar_is_twice_the_binomial_tail_of_the_discordant_pairs():
    assert mcnemar(0, 10) == pytest.approx(2 / 1024)
    assert mcnemar(1, 5) == pytest.approx(2 * 7 / 64)
    assert mcnemar(3, 3) == 1.0 and mcnemar(0, 0) == 1.0


def test_sign_flip_and_bootstrap():
    assert sign_flip([0.1] * 10) == pytest.approx(2 / 1024, abs=0.002)  # all 2^10 sign patterns, two as extreme
    assert sign_flip([0.3, -0.3, 0.2, -0.2]) == 1.0
    assert bootstrap([[0.4] * 5]) == pytest.approx((0.4, 0.4))
    low, high = bootstrap([[0.0, 0.5, 1.0] * 10])
    assert low < 0.5 < high and high - low < 0.5


def test_zero_one_scores_get_wilson_and_others_a_bootstrap():
    assert interval([1.0, 0.0, 1.0, 1.0]) == wilson(3, 4)
    assert interval([0.25, 0.5, 0.75]) != wilson(1.5, 3)
    assert average_interval([[1.0] * 10, [0.0] * 10]) == wilson(10, 20)  # never collapses to a point


def test_a_paired_comparison_counts_the_examples_each_method_wins():
    method = {"a": 1.0, "b": 1.0, "c": 0.0, "d": 1.0, "only-here": 1.0}
    reference = {"a": 0.0, "b": 1.0, "c": 1.0, "d": 0.0}
    result = compare(method, reference, ("snapkv", 0.2, "full"))
    assert (result.examples, result.better, result.worse) == (4, 2, 1)
    assert result.difference == pytest.approx(0.25) and result.test == "McNemar"
    assert result.p_value == pytest.approx(mcnemar(2, 1))
    assert compare({"x": 0.5}, {"y": 0.5}, ("a", 0.2, "full")) is None
