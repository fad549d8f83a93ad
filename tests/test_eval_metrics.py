"""MileBench's scoring against hand-computed cases, quirks included (they change the published numbers)."""

import pytest

from modalkv.eval import metrics

OPTIONS = {"A": "cat", "B": "dog"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # "(" has a space before it: removed; ")" has none around it: becomes a space; the final "." goes.
        ("The answer is: (B).", "the answer is: b"),
        ("1,000 apples.", "1000 apples"),  # a digit,digit comma: every punctuation mark is dropped, none spaced
        ("3.5 m", "3.5 m"),  # a period before a digit stays
        ("'Quoted'\n\ttext", "quoted'  text"),  # quotes only stripped at the ends, after the spaces
        ("a-b c", "a b c"),
    ],
)
def test_normalize(text, expected):
    assert metrics.normalize(text) == expected


def test_period_strip_stops_after_32_periods_as_the_official_code_does():
    assert metrics.normalize("." * 40 + "x") == "." * 8 + "x"


@pytest.mark.parametrize(
    ("answer", "letter"),
    [
        ("b dog", "B"),  # letter + option text
        ("i think it is a dog", "B"),  # option text alone
        ("b", "B"),  # a bare letter
        ("the answer is b", "AB"),  # fallback: every option letter in the text ("a" of "answer"), so wrong
        ("", "C"),  # an empty answer counts as C
        ("xyz", ""),
    ],
)
def test_match_choice(answer, letter):
    assert metrics.match_choice(answer, OPTIONS) == letter


def test_multiple_choice_score():
    choices = ["Opened the door.", "Took the cup.", "Sat down."]
    assert metrics.multiple_choice_score("B. Took the cup.", "Took the cup.", choices) == 1.0
    assert metrics.multiple_choice_score("Took the cup", "Took the cup.", choices) == 1.0
    assert metrics.multiple_choice_score("A", "Took the cup.", choices) == 0.0
    assert metrics.multiple_choice_score("", "Sat down.", choices) == 1.0  # the official empty answer -> "C"
    with pytest.raises(ValueError, match="not one of the choices"):
        metrics.multiple_choice_score("A", "Flew away.", choices)


def test_rouge_l_counts_distinct_words_like_the_rouge_package():
    # LCS "the cat on the mat" has 5 tokens but 4 distinct words; each side has 5 distinct words: F = 0.8.
    # (Token-level ROUGE-L would give 5/6.)
    assert metrics.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(0.8, abs=1e-6)
    # Sentences split on ".": union LCS {a} + {c} over the reference's 2 words; the answer has 4: F = 2/3.
    assert metrics.rouge_l("a b. c d", "a c") == pytest.approx(2 / 3, abs=1e-6)
    assert metrics.rouge_l("x y", "a b") == 0.0
    assert metrics.rouge_l("a b", "a b") == pytest.approx(1.0, abs=1e-6)


def test_open_ended_score_normalises_and_scores_empty_answers_zero():
    assert metrics.open_ended_score("The gray cube became BLUE.", "the gray cube became blue") == pytest.approx(1.0)
    assert metrics.open_ended_score("...", "the gray cube") == 0.0


def test_needle_is_a_whole_word_and_mmcoqa_a_substring():
    assert metrics.needle_score("The secret word is Rhubarb.", "rhubarb") == 1.0
    assert metrics.needle_score("rhubarbs", "rhubarb") == 0.0
    assert metrics.substring_score("rhubarbs", "rhubarb") == 1.0
    assert metrics.substring_score("It was in 1998.", "1998") == 1.0
    assert metrics.substring_score("19 98", "1998") == 0.0
