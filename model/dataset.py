"""Parquet rows → padded T5 batches, with bounded memory, exact resume and rank-independent optimizer steps.

Everything below derives from `seed`, the epoch and the parquet footers, so any process computes any part of
the stream without reading what comes before it:
* The row groups of all files form one global list, visited each epoch in a permutation seeded by
  (seed, epoch); their rows, concatenated, are the epoch's N rows, cut into windows of `buffer_size` rows.
* Each window is tokenized once (truncated to max_seq_len tokens, [EOS] kept last) and reordered by a
  permutation seeded by (seed, epoch, window) that puts rows of similar token length into blocks of one
  global batch, so batches need little padding.
* Optimizer step k covers stream positions [start + k·G, start + (k+1)·G), G = batch_size × world_size ×
  gradient_accumulation_steps. Every rank builds the same global batch, sorts it by length and takes its own
  slices, so how a step is split over ranks and micro-steps never changes which rows it trains on.
A position is therefore one number (the stream position of the next step), and resuming reads one window.
"""

import hashlib
import itertools
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from tokenizers import Tokenizer
from torch.utils.data import IterableDataset, get_worker_info

from model.parquet import TEXT_COLUMNS as COLUMNS
from model.parquet import expand_paths, open_parquet, read_batches, read_footer
from utils.errors import UnreadableData, UserError

LABEL_PAD = -100
# Chunks of the prompt-length order, in global batches, re-sorted by response length (best of 2-32 tried).
_RESPONSE_SORT_CHUNK_BATCHES = 8
_TOKENIZE_SLICE = 512  # texts per tokenizer call
# One fixed schema for windows, so files that store `large_string` concatenate with files storing `string`.
_WINDOW_SCHEMA = pa.schema([(name, pa.string()) for name in COLUMNS])
# The truncating encoders of this process, by (tokenizer definition, max_seq_len): see `_truncating_encoder`.
_ENCODERS: dict[tuple[str, int], Tokenizer] = {}


def global_batch_size(batch_size: int, world_size: int, gradient_accumulation_steps: int) -> int:
    """Rows of one optimizer step over all ranks: the unit the data order and the schedule are made of."""
    return batch_size * world_size * gradient_accumulation_steps


def steps_per_epoch(num_rows: int, global_batch: int) -> int:
    return math.ceil(num_rows / global_batch)


@dataclass
class MicroBatch:
    """One rank's rows of one micro-step, padded: pad in `input_ids`, -100 in `labels`."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def to(self, device, non_blocking: bool = False) -> "MicroBatch":
        return MicroBatch(*(getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)))

    def pin_memory(self) -> "MicroBatch":  # DataLoader(pin_memory=True) calls this
        return MicroBatch(*(getattr(self, f.name).pin_memory() for f in fields(self)))

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def real_tokens(self) -> int:
        """Prompt and response tokens, padding not counted."""
        return int(self.attention_mask.sum()) + int((self.labels != LABEL_PAD).sum())


@dataclass
class StepBatch:
    """This rank's micro-batches of one optimizer step, and what the step means for the whole run."""

    micro_batches: list
    epoch: int
    end_sample: int
    """Global samples of the epoch consumed once this step is done: the position to resume from."""
    step_tokens: int
    """Response tokens of the whole global batch (all ranks): the loss's denominator."""
    skipped: int
    """Rows of the global batch dropped for an empty prompt or response."""

    def pin_memory(self) -> "StepBatch":
        return StepBatch([batch.pin_memory() for batch in self.micro_batches], self.epoch, self.end_sample,
                         self.step_tokens, self.skipped)


def _length_grouping_order(prompt_len, response_len, rng, group_size: int, head: int) -> np.ndarray:
    """Order a window so that each block of `group_size` rows holds rows of similar length.

    Blocks start `head` rows into the window, where the first step boundary of the window falls; only whole
    blocks are shuffled, so every step that lies inside the window is exactly one block.
    """
    n = len(prompt_len)
    order = rng.permutation(n)
    order = order[np.argsort(prompt_len[order], kind="stable")]
    head = min(head, n)
    chunk = _RESPONSE_SORT_CHUNK_BATCHES * group_size
    bounds = np.unique(np.r_[0, np.arange(head, n, chunk), n])
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        part = order[lo:hi]
        order[lo:hi] = part[np.argsort(response_len[part], kind="stable")]
    body_end = head + (n - head) // group_size * group_size
    blocks = order[head:body_end].reshape(-1, group_size)
    return np.concatenate([order[:head], blocks[rng.permutation(len(blocks))].ravel(), order[body_end:]])


class _RowGroupStream:
    """Reads one row group front to back in small batches, so consecutive windows that share a row group
    decode it once, and one far larger than a window never sits in memory whole."""

    def __init__(self, parquet: pq.ParquetFile, path: str, index: int, global_rg: int):
        self.global_rg, self.position, self._pending = global_rg, 0, None  # position: row of _pending's start
        # One thread: batches decode in milliseconds, and each Arrow thread keeps its own allocator cache.
        self._batches = read_batches(parquet, path, COLUMNS, row_group=index, use_threads=False)

    def read(self, lo: int, hi: int) -> pa.Table:
        pieces = []
        while self.position < hi:
            batch = self._pending if self._pending is not None else next(self._batches, None)
            if batch is None:  # the file changed under us: its footer promised more rows
                raise OSError(f"row group ended at row {self.position}, before row {hi}")
            start, end, self._pending = self.position, self.position + batch.num_rows, None
            if end > lo:
                pieces.append(batch.slice(max(lo - start, 0), min(hi, end) - max(lo, start)))
            if end > hi:
                self._pending = batch.slice(hi - start)
            self.position = min(end, hi)
        return pa.Table.from_batches(pieces).cast(_WINDOW_SCHEMA)


class _Ragged:
    """Token id sequences of different lengths in one flat array: sequence i is flat[offsets[i]:offsets[i + 1]].

    Keeps a window's tokens as two numpy arrays instead of thousands of Python lists.
    """

    def __init__(self, flat: np.ndarray, offsets: np.ndarray):
        self.flat, self.offsets, self.lengths = flat, offsets, np.diff(offsets)

    @classmethod
    def from_encodings(cls, encodings) -> "_Ragged":
        id_lists = [encoding.ids for encoding in encodings]
        lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
        flat = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=np.int32, count=int(lengths.sum()))
        return cls(flat, np.r_[0, np.cumsum(lengths)])

    def slice(self, lo: int, hi: int) -> "_Ragged":
        return _Ragged(self.flat[self.offsets[lo]:self.offsets[hi]], self.offsets[lo:hi + 1] - self.offsets[lo])

    def take(self, rows: np.ndarray) -> "_Ragged":
        lengths = self.lengths[rows]
        offsets = np.r_[0, np.cumsum(lengths)]
        # Element j of the result, in row k, comes from old offset of row k + (j - new offset of row k).
        source = np.repeat(self.offsets[rows] - offsets[:-1], lengths) + np.arange(offsets[-1])
        return _Ragged(self.flat[source], offsets)

    @staticmethod
    def concat(parts) -> "_Ragged":
        starts = np.cumsum([0] + [part.offsets[-1] for part in parts[:-1]])
        offsets = np.concatenate([[0]] + [part.offsets[1:] + start for part, start in zip(parts, starts)])
        return _Ragged(np.concatenate([part.flat for part in parts]), offsets)

    def padded(self, fill: int, multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """An int64 matrix right-padded with `fill` to a width that is a multiple of `multiple`, and the mask of its
        real tokens."""
        width = -(-int(self.lengths.max()) // multiple) * multiple
        real = np.arange(width) < self.lengths[:, None]
        matrix = np.full(real.shape, fill, dtype=np.int64)
        matrix[real] = self.flat
        return matrix, real


class _Window:
    """Tokenized rows of one window (or of a step cut from windows), in stream order."""

    def __init__(self, prompts: _Ragged, responses: _Ragged, usable: np.ndarray):
        self.prompts, self.responses, self.usable = prompts, responses, usable

    def slice(self, lo: int, hi: int) -> "_Window":
        return _Window(self.prompts.slice(lo, hi), self.responses.slice(lo, hi), self.usable[lo:hi])

    def take(self, rows: np.ndarray) -> "_Window":
        return _Window(self.prompts.take(rows), self.responses.take(rows), self.usable[rows])

    @staticmethod
    def concat(parts) -> "_Window":
        return _Window(_Ragged.concat([p.prompts for p in parts]), _Ragged.concat([p.responses for p in parts]),
                       np.concatenate([p.usable for p in parts]))


class LowMemParquetDataset(IterableDataset):
    """Yields this rank's micro-batches as dicts (or, with `yield_steps=True`, one `StepBatch` per optimizer step).

    `set_epoch(e)` moves to the start of epoch e, unless the dataset already stands in epoch e (after
    `load_state_dict` or a finished epoch e-1): then it keeps that position, so a resumed run may call it
    unconditionally. Iterating runs to the end of the current epoch and leaves the position at the next one.
    With DataLoader workers the position advances inside the workers: take it from the step items
    (`seek(step.epoch, step.end_sample, layout_size)`).
    """

    def __init__(self, files, tokenizer, max_seq_len=192, batch_size=32, buffer_size=5000, seed=0, rank=0,
                 world_size=1, ultra_low_mem=True, gradient_accumulation_steps=1, yield_steps=False,
                 pad_to_multiple_of=1):
        for name, value in (("max_seq_len", max_seq_len), ("batch_size", batch_size), ("buffer_size", buffer_size),
                            ("pad_to_multiple_of", pad_to_multiple_of),
                            ("world_size", world_size), ("gradient_accumulation_steps", gradient_accumulation_steps)):
            if int(value) < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.max_seq_len, self.batch_size, self.buffer_size = int(max_seq_len), int(batch_size), int(buffer_size)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.gradient_accumulation_steps = int(gradient_accumulation_steps)
        self.ultra_low_mem, self.yield_steps = bool(ultra_low_mem), bool(yield_steps)
        self.pad_to_multiple_of = int(pad_to_multiple_of)  # a compiled model sees few distinct shapes

        self._paths = expand_paths(files)
        rows_per_file = [read_footer(path).row_group_rows for path in self._paths]
        file_of = np.concatenate([np.full(len(rows), i, dtype=np.int32) for i, rows in enumerate(rows_per_file)])
        index_in_file = np.concatenate([np.arange(len(rows), dtype=np.int32) for rows in rows_per_file])
        rows = np.concatenate(rows_per_file)  # empty row groups are left out: they hold nothing to read
        self._rg_file, self._rg_index, self._rg_rows = file_of[rows > 0], index_in_file[rows > 0], rows[rows > 0]
        if len(self._rg_rows) == 0:
            raise UserError(f"no usable rows: {', '.join(self._paths)} hold 0 rows")
        self.num_rows = int(self._rg_rows.sum())

        self._encoder = self._truncating_encoder(tokenizer)
        self._pad_id, self._eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        self.skipped_rows = 0
        self._epoch, self._sample, self._micro, self._layout_size = 0, 0, 0, self.global_batch_size
        self._epoch_order_cache = None
        self._open_files = {}  # used only when ultra_low_mem is False
        self._stream = None  # the row group being read, positioned where the last read stopped

    def _truncating_encoder(self, tokenizer) -> Tokenizer:
        """A private copy of the fast backend that truncates to max_seq_len tokens with [EOS] kept last.

        One per process for each tokenizer and length (`_ENCODERS`): the trainer builds a dataset every epoch, and
        a tokenizers `Tokenizer` that has encoded an epoch keeps its word cache's memory after it is gone (about
        16 MB per epoch of distinct rows), while one reused instance levels off.
        """
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        if getattr(tokenizer, "backend_tokenizer", None) is None or tokenizer.pad_token_id is None:
            raise UserError(f"tokenizer {name}: needs a fast tokenizer with a pad token")
        definition = tokenizer.backend_tokenizer.to_str()
        key = (hashlib.sha256(definition.encode()).hexdigest(), self.max_seq_len)
        if key not in _ENCODERS:
            encoder = Tokenizer.from_str(definition)
            encoder.no_padding()
            encoder.enable_truncation(max_length=self.max_seq_len)
            _ENCODERS[key] = encoder
        encoder = _ENCODERS[key]
        if encoder.encode("a").ids[-1:] != [tokenizer.eos_token_id]:
            raise UserError(f"tokenizer {name}: its post-processor must append the EOS token to every text")
        return encoder

    @property
    def global_batch_size(self) -> int:
        return global_batch_size(self.batch_size, self.world_size, self.gradient_accumulation_steps)

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.num_rows, self.global_batch_size)

    def __len__(self) -> int:
        return self.steps_per_epoch * (1 if self.yield_steps else self.gradient_accumulation_steps)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            self._epoch, self._sample, self._micro, self._layout_size = int(epoch), 0, 0, self.global_batch_size

    def state_at(self, epoch: int, sample: int, micro: int = 0) -> dict:
        """The state whose next item is micro-batch `micro` of the step starting at `sample` of `epoch`."""
        if sample >= self.num_rows:
            epoch, sample, micro = epoch + 1, 0, 0
        fresh_epoch = sample == 0 and micro == 0
        return {"epoch": int(epoch), "sample": int(sample), "micro": int(micro),
                "layout_size": self.global_batch_size if fresh_epoch or epoch != self._epoch else self._layout_size,
                "num_rows": self.num_rows, "seed": self.seed,
                "world_size": self.world_size, "gradient_accumulation_steps": self.gradient_accumulation_steps}

    def state_dict(self) -> dict:
        return self.state_at(self._epoch, self._sample, self._micro)

    def seek(self, epoch: int, sample: int, layout_size: int) -> None:
        """Stand before the step that starts at global sample `sample` of `epoch`, whose rows were laid out for
        global batches of `layout_size` when the epoch began (see `_window`)."""
        self.load_state_dict({**self.state_at(epoch, sample), "layout_size": layout_size})

    def load_state_dict(self, state: dict) -> None:
        if state["num_rows"] != self.num_rows:
            raise UserError(f"{', '.join(self._paths)}: the checkpoint's data had {state['num_rows']} rows, "
                            f"these files have {self.num_rows}; resume needs the same training files")
        if state["seed"] != self.seed:
            raise UserError(f"seed: the checkpoint was trained with seed {state['seed']}, not {self.seed}")
        micro = int(state.get("micro", 0))
        if micro and (state.get("world_size"), state.get("gradient_accumulation_steps")) != (
                self.world_size, self.gradient_accumulation_steps):
            raise ValueError("cannot resume in the middle of a step with another world size or accumulation")
        self._epoch, self._sample, self._micro = int(state["epoch"]), int(state["sample"]), micro
        # An epoch not yet begun takes the current batch size as its layout; a begun one keeps its own.
        self._layout_size = self.global_batch_size if self._sample == 0 and micro == 0 else int(state["layout_size"])

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Row groups in this epoch's order, and the stream position where each of them ends."""
        if self._epoch_order_cache is None or self._epoch_order_cache[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self._rg_rows))
            self._epoch_order_cache = (epoch, order, np.cumsum(self._rg_rows[order]))
        return self._epoch_order_cache[1:]

    def _read_rows(self, global_rg: int, lo: int, hi: int, handles: dict) -> pa.Table:
        """Rows [lo, hi) of one row group, continuing the previous read when it stopped at or before `lo`."""
        path, index = self._paths[self._rg_file[global_rg]], int(self._rg_index[global_rg])
        try:
            if self._stream is None or self._stream.global_rg != global_rg or self._stream.position > lo:
                if path not in handles:
                    handles[path] = open_parquet(path)
                self._stream = _RowGroupStream(handles[path], path, index, global_rg)
            return self._stream.read(lo, hi)
        except (pa.ArrowException, OSError) as error:
            raise UnreadableData(f"{path}: cannot read row group {index} ({error})") from None

    def _window(self, epoch: int, window: int, layout_size: int) -> _Window:
        """The window's rows, tokenized, in their length-grouped order."""
        order, ends = self._epoch_order(epoch)
        lo = window * self.buffer_size
        hi = min(lo + self.buffer_size, self.num_rows)
        # ultra_low_mem opens the files afresh for each window; only a row group still being read stays open.
        handles = {} if self.ultra_low_mem else self._open_files
        pieces = []
        for k in range(np.searchsorted(ends, lo, side="right"), np.searchsorted(ends, hi - 1, side="right") + 1):
            start = ends[k] - self._rg_rows[order[k]]
            pieces.append(self._read_rows(order[k], max(lo - start, 0), min(hi, ends[k]) - start, handles))
        rows = pa.concat_tables(pieces)
        usable = pc.and_(*[pc.greater(pc.utf8_length(rows[name]), 0) for name in COLUMNS])
        # The window is tokenized once; its token lengths group rows far better than character lengths
        # (padding efficiency 0.88 instead of 0.78 on the sample data) and its steps need no more tokenizing.
        prompts, responses = (self._tokenize(pc.fill_null(rows[name], "")) for name in COLUMNS)
        tokenized = _Window(prompts, responses, pc.fill_null(usable, False).to_numpy())
        grouping = _length_grouping_order(tokenized.prompts.lengths, tokenized.responses.lengths,
                                          np.random.default_rng([self.seed, epoch, window]), layout_size,
                                          head=-lo % layout_size)
        return tokenized.take(grouping)

    def _tokenize(self, texts: pa.ChunkedArray) -> _Ragged:
        # In slices: each call still spreads over all cores, but its Encoding objects (tokens, offsets and the
        # truncated overflow of every text) never pile up for a whole window, which keeps peak memory low.
        return _Ragged.concat([
            _Ragged.from_encodings(self._encoder.encode_batch_fast(texts.slice(start, _TOKENIZE_SLICE).to_pylist()))
            for start in range(0, len(texts), _TOKENIZE_SLICE)])

    def _step_rows(self, epoch: int, lo: int, hi: int, layout_size: int, windows: dict, reader) -> _Window:
        """Stream rows [lo, hi) from `windows`, the windows this step needs and the next one, each being read and
        tokenized by `reader` (one background thread) while the steps before it train."""
        first, last = lo // self.buffer_size, (hi - 1) // self.buffer_size
        for stale in [w for w in windows if w < first]:
            del windows[stale]
        for w in range(first, min(last + 2, -(-self.num_rows // self.buffer_size))):
            if w not in windows:
                windows[w] = reader.submit(self._window, epoch, w, layout_size)
        pieces = []
        for w in range(first, last + 1):
            start = w * self.buffer_size
            pieces.append(windows[w].result().slice(max(lo - start, 0), min(hi, start + self.buffer_size) - start))
        return pieces[0] if len(pieces) == 1 else _Window.concat(pieces)

    def _build_step(self, rows: _Window, micro_steps) -> tuple[list[MicroBatch], int, int]:
        """This rank's micro-batches `micro_steps` of one global batch, its label-token total and skipped rows."""
        kept = rows if rows.usable.all() else rows.take(np.flatnonzero(rows.usable))
        by_length = np.argsort(kept.prompts.lengths + kept.responses.lengths, kind="stable")
        slices = np.array_split(by_length, self.world_size * self.gradient_accumulation_steps)
        batches = [self._micro_batch(kept.take(slices[m * self.world_size + self.rank])) for m in micro_steps]
        return batches, int(kept.responses.lengths.sum()), len(rows.usable) - len(kept.usable)

    def _micro_batch(self, rows: _Window) -> MicroBatch:
        if len(rows.usable) == 0:
            # A tail step with fewer rows than micro-batches: a row that trains no token keeps ranks in step.
            return MicroBatch(torch.tensor([[self._eos_id]]), torch.tensor([[1]]), torch.tensor([[LABEL_PAD]]))
        input_ids, attention = rows.prompts.padded(self._pad_id, self.pad_to_multiple_of)
        labels, _ = rows.responses.padded(LABEL_PAD, self.pad_to_multiple_of)
        return MicroBatch(torch.from_numpy(input_ids), torch.from_numpy(attention.astype(np.int64)),
                          torch.from_numpy(labels))

    def __iter__(self):
        if self.yield_steps and self._micro:
            raise ValueError("yield_steps=True resumes only at step boundaries (micro must be 0)")
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        epoch, start, first_micro, layout_size = self._epoch, self._sample, self._micro, self._layout_size
        step_size, accumulation = self.global_batch_size, self.gradient_accumulation_steps
        # One thread reads and tokenizes the windows ahead of the steps (Arrow and the tokenizer release the GIL),
        # so a GPU step waits for no window; only it touches the open files and the row group stream.
        reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="window-reader")
        try:
            yield from self._items(epoch, start, first_micro, layout_size, step_size, accumulation, worker_id,
                                   num_workers, reader)
        finally:
            reader.shutdown(wait=False, cancel_futures=True)

    def _items(self, epoch, start, first_micro, layout_size, step_size, accumulation, worker_id, num_workers,
               reader):
        windows = {}
        item = 0  # index of the next item in this rank's sequence; worker w yields items ≡ w (mod workers)
        for lo in range(start, self.num_rows, step_size):
            hi = min(lo + step_size, self.num_rows)
            micro_steps = range(first_micro if lo == start else 0, accumulation)
            items = range(item, item + (1 if self.yield_steps else len(micro_steps)))
            item += len(items)
            mine = [t for t in items if t % num_workers == worker_id]
            if not mine:
                continue
            wanted = micro_steps if self.yield_steps else [micro_steps[t - items.start] for t in mine]
            rows = self._step_rows(epoch, lo, hi, layout_size, windows, reader)
            batches, step_tokens, skipped = self._build_step(rows, wanted)
            self.skipped_rows += skipped
            if self.yield_steps:
                self._advance(epoch, hi, 0)
                yield StepBatch(batches, epoch, hi, step_tokens, skipped)
                continue
            for micro, batch in zip(wanted, batches):
                last_of_step = micro + 1 == accumulation
                self._advance(epoch, hi if last_of_step else lo, 0 if last_of_step else micro + 1)
                yield batch.as_dict()

    def _advance(self, epoch: int, sample: int, micro: int) -> None:
        """Record the position after the item about to be yielded, so state_dict() resumes right after it."""
        self.load_state_dict(self.state_at(epoch, sample, micro))

    def __getstate__(self):
        # Spawned DataLoader workers get a copy without open files or decoded data.
        return {**self.__dict__, "_open_files": {}, "_stream": None, "_epoch_order_cache": None}
