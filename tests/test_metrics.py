"""bleu4 agrees with sacrebleu's zh-tokenized corpus BLEU on random and real text."""

import random
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, sample_rows
from hypothesis import given, settings
from hypothesis import strategies as st

from utils.metrics import bleu4, tokenize_zh

sacrebleu = pytest.importorskip("sacrebleu")
from sacrebleu.tokenizers.tokenizer_zh import TokenizerZh  # noqa: E402  (needs the importorskip first)

TOLERANCE = 1e-9  # the code computes the same sums as sacrebleu: agreement to rounding, not "close"

# Pieces that exercise every tokenization rule: CJK, CJK and full-width punctuation, words, numbers with
# periods, commas and hyphens, ASCII symbols, odd whitespace, and characters outside sacrebleu's CJK table.
PIECES = list("的一是了我不人在他有这个上们来到时大地为子中你说生国年着就那和要她出也得里后自以会") + list(
    "，。！？、；：“”（）《》…—～ＡＢ１２"
) + [
    "hello", "world", "the", "a", "model", "3.14", "1,000", "1990-2000", "e.g.", "don't", "x-y", ".5", "a..b",
    "&amp;", "(", ")", "$", "'", "-", ",", ".", "!", "@", "𠀀", "😀", "é", "\u2003", "→", " ", " ", "  ", "\t", "\n",
]

MIXED_TEXT = st.lists(st.sampled_from(PIECES), max_size=25).map("".join)


def sacrebleu_score(hypotheses, references):
    return sacrebleu.corpus_bleu(hypotheses, [references], tokenize="zh").score / 100


def assert_agrees_with_sacrebleu(hypotheses, references):
    assert bleu4(hypotheses, references) == pytest.approx(sacrebleu_score(hypotheses, references), abs=TOLERANCE)


def random_text(rng, max_pieces):
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(0, max_pieces)))


def edited(rng, text, max_edits):
    """`text` with a few random character deletions, insertions and substitutions."""
    chars = list(text)
    for _ in range(rng.randint(0, max_edits)):
        position = rng.randint(0, len(chars))
        action = rng.choice(("delete", "insert", "substitute"))
        if action == "insert" or not chars:
            chars.insert(position, rng.choice(PIECES))
        elif action == "delete":
            del chars[min(position, len(chars) - 1)]
        else:
            chars[min(position, len(chars) - 1)] = rng.choice(PIECES)
    return "".join(chars)


def random_corpus(rng):
    references = [random_text(rng, 30) for _ in range(rng.randint(1, 8))]
    hypotheses = []
    for reference in references:
        kind = rng.random()
        if kind < 0.15:
            hypotheses.append(reference)
        elif kind < 0.25:
            hypotheses.append("")
        elif kind < 0.35:
            hypotheses.append(random_text(rng, 30))
        else:
            hypotheses.append(edited(rng, reference, 6))
    return hypotheses, references


@pytest.mark.parametrize("seed", range(10))
def test_bleu4_equals_sacrebleu_on_random_mixed_text_with_partial_matches(seed):
    rng = random.Random(seed)
    for _ in range(100):
        hypotheses, references = random_corpus(rng)
        assert_agrees_with_sacrebleu(hypotheses, references)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_tokenization_matches_sacrebleu_zh_for_any_text(text):
    assert tokenize_zh(text) == TokenizerZh()(text.rstrip()).split()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(MIXED_TEXT, MIXED_TEXT), min_size=1, max_size=6))  # sacrebleu rejects []
def test_bleu4_equals_sacrebleu_for_any_small_corpus(pairs):
    hypotheses = [hypothesis for hypothesis, _ in pairs]
    references = [reference for _, reference in pairs]
    assert_agrees_with_sacrebleu(hypotheses, references)


@pytest.fixture(scope="module")
def real_responses():
    return [text for text in sample_rows("sample_valid_1k.parquet")[1] if text]


def test_bleu4_equals_sacrebleu_on_every_real_row_with_random_edits(real_responses):
    rng = random.Random(0)
    assert_agrees_with_sacrebleu([edited(rng, response, 20) for response in real_responses], real_responses)


# Scoring is slow-ish (nltk counts n-grams in Python), so the finer cases use a seeded sample of rows.
@pytest.mark.parametrize("max_edits", [0, 5, 40, 200])
def test_bleu4_equals_sacrebleu_on_real_rows_with_few_to_many_edits(real_responses, max_edits):
    rng = random.Random(max_edits)
    references = rng.sample(real_responses, 250)
    assert_agrees_with_sacrebleu([edited(rng, reference, max_edits) for reference in references], references)


def test_bleu4_equals_sacrebleu_on_real_rows_cut_short_or_shuffled(real_responses):
    rng = random.Random(1)
    references = rng.sample(real_responses, 250)
    # Truncated hypotheses trigger the brevity penalty; shuffled ones keep unigrams but few longer n-grams.
    truncated = [reference[: rng.randint(0, len(reference))] for reference in references]
    shuffled = ["".join(rng.sample(reference, len(reference))) for reference in references]
    assert_agrees_with_sacrebleu(truncated, references)
    assert_agrees_with_sacrebleu(shuffled, references)


def test_perfect_match_scores_one():
    references = ["今天天气很好，我们去公园散步吧。", "The model (T5) scored 3.14 on 2024-05-01."]
    assert bleu4(references, references) == pytest.approx(1.0)


def test_disjoint_text_scores_zero():
    assert bleu4(["今天天气很好，我们去公园散步吧。"], ["completely different english words here"]) == 0.0


def test_empty_corpus_and_empty_hypotheses_score_zero():
    assert bleu4([], []) == 0.0
    assert bleu4(["", ""], ["参考答案一", "参考答案二"]) == 0.0


def test_hypotheses_too_short_for_four_grams_score_zero_like_sacrebleu():
    assert bleu4(["你好"], ["你好"]) == 0.0 == sacrebleu_score(["你好"], ["你好"])


def test_mismatched_lengths_are_rejected():
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        bleu4(["一", "二"], ["一"])


def test_metrics_module_works_without_sacrebleu_installed():
    # sacrebleu is a test-only dependency: block it in a fresh interpreter and score something.
    script = (
        "import sys; sys.modules['sacrebleu'] = None\n"
        "from utils.metrics import bleu4\n"
        "print(bleu4(['今天天气很好'], ['今天天气很好']))"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) == pytest.approx(1.0)
