"""MileBench's scoring, ported from its official `evaluate.py` (and ROUGE-L from `rouge==1.0.1`, which it pins).

The quirks are kept on purpose, because they change the numbers papers report: the punctuation rule looks at the
whole text, the period regex runs at most 32 times (`re.UNICODE` is passed as `count`), an empty multiple-choice
answer counts as option "C", and ROUGE-L counts distinct words (the `rouge` package's set-based "exclusive" mode).
"""

from __future__ import annotations

import re

_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_REGEX_SPECIALS = ["\\", ".", "^", "$", "*", "+", "?", "{", "}", "[", "]", "|", "(", ")"]


def normalize(text: str) -> str:
    """MileBench's `process()`: newlines and tabs to spaces, VQA punctuation rules, quotes stripped, lower case."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _PUNCT:
        if p + " " in text or " " + p in text or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_STRIP.sub("", out, 32)  # the official code passes re.UNICODE (= 32) as the count
    return out.strip("'").strip('"').strip().lower()


def _option_pattern(option: str) -> str:
    """The official escaping: normalise, then backslash the regex specials one by one (in this order)."""
    option = normalize(option)
    for char in _REGEX_SPECIALS:
        option = option.replace(char, "\\" + char)
    return option


def match_choice(text: str, options: dict[str, str]) -> str:
    """The option letter(s) a normalised answer picks, as MileBench's `match_choice` finds them.

    In order: "<letter> <option text>" anywhere; an option's text with spaces removed; a bare one-letter answer;
    else every character of the answer that is an option letter, upper-cased and joined (so "the answer is b"
    gives "AB", which matches nothing).
    """
    if text == "":
        return "C"
    try:
        letter_and_text = "|".join(_option_pattern(f"{k} {v}") for k, v in options.items())
        found = re.search(rf"({letter_and_text})", text, re.S)
        if found:
            return found.group(0)[0].upper()
        texts = "|".join(_option_pattern(v).replace(" ", "") for v in options.values())
        found = re.search(rf"({texts})", text.replace(" ", ""), re.S)
        if found:
            for k, v in options.items():
                if found[0].strip() == _option_pattern(v).replace(" ", ""):
                    return k.upper()
        if len(text) == 1 and text.upper() in options:
            return text.upper()
    except re.error:  # the official code returns the text itself on any failure
        return text
    return "".join(c.upper() for c in text if c.upper() in options)


def multiple_choice_score(prediction: str, reference: str, choices: list[str]) -> float:
    """1.0 if the answer picks the letter of `reference` (one of `choices`; letters A, B, ... by position)."""
    choices = [normalize(c) for c in choices]
    reference = normalize(reference)
    if reference not in choices:
        raise ValueError(f"the reference answer {reference!r} is not one of the choices {choices}")
    options = {chr(65 + i): c for i, c in enumerate(choices)}
    return float(match_choice(normalize(prediction), options) == chr(65 + choices.index(reference)))


def _lcs_words(x: list[str], y: list[str]) -> set[str]:
    """The distinct words of the one LCS of x and y that `rouge`'s `_recon_lcs` reconstructs (its tie-breaking)."""
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            table[i][j] = table[i - 1][j - 1] + 1 if x[i - 1] == y[j - 1] else max(table[i - 1][j], table[i][j - 1])
    words, i, j = set(), len(x), len(y)
    while i and j:
        if x[i - 1] == y[j - 1]:
            words.add(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F as `rouge==1.0.1` computes it: sentences split on ".", summary-level union LCS, distinct words."""
    hyp = [" ".join(s.split()) for s in prediction.split(".") if s]
    ref = [" ".join(s.split()) for s in reference.split(".") if s]
    if not hyp or not ref:
        return 0.0  # `rouge` raises here; MileBench never gets this far with an empty answer (scored 0)
    m = len({w for s in ref for w in s.split(" ")})
    n = len({w for s in hyp for w in s.split(" ")})
    union: set[str] = set()
    for ref_sentence in ref:
        for hyp_sentence in hyp:
            union |= _lcs_words(ref_sentence.split(" "), hyp_sentence.split(" "))
    recall, precision = len(union) / m, len(union) / n
    return 2.0 * (precision * recall) / (precision + recall + 1e-8)


def open_ended_score(prediction: str, reference: str) -> float:
    """ROUGE-L F of the normalised texts; an empty answer scores 0."""
    prediction = normalize(prediction)
    return 0.0 if prediction == "" else rouge_l(prediction, normalize(reference))


def needle_score(prediction: str, reference: str) -> float:
    """1.0 if the normalised reference is one of the normalised answer's whitespace-separated words."""
    return float(normalize(reference) in normalize(prediction).split())


def substring_score(prediction: str, reference: str) -> float:
    """1.0 if the normalised reference occurs anywhere in the normalised answer (MMCoQA)."""
    return float(normalize(reference) in normalize(prediction))
