"""Corpus BLEU-4 for Chinese text, scored like sacrebleu's `tokenize="zh"` but computed with nltk.

sacrebleu is the number people quote, so the score must agree with
`sacrebleu.corpus_bleu(hyps, [refs], tokenize="zh").score / 100`; it stays a test-only dependency, and the
tokenization rules below are re-implemented from its documented behaviour.
"""

import re
from fractions import Fraction

from nltk.translate.bleu_score import corpus_bleu

MAX_ORDER = 4

# Code points sacrebleu's zh tokenizer treats as one-character tokens. Its table is written as string bounds,
# and two entries meant for the supplementary planes ('\u20000', '\u2f800') are really two-character strings,
# so the comparison effectively covers U+2001..U+2A6D (general punctuation, symbols, dingbats) and none of
# CJK Extension B. We list the ranges it *actually* matches, since agreeing with its scores is the point.
_SACREBLEU_ZH_RANGES = (
    ("\u2001", "\u2a6d"),
    ("\u2e80", "\u2fdf"),  # radicals, Kangxi radicals
    ("\u2ff0", "\u303f"),  # ideographic description characters, CJK punctuation
    ("\u3100", "\u312f"),  # bopomofo
    ("\u31a0", "\u31ef"),  # bopomofo extended, CJK strokes
    ("\u3200", "\u4db5"),  # enclosed CJK, compatibility, Extension A
    ("\u4e00", "\u9fbb"),  # CJK unified ideographs
    ("\uf900", "\ufa2d"),  # compatibility ideographs
    ("\ufa30", "\ufa6a"),
    ("\ufa70", "\ufad9"),
    ("\ufe10", "\ufe1f"),  # vertical forms
    ("\ufe30", "\ufe4f"),  # CJK compatibility forms
    ("\uff00", "\uffef"),  # full-width ASCII and half-width forms
)
_CJK_CHAR = re.compile("([" + "".join(f"{low}-{high}" for low, high in _SACREBLEU_ZH_RANGES) + "])")

# The mteval-v13a rules for the remaining text, applied in this order because each rule sees the spaces the
# previous one inserted. `[0-9]` is deliberate: `\d` would also match full-width and other Unicode digits.
_WESTERN_RULES = (
    # Every ASCII punctuation mark except the apostrophe, comma, period and hyphen is its own token.
    (re.compile(r"([!-&(-+/:-@\[-`{-~])"), r" \1 "),
    # A period or comma is split off unless it sits between digits (3.14, 1,000).
    (re.compile(r"([^0-9])([.,])"), r"\1 \2 "),
    (re.compile(r"([.,])([^0-9])"), r" \1 \2"),
    # A hyphen right after a digit is split off (ranges such as 1990-2000).
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
)


def tokenize_zh(text: str) -> list[str]:
    """Splits `text` into BLEU tokens: one per CJK character, words and punctuation elsewhere."""
    # Stripped first: a leading space would count as the non-digit that splits off a leading ".5".
    spaced = _CJK_CHAR.sub(r" \1 ", text.strip())
    for pattern, replacement in _WESTERN_RULES:
        spaced = pattern.sub(replacement, spaced)
    return spaced.split()


def _ngram_slots(length: int, order: int) -> int:
    return max(0, length - order + 1)


class _SacrebleuSmoothing:
    """nltk smoothing hook that turns nltk's n-gram precisions into sacrebleu's.

    nltk counts a hypothesis shorter than n as having one n-gram (`max(1, ...)` in its modified precision);
    sacrebleu counts none. We remove those phantom n-grams from each denominator, then apply the NIST
    geometric smoothing ('exp', sacrebleu's default, nltk's method3): the k-th order with no match gets
    precision 1 / (2^k * total).
    """

    def __init__(self, phantom_ngrams_per_order: list[int]):
        self.phantom_ngrams_per_order = phantom_ngrams_per_order

    def __call__(self, precisions: list[Fraction], **_context) -> list[float]:
        smoothed = []
        doublings = 0
        for precision, phantom in zip(precisions, self.phantom_ngrams_per_order):
            total = precision.denominator - phantom
            if precision.numerator == 0:
                doublings += 1
                smoothed.append(1.0 / (2**doublings * total))
            else:
                smoothed.append(precision.numerator / total)
        return smoothed


def bleu4(hypotheses: list[str], references: list[str]) -> float:
    """Corpus BLEU-4 in [0, 1] of `hypotheses` against one reference each; 0.0 for an empty corpus."""
    if len(hypotheses) != len(references):
        raise ValueError(f"bleu4 got {len(hypotheses)} hypotheses but {len(references)} references")
    hypothesis_tokens = [tokenize_zh(hypothesis) for hypothesis in hypotheses]
    reference_tokens = [[tokenize_zh(reference)] for reference in references]

    orders = range(1, MAX_ORDER + 1)
    # sacrebleu scores 0 when the corpus has no n-grams of some order (its log of a zero precision).
    if any(sum(_ngram_slots(len(tokens), n) for tokens in hypothesis_tokens) == 0 for n in orders):
        return 0.0
    phantom_ngrams = [sum(1 for tokens in hypothesis_tokens if len(tokens) < n) for n in orders]
    score = corpus_bleu(
        reference_tokens,
        hypothesis_tokens,
        weights=(1.0 / MAX_ORDER,) * MAX_ORDER,
        smoothing_function=_SacrebleuSmoothing(phantom_ngrams),
    )
    return float(score)
