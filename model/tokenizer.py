"""Lossless byte-level BPE tokenizer trained from the `prompt`/`response` columns of parquet files (or, for raw text
and span corruption, from one text column; that tokenizer also has T5's 100 sentinel tokens, <extra_id_0>...).

Lossless means `decode(encode(text), skip_special_tokens=True) == text` for any Unicode text that does not spell
out a special token ([PAD], [EOS], [UNK], [BOS], and with sentinels <extra_id_N>), which rules out
normalizers (NFKC folds full-width characters) and anything that eats whitespace. Byte-level BPE gets it for
free: every text is a byte sequence and every byte is in the vocabulary, so there is never an unknown token.
"""

import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow
import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from data_pipeline.parquet import TEXT_COLUMNS, open_parquet, read_batches, read_footer
from data_pipeline.span_corruption import sentinel_tokens
from utils.atomic import replace_directory
from utils.errors import UserError

PAD, EOS, UNK, BOS = "[PAD]", "[EOS]", "[UNK]", "[BOS]"
SPECIAL_TOKENS = (PAD, EOS, UNK, BOS)  # ids 0..3, in this order
# BPE training memory grows with the amount of *distinct* text (byte-level words of whole Chinese clauses):
# about 8 MB per 1,000 rows of ~250 characters on top of ~480 MB for torch, the trainer and pyarrow. 40,000
# evenly spaced rows keep a 1M-row corpus under 1 GB, and are plenty to rank the frequent merges of a
# 32k vocabulary. Pass max_rows=None to train on every row.
DEFAULT_MAX_ROWS = 40_000
# Sequences are cut by the dataset's max_seq_len, never by the tokenizer's own limit.
MODEL_MAX_LENGTH = 1_000_000_000
# The files `save_pretrained` writes; a directory holding anything else is not ours to replace.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _as_paths(files) -> list[Path]:
    if isinstance(files, (str, os.PathLike)):
        return [Path(files)]
    return [Path(file) for file in files]


def _open_parquet(path: Path, columns) -> pq.ParquetFile:
    # Any text trains the tokenizer: a file whose prompts (or responses) are all empty still has the others.
    read_footer(str(path), columns, require_usable=False)
    return open_parquet(str(path))


class _EvenlySpacedRows:
    """Picks `chosen` of `total` global row numbers, evenly spaced and shifted by a seeded phase.

    Chosen row j is `(j * total + phase) // chosen`, so a cap samples the whole corpus instead of its head,
    with O(1) state however large the corpus.
    """

    def __init__(self, total: int, chosen: int, seed: int):
        self.total, self.chosen = total, chosen
        self.phase = random.Random(seed).randrange(total)

    def _first_index_at_or_after(self, row: int) -> int:
        return max(0, -((self.phase - row * self.chosen) // self.total))  # ceil((row*chosen - phase) / total)

    def any_between(self, start: int, end: int) -> bool:
        return self._first_index_at_or_after(start) < self._first_index_at_or_after(end)

    def between(self, start: int, end: int) -> list[int]:
        """The chosen rows in [start, end), as offsets from `start`."""
        indices = range(self._first_index_at_or_after(start), self._first_index_at_or_after(end))
        return [(index * self.total + self.phase) // self.chosen - start for index in indices]


def _texts_of_row_group(
    path: Path, parquet: pq.ParquetFile, group: int, first_row: int, sample: _EvenlySpacedRows, columns
) -> Iterator[str]:
    batch_start = first_row
    for batch in read_batches(parquet, str(path), columns, row_group=group):
        rows = sample.between(batch_start, batch_start + batch.num_rows)
        batch_start += batch.num_rows
        # Picking rows in Arrow first means unchosen texts never become Python strings.
        chosen = batch.take(pyarrow.array(rows, type=pyarrow.int64()))
        for row in zip(*(chosen.column(name).to_pylist() for name in columns)):
            yield from (text for text in row if text)


def _iter_texts(parquets: list[tuple[Path, pq.ParquetFile]], max_rows: int | None, seed: int, columns
                ) -> Iterator[str]:
    """Non-empty texts of `columns` in (a sample of at most `max_rows` rows of) all files, in file order."""
    total_rows = sum(parquet.metadata.num_rows for _, parquet in parquets)
    if total_rows == 0:
        return
    sample = _EvenlySpacedRows(total_rows, total_rows if max_rows is None else min(max_rows, total_rows), seed)
    first_row = 0
    for path, parquet in parquets:
        for group in range(parquet.metadata.num_row_groups):
            group_end = first_row + parquet.metadata.row_group(group).num_rows
            if sample.any_between(first_row, group_end):  # otherwise the group is never read
                yield from _texts_of_row_group(path, parquet, group, first_row, sample, columns)
            first_row = group_end


def _new_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    # No normalizer: it would make decoding lossy. No prefix space and untrimmed offsets, so leading and
    # repeated spaces survive the round trip.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _wrap(tokenizer: Tokenizer, sentinels: list[str]) -> PreTrainedTokenizerFast:
    eos_id = tokenizer.token_to_id(EOS)
    # T5 style: every sequence ends in [EOS]; truncation reserves room for it.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, eos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        bos_token=BOS,
        additional_special_tokens=sentinels,  # dropped by decode(skip_special_tokens=True), as the others
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,  # its "cleanup" deletes spaces before punctuation
    )


def _replace_directory(new_dir: Path, out_dir: Path) -> None:
    """Moves `new_dir` to `out_dir`; an existing tokenizer there is swapped out, never half-overwritten."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"tokenizer_dir {out_dir}: exists and is not a directory")
    foreign = sorted(entry.name for entry in out_dir.iterdir() if entry.name not in TOKENIZER_FILES) \
        if out_dir.exists() else []
    if foreign:
        raise UserError(f"tokenizer_dir {out_dir}: holds other files ({', '.join(foreign[:3])}); choose another")
    replace_directory(str(new_dir), str(out_dir))


def train_tokenizer(
    files, out_dir, vocab_size=32000, max_rows=DEFAULT_MAX_ROWS, seed=0, text_column=None
) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE on the texts of `files` (a path or a list of paths) and saves it to `out_dir`.

    The texts are the prompts and responses, or with `text_column` that column's documents; such a tokenizer is
    meant for span corruption and gets T5's 100 sentinel tokens (ids 4 to 103, after the four special tokens).

    Reads in bounded memory, batch by batch. `max_rows` caps the rows used (None: all), evenly spaced over
    all files with a `seed`-dependent phase, which also bounds the trainer's memory. Null and empty texts are
    skipped.
    """
    columns = (text_column,) if text_column else TEXT_COLUMNS
    sentinels = sentinel_tokens() if text_column else []
    minimum_vocab = len(SPECIAL_TOKENS) + len(sentinels) + len(pre_tokenizers.ByteLevel.alphabet()) + 1
    if vocab_size < minimum_vocab:
        raise UserError(f"vocab_size {vocab_size}: must be at least {minimum_vocab} (specials"
                        f"{' and sentinels' * bool(sentinels)} + 256 bytes + 1)")
    if max_rows is not None and max_rows < 1:
        raise UserError(f"max_rows {max_rows}: must be positive")
    paths = _as_paths(files)
    if not paths:
        raise UserError("train file: no files given")
    parquets = [(path, _open_parquet(path, columns)) for path in paths]

    texts_seen = 0

    def counted_texts() -> Iterator[str]:
        nonlocal texts_seen
        for text in _iter_texts(parquets, max_rows, seed, columns):
            texts_seen += 1
            yield text

    tokenizer = _new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS) + sentinels,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, so no text is ever unknown
        show_progress=False,
    )
    tokenizer.train_from_iterator(counted_texts(), trainer=trainer)
    if texts_seen == 0:
        raise UserError(f"train file {', '.join(map(str, paths))}: no non-empty text in {' or '.join(columns)}")

    wrapped = _wrap(tokenizer, sentinels)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        wrapped.save_pretrained(staging_dir)
        _replace_directory(staging_dir, out_dir)
    finally:
        shutil.rmtree(staging_dir, ignore_errors=True)
    return wrapped


def has_tokenizer(tokenizer_dir) -> bool:
    """True when `tokenizer_dir` holds a saved tokenizer (without loading it)."""
    return (Path(tokenizer_dir) / "tokenizer.json").is_file()


def tokenizer_fingerprint(tokenizer_dir) -> str:
    """A hash of what splits text into ids: what a saved run records and a resume compares. A model's copy of the
    tokenizer (final/, best/) has the fingerprint of the original, so either serves a resume."""
    canonical = json.dumps(_ids_defining_parts(tokenizer_dir), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def tokenize_alike(first_dir, second_dir) -> bool:
    """Whether two saved tokenizers split text into the same ids."""
    return _ids_defining_parts(first_dir) == _ids_defining_parts(second_dir)


def _ids_defining_parts(tokenizer_dir) -> dict:
    """tokenizer.json without what does not change the ids: a model's copy records the truncation length of the
    run that saved it (and may record padding)."""
    described = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    return {part: value for part, value in described.items() if part not in ("truncation", "padding")}


def load_tokenizer(tokenizer_dir) -> PreTrainedTokenizerFast:
    """Loads a tokenizer saved by `train_tokenizer` (or with a model), checking its special tokens."""
    if not Path(tokenizer_dir).is_dir():
        raise UserError(f"tokenizer_dir {tokenizer_dir}: no such directory (run train_tokenizer first)")
    if not has_tokenizer(tokenizer_dir):
        raise UserError(f"tokenizer_dir {tokenizer_dir}: no tokenizer.json in it (run train_tokenizer first)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except Exception as error:  # any failure here means a damaged directory, which the user must fix
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"tokenizer_dir {tokenizer_dir}: cannot load the tokenizer ({reason})") from None
    declared = (tokenizer.pad_token, tokenizer.eos_token, tokenizer.unk_token, tokenizer.bos_token)
    vocab = tokenizer.get_vocab()
    if declared != SPECIAL_TOKENS or any(token not in vocab for token in SPECIAL_TOKENS):
        raise UserError(
            f"tokenizer_dir {tokenizer_dir}: needs special tokens {', '.join(SPECIAL_TOKENS)} as pad/eos/unk/bos"
        )
    return tokenizer
