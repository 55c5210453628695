"""Tokenizer: lossless round trips, [EOS] handling, saving/loading, sampling and user errors."""

import os

import pyarrow.parquet as pq
import pytest
from conftest import sample_rows, tiny_corpus_rows, write_parquet
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from model.tokenizer import SPECIAL_TOKENS, _EvenlySpacedRows, has_tokenizer, load_tokenizer, train_tokenizer
from tests.cli_helpers import run_cli
from utils.errors import UserError

HARD_CASES = [
    "",
    " ",
    "   leading and trailing   ",
    "multiple   spaces\tand\ttabs\n\nand newlines\r\n",
    "你好，世界！这是一个测试。",
    "中英混排：Hello世界123，ok？",
    "全角字符：ＡＢＣ１２３，．！？（）",
    "emoji 😀👍🏽 👨‍👩‍👧 and flags 🇨🇳",
    "rare CJK extension B: 𠀀𠀁𪚥 and compatibility 丽",
    "combining marks: e\u0301 a\u0308 n\u0303 vs é",
    "zero width\u200bjoiner\u200d and nbsp\u00a0here",
    "math ∑∫√ and arrows → ← and ① ② ③",
    "digits 3.14159 2024-05-01 1,000,000",
    "\u3000ideographic space\u3000",
    "<s></s><pad> [PAD ] [eos] look-alikes are plain text",
    "\x00\x01 control \x7f characters",
]
# Characters that stress byte-level BPE: multi-byte scripts, whitespace of every kind, combining marks.
HARD_ALPHABET = st.sampled_from(list("你好世界，。！？、：；“”（）ＡＢＣ１２ 　\t\n\r😀𠀀éü\u0301\u200b\u00a0abcXYZ019.,-'\"["))


def round_trip(tokenizer, text):
    return tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True)


@pytest.fixture(scope="module")
def real_tokenizer(tmp_path_factory):
    """A tokenizer trained on part of the sample rows (real ones where ../shared has them), as the tiny one only
    saw a few phrases."""
    directory = tmp_path_factory.mktemp("real")
    train_file = write_parquet(directory / "rows.parquet", *sample_rows())
    return train_tokenizer(train_file, tmp_path_factory.mktemp("real") / "tokenizer", vocab_size=2000, max_rows=1000)


# The literal special-token strings ("[EOS]" ...) are matched as special tokens by design, so they are the one
# text the round trip cannot keep; see test_special_token_strings_in_text_are_read_as_special_tokens.
def no_special_token_strings(text):
    return not any(special in text for special in SPECIAL_TOKENS)


@settings(max_examples=1000, deadline=None)
@given(st.text())
def test_round_trip_is_exact_for_any_unicode_text(tiny_tokenizer, text):
    assume(no_special_token_strings(text))
    assert round_trip(tiny_tokenizer, text) == text


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=HARD_ALPHABET, max_size=60))
def test_round_trip_is_exact_for_text_dense_in_whitespace_and_multibyte_characters(tiny_tokenizer, text):
    assume(no_special_token_strings(text))
    assert round_trip(tiny_tokenizer, text) == text


@pytest.mark.parametrize("text", HARD_CASES)
def test_round_trip_is_exact_for_hand_written_hard_cases(tiny_tokenizer, real_tokenizer, text):
    assert round_trip(tiny_tokenizer, text) == text
    assert round_trip(real_tokenizer, text) == text


def test_round_trip_is_exact_for_every_row_of_the_real_sample(real_tokenizer):
    texts = [text for column in sample_rows() for text in column if text]
    encoded = real_tokenizer(texts)["input_ids"]
    decoded = real_tokenizer.batch_decode(encoded, skip_special_tokens=True)
    assert [index for index, (got, want) in enumerate(zip(decoded, texts)) if got != want] == []


def test_specials_have_ids_zero_to_three_and_are_the_named_tokens(tiny_tokenizer):
    assert tiny_tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [0, 1, 2, 3]
    assert (tiny_tokenizer.pad_token_id, tiny_tokenizer.eos_token_id) == (0, 1)
    assert (tiny_tokenizer.unk_token_id, tiny_tokenizer.bos_token_id) == (2, 3)


@pytest.mark.parametrize("text", ["", "你好", "Hello, world!", "一段比较长的中文文本，包含标点符号。" * 5])
def test_every_encoding_ends_with_exactly_one_eos(tiny_tokenizer, text):
    ids = tiny_tokenizer(text)["input_ids"]
    assert ids[-1] == tiny_tokenizer.eos_token_id
    assert ids.count(tiny_tokenizer.eos_token_id) == 1


@pytest.mark.parametrize("max_length", [1, 2, 5, 17, 64])
def test_truncation_keeps_eos_last_within_max_length(tiny_tokenizer, max_length):
    text = "这是一段需要被截断的很长的文本，with some English words too. " * 10
    ids = tiny_tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
    assert len(ids) == max_length
    assert ids[-1] == tiny_tokenizer.eos_token_id
    assert ids[:-1] == tiny_tokenizer(text)["input_ids"][: max_length - 1]


def test_tokenizer_reloaded_with_auto_tokenizer_gives_identical_ids(tiny_tokenizer_dir, tiny_tokenizer):
    reloaded = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    texts = HARD_CASES + tiny_corpus_rows(count=50, seed=7)[1]
    assert reloaded(texts)["input_ids"] == tiny_tokenizer(texts)["input_ids"]
    assert reloaded.pad_token == "[PAD]" and reloaded.eos_token == "[EOS]"
    assert reloaded.model_max_length >= 1_000_000


def test_special_token_strings_in_text_are_read_as_special_tokens(tiny_tokenizer):
    # Documented limitation: a literal "[EOS]" in user text becomes the [EOS] id and is dropped by decode.
    ids = tiny_tokenizer("a[EOS]b")["input_ids"]
    assert tiny_tokenizer.eos_token_id in ids[:-1]
    assert round_trip(tiny_tokenizer, "a[EOS]b") == "ab"


def test_text_is_never_unknown_because_every_byte_is_in_the_vocabulary(tiny_tokenizer):
    ids = tiny_tokenizer("𪚥😀\x00ÿ")["input_ids"]
    assert tiny_tokenizer.unk_token_id not in ids


@settings(max_examples=200, deadline=None)
@given(st.data(), st.integers(1, 500), st.integers(0, 2**32))
def test_row_sample_takes_exactly_the_cap_evenly_however_the_rows_are_chunked(data, total, seed):
    chosen = data.draw(st.integers(1, total))
    cuts = sorted(data.draw(st.sets(st.integers(1, total - 1), max_size=20)) if total > 1 else [])
    sample = _EvenlySpacedRows(total, chosen, seed)
    rows = [start + offset for start, end in zip([0, *cuts], [*cuts, total]) for offset in sample.between(start, end)]
    assert len(rows) == len(set(rows)) == chosen
    assert all(0 <= row < total for row in rows)
    gaps = [later - earlier for earlier, later in zip(rows, rows[1:])]
    assert all(total // chosen <= gap <= -(-total // chosen) for gap in gaps)


def test_max_rows_samples_the_whole_file_not_its_head(tmp_path):
    # First half only ever says 苹果, second half only 香蕉: a head-only sample would miss 香蕉.
    texts = ["苹果苹果苹果"] * 100 + ["香蕉香蕉香蕉"] * 100
    corpus = write_parquet(tmp_path / "halves.parquet", texts, texts, row_group_size=30)
    tokenizer = train_tokenizer(corpus, tmp_path / "tokenizer", vocab_size=300, max_rows=10)
    assert len(tokenizer("苹果", add_special_tokens=False)["input_ids"]) == 1
    assert len(tokenizer("香蕉", add_special_tokens=False)["input_ids"]) == 1


def test_training_reads_several_files_and_skips_null_and_empty_texts(tmp_path):
    first = write_parquet(tmp_path / "a.parquet", ["北京", None, ""], [None, "北京", "北京"])
    second = write_parquet(tmp_path / "b.parquet", ["上海上海"], [""])
    tokenizer = train_tokenizer([first, str(second)], tmp_path / "tokenizer", vocab_size=300)
    assert len(tokenizer("上海", add_special_tokens=False)["input_ids"]) == 1


def test_retraining_replaces_the_directory_and_leaves_no_temporary_files(tmp_path):
    corpus = write_parquet(tmp_path / "corpus.parquet", *tiny_corpus_rows(count=40))
    out_dir = tmp_path / "tokenizer"
    train_tokenizer(corpus, out_dir, vocab_size=400)
    train_tokenizer(corpus, out_dir, vocab_size=300)
    assert len(load_tokenizer(out_dir)) == 300
    assert sorted(os.listdir(tmp_path)) == ["corpus.parquet", "tokenizer"]


def test_has_tokenizer_tells_a_trained_directory_from_others(tiny_tokenizer_dir, tmp_path):
    assert has_tokenizer(tiny_tokenizer_dir)
    assert not has_tokenizer(tmp_path)
    assert not has_tokenizer(tmp_path / "missing")


def test_missing_file_is_a_user_error_naming_it(tmp_path):
    with pytest.raises(UserError, match="nope.parquet"):
        train_tokenizer(tmp_path / "nope.parquet", tmp_path / "tokenizer")


def test_non_parquet_file_is_a_user_error_naming_it(tmp_path):
    not_parquet = tmp_path / "notes.parquet"
    not_parquet.write_text("prompt,response\n")
    with pytest.raises(UserError, match="notes.parquet.*not a readable parquet"):
        train_tokenizer(not_parquet, tmp_path / "tokenizer")


def test_missing_column_is_a_user_error_naming_file_and_column(tmp_path):
    import pyarrow as pa

    path = tmp_path / "questions.parquet"
    pq.write_table(pa.table({"prompt": ["你好"], "answer": ["好"]}), path)
    with pytest.raises(UserError, match="questions.parquet.*response"):
        train_tokenizer(path, tmp_path / "tokenizer")


def test_file_without_any_text_is_a_user_error(tmp_path):
    empty = write_parquet(tmp_path / "empty.parquet", [None, ""], ["", None])
    with pytest.raises(UserError, match="empty.parquet.*no non-empty"):
        train_tokenizer(empty, tmp_path / "tokenizer")
    assert not (tmp_path / "tokenizer").exists()


def test_too_small_vocab_size_is_a_user_error(tmp_path):
    corpus = write_parquet(tmp_path / "corpus.parquet", ["你好"], ["好"])
    with pytest.raises(UserError, match="vocab_size"):
        train_tokenizer(corpus, tmp_path / "tokenizer", vocab_size=100)


def test_output_directory_with_other_files_is_not_overwritten(tmp_path):
    corpus = write_parquet(tmp_path / "corpus.parquet", ["你好"], ["好"])
    out_dir = tmp_path / "model"
    out_dir.mkdir()
    (out_dir / "model.safetensors").write_text("weights")
    with pytest.raises(UserError, match="tokenizer_dir .*model.safetensors"):
        train_tokenizer(corpus, out_dir, vocab_size=300)
    assert os.listdir(out_dir) == ["model.safetensors"]


def test_loading_a_missing_or_empty_directory_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="tokenizer_dir .*missing"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(UserError, match="tokenizer_dir .*no tokenizer.json"):
        load_tokenizer(tmp_path)


def test_loading_a_damaged_tokenizer_is_a_user_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="tokenizer_dir .*cannot load"):
        load_tokenizer(tmp_path)


def test_loading_a_tokenizer_without_our_specials_is_a_user_error(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path)
    foreign = AutoTokenizer.from_pretrained(str(tmp_path))
    foreign.eos_token = "[BOS]"
    foreign.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="tokenizer_dir .*special tokens"):
        load_tokenizer(tmp_path)


def test_a_non_string_column_is_a_user_error_naming_it(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "response": [1, 2]}), path)
    with pytest.raises(UserError, match="numbers.parquet.*'response' must hold strings"):
        train_tokenizer(path, tmp_path / "tokenizer")


@pytest.mark.slow
def test_the_command_refuses_to_replace_a_tokenizer_unless_asked_and_says_when_the_vocabulary_is_smaller(tmp_path):
    prompts, responses = tiny_corpus_rows(40)
    corpus = write_parquet(tmp_path / "corpus.parquet", prompts, responses)
    flags = {"train_file": corpus, "tokenizer_dir": tmp_path / "tokenizer", "vocab_size": 300}
    first = run_cli("train_tokenizer", flags)
    assert "note:" not in first.stdout  # 300 tokens are there to be had
    before = (tmp_path / "tokenizer" / "tokenizer.json").read_bytes()
    refused = run_cli("train_tokenizer", dict(flags, vocab_size=5000), check=False)
    assert refused.returncode == 2 and refused.stderr == (
        f"error: --tokenizer_dir={tmp_path / 'tokenizer'} holds a tokenizer already: give a new directory, or "
        "--overwrite=True to replace it (models trained with the old tokenizer do not work with the new one)\n")
    assert (tmp_path / "tokenizer" / "tokenizer.json").read_bytes() == before
    replaced = run_cli("train_tokenizer", dict(flags, vocab_size=5000, overwrite=True))
    size = len(load_tokenizer(tmp_path / "tokenizer"))
    assert size < 5000 and f"note: {size} tokens, fewer than --vocab_size=5000" in replaced.stdout
