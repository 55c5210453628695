"""Raw text → packed, span-corrupted T5 batches (`--objective=span_corruption`), with the pair pipeline's
guarantees: bounded memory, exact resume from one number, rank-independent optimizer steps.

The epoch's documents come in `WindowedStream`'s order (row groups permuted per epoch, windows of `buffer_size`
rows); inside a window they are shuffled. Their tokens, each document ending in [EOS], form one stream per epoch,
cut into chunks of `chunk_length` tokens, the length whose corrupted input is `max_seq_len` tokens: no token is
padding, and only the epoch's last chunk may be short. A sample is a chunk; the epoch visits the chunks that start
in window w (its block) in a shuffled order before those of window w + 1 (`chunk_order`), so that a step holds
chunks of many documents, not a few consecutive pieces of one long book, and still needs at most the windows of
two neighbouring blocks. Chunk c of epoch e is masked by its own random stream, so any process masks it the same,
at any time.

Where window w starts in the token stream follows from the per-document token counts (`data_pipeline.token_counts`),
so a resumed run finds its chunks without tokenizing what comes before them.
"""
import math
import os
from dataclasses import dataclass

import numpy as np

from data_pipeline.batch import MicroBatch, Ragged
from data_pipeline.parquet import open_parquet, read_batches, read_footer
from data_pipeline.span_corruption import SpanCorruption, sentinel_ids
from data_pipeline.token_counts import RunningTotals, counts_paths, documents, ensure_counts
from data_pipeline.tokenize import shared_encoder, tokenize
from data_pipeline.windows import (CHUNK_MASKS, CHUNK_SHUFFLE, WINDOW_SHUFFLE, StreamSpec, WindowedStream,
                                   epoch_stream)
from utils.errors import UnreadableData, UserError

# Where a dataset built outside the trainer keeps its counts (the trainer keeps them in its output_dir).
DEFAULT_COUNTS_DIR = os.path.join(os.path.expanduser("~"), ".cache", "t5-lowmem", "token_counts")
# Masks of evaluation chunks come from their own stream of seeds, never one a training epoch uses.
EVAL_STREAM = 2**31


@dataclass(frozen=True)
class TextSpec:
    """What packed text adds to a stream: the documents' column, the corruption, and where the token counts are."""

    text_column: str = "text"
    corruption: SpanCorruption = SpanCorruption()
    counts_dir: str = DEFAULT_COUNTS_DIR
    """Where the token counts are kept (counted on first use)."""
    count_missing: bool = True
    """Count missing counts here; False: wait for the process that counts them."""
    counts_files: tuple = ()
    """The counts' files, one per training file, as the main process names them (instead of `counts_dir`)."""


class PackedTextDataset(WindowedStream):
    """Yields one `StepBatch` of this rank's span-corrupted micro-batches of packed documents per optimizer step."""

    sample_name = "chunks"

    def __init__(self, spec: StreamSpec, tokenizer, text: TextSpec = TextSpec()):
        super().__init__(spec, (text.text_column,))
        self.corruption = text.corruption
        self.chunk_length = self.corruption.chunk_length(spec.max_seq_len)
        self._sentinels = sentinel_ids(tokenizer, self.corruption.spans(self.chunk_length), spec.max_seq_len)
        self._encoder = shared_encoder(tokenizer, None)
        self._pad_id, self._eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        counts_files = list(text.counts_files) or counts_paths(text.counts_dir, self._paths, text.text_column,
                                                               self._encoder)
        self._totals = [RunningTotals(path) for path in ensure_counts(self._paths, text.text_column, self._encoder,
                                                                       counts_files, text.count_missing)]
        for totals, rows in zip(self._totals, self._file_rows):
            if len(totals) != rows + 1:
                raise UserError(f"{totals.file}: token counts of another file; delete it to count again")
        # Tokens of its file before each row group, and in it: the only counts a window's start needs besides its own.
        self._rg_before = self._tokens_before(np.arange(len(self._rg_rows)), self._rg_first_row)
        self._rg_tokens = self._tokens_before(np.arange(len(self._rg_rows)), self._rg_first_row + self._rg_rows) \
            - self._rg_before
        self.num_tokens = int(self._rg_tokens.sum())
        if self.num_tokens == 0:
            raise UserError(f"{', '.join(self._paths)}: no text in column '{text.text_column}' (every value null or empty)")
        self.num_samples = math.ceil(self.num_tokens / self.chunk_length)
        self._starts_cache = None

    def _tokens_before(self, row_groups: np.ndarray, file_rows: np.ndarray) -> np.ndarray:
        """Tokens of each row group's file before row `file_rows` of that file: one read of each file's counts."""
        files = self._rg_file[row_groups]
        tokens = np.empty(len(row_groups), dtype=np.int64)
        for f in np.unique(files):
            tokens[files == f] = self._totals[f].before(file_rows[files == f])
        return tokens

    def describe(self) -> str:
        length, corruption = self.chunk_length, self.corruption
        return (f"{self.num_rows} documents, {self.num_tokens} tokens packed into {self.num_samples} chunks of "
                f"{length} (inputs of {corruption.input_length(length)} tokens, targets of "
                f"{corruption.target_length(length)})")

    def window_starts(self, epoch: int) -> np.ndarray:
        """Where each window of the epoch starts in its token stream (and, last, the stream's length)."""
        if self._starts_cache is None or self._starts_cache[0] != epoch:
            order, ends = self._epoch_order(epoch)
            before_rg = np.r_[0, np.cumsum(self._rg_tokens[order])]  # tokens of the epoch before its k-th row group
            rows = np.minimum(np.arange(self.num_windows + 1) * self.buffer_size, self.num_rows)
            k = np.searchsorted(ends, rows, side="right")  # the row group of the epoch each window starts in
            starts = np.full(len(rows), before_rg[-1], dtype=np.int64)  # (the last entry: the stream's end)
            inside = k < len(order)
            groups = order[k[inside]]
            offsets = rows[inside] - (ends[k[inside]] - self._rg_rows[groups])  # rows of the group before the window
            starts[inside] = before_rg[k[inside]] + self._tokens_before(
                groups, self._rg_first_row[groups] + offsets) - self._rg_before[groups]
            self._starts_cache = (epoch, starts)
        return self._starts_cache[1]

    def _window(self, epoch: int, window: int, layout_size: int) -> np.ndarray:
        """The window's documents, shuffled, as one token stream (each document ends in [EOS])."""
        texts = documents(self._read_window_rows(epoch, window)[self.columns[0]])
        order = epoch_stream(self.spec.seed, epoch, WINDOW_SHUFFLE, window).permutation(len(texts))
        tokens = tokenize(self._encoder, texts.take(order)).flat
        starts = self.window_starts(epoch)
        if len(tokens) != starts[window + 1] - starts[window]:
            raise UnreadableData(f"{', '.join(self._paths)}: window {window} of epoch {epoch} holds {len(tokens)} "
                                 f"tokens, its counts say {starts[window + 1] - starts[window]} (a file changed "
                                 "since its tokens were counted?)")
        return tokens

    def chunk_blocks(self, epoch: int) -> np.ndarray:
        """Block b of the epoch: the chunks [bounds[b], bounds[b + 1]) that start in window b's tokens."""
        return -(-self.window_starts(epoch) // self.chunk_length)

    def chunk_order(self, epoch: int, lo: int, hi: int) -> np.ndarray:
        """The chunks that samples [lo, hi) of the epoch are: each block's chunks in a permutation of their own."""
        bounds = self.chunk_blocks(epoch)
        chunks = []
        for block in range(int(np.searchsorted(bounds, lo, side="right")) - 1,
                           int(np.searchsorted(bounds, hi - 1, side="right"))):
            first, end = int(bounds[block]), int(bounds[block + 1])
            order = first + epoch_stream(self.spec.seed, epoch, CHUNK_SHUFFLE, block).permutation(end - first)
            chunks.append(order[max(lo, first) - first: min(hi, end) - first])
        return np.concatenate(chunks)

    def _step_samples(self, epoch: int, lo: int, hi: int, layout_size: int, windows: dict, reader) -> list:
        """(index, tokens) of the chunks that samples [lo, hi) of the epoch are, from the windows they lie in."""
        starts, length = self.window_starts(epoch), self.chunk_length
        chunks = self.chunk_order(epoch, lo, hi)
        first_tokens = chunks * length
        end_tokens = np.minimum(first_tokens + length, self.num_tokens)
        first = int(np.searchsorted(starts, first_tokens.min(), side="right")) - 1
        last = int(np.searchsorted(starts, end_tokens.max() - 1, side="right")) - 1
        needed = range(first, last + 1)
        stream = np.concatenate(self._windows(epoch, needed, layout_size, windows, reader))  # from starts[first]
        offset = starts[first]
        return [(int(c), stream[a - offset:b - offset]) for c, a, b in zip(chunks, first_tokens, end_tokens)]

    def _build_step(self, chunks: list, epoch: int, lo: int):
        batches = [self._micro_batch([chunks[i] for i in part], epoch) for part in self._slices(len(chunks))]
        step_tokens = sum(self.corruption.target_length(len(tokens)) for _, tokens in chunks)
        return batches, step_tokens, 0

    def _micro_batch(self, chunks: list, epoch: int) -> MicroBatch:
        if not chunks:
            return MicroBatch.placeholder(self._eos_id)
        pairs = [self.corrupt(tokens, epoch, index) for index, tokens in chunks]
        return MicroBatch.padded(Ragged.from_lists([inputs for inputs, _ in pairs]),
                                 Ragged.from_lists([targets for _, targets in pairs]), self._pad_id,
                                 self.spec.pad_to_multiple_of)

    def corrupt(self, chunk: np.ndarray, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Input and target of chunk `index` of `epoch`: the same spans whenever and wherever it is built."""
        return self.corruption.corrupt(chunk, mask_generator(self.spec.seed, epoch, index), self._sentinels, self._eos_id)


def mask_generator(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream that masks chunk `index` of `epoch` (EVAL_STREAM: of the evaluation's chunks)."""
    return epoch_stream(seed, epoch, CHUNK_MASKS, index)


def leading_chunks(path: str, column: str, tokenizer, chunk_length: int, max_chunks: int) -> list[np.ndarray]:
    """The first `max_chunks` chunks of a file's documents packed in file order (evaluation's fixed sample)."""
    read_footer(path, (column,))
    encoder = shared_encoder(tokenizer, None)
    pieces, held = [], 0
    for batch in read_batches(open_parquet(path), path, [column]):
        pieces.append(tokenize(encoder, documents(batch.column(0))).flat)
        held += len(pieces[-1])
        if held >= max_chunks * chunk_length:
            break
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    return [tokens[start:start + chunk_length] for start in range(0, len(tokens), chunk_length)][:max_chunks]


def counts_dir_of(output_dir: str) -> str:
    return os.path.join(output_dir, "token_counts")
