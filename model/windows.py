"""What both training datasets share: the epoch's row order, windows read ahead, positions, resume and workers.

Every rank derives everything from `seed`, the epoch and the parquet footers (and, for packed text, the cached
token counts), so any process computes any part of the stream without reading what comes before it:
* The row groups of all files form one global list, visited each epoch in a permutation seeded by
  (seed, epoch); their rows, concatenated, are the epoch's rows, cut into windows of `buffer_size` rows. A window
  is read and tokenized once, by one background thread, while the steps before it train.
* The epoch is a sequence of samples (a row of a prompt/response file, a chunk of packed text). Optimizer step k
  covers samples [start + k·G, start + (k+1)·G), G = batch_size × world_size × gradient_accumulation_steps. Every
  rank knows the whole global batch and takes its own slices, so how a step is split over ranks and micro-steps
  never changes which samples it trains on.
A position is therefore one number (the next step's first sample), and resuming reads only the windows of the
step it resumes at.
"""
import itertools
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from model.parquet import expand_paths, open_parquet, read_batches, read_footer
from utils.errors import UnreadableData, UserError

LABEL_PAD = -100


def global_batch_size(batch_size: int, world_size: int, gradient_accumulation_steps: int) -> int:
    """Samples of one optimizer step over all ranks: the unit the data order and the schedule are made of."""
    return batch_size * world_size * gradient_accumulation_steps


def steps_per_epoch(num_samples: int, global_batch: int) -> int:
    return math.ceil(num_samples / global_batch)


@dataclass
class MicroBatch:
    """One rank's samples of one micro-step, padded: pad in `input_ids`, -100 in `labels`."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    real_tokens: int
    """Input and target tokens, padding not counted: known when the batch is built, so that a training step never
    reads it back from the device."""
    input_padding: bool
    """Whether an input row is padded. Without padding the model needs no attention mask (and T5 then adds its
    position bias without expanding it to every row)."""

    TENSORS = ("input_ids", "attention_mask", "labels")

    def to(self, device, non_blocking: bool = False) -> "MicroBatch":
        return replace(self, **{name: getattr(self, name).to(device, non_blocking=non_blocking)
                                for name in self.TENSORS})

    def pin_memory(self) -> "MicroBatch":  # DataLoader(pin_memory=True) calls this
        return replace(self, **{name: getattr(self, name).pin_memory() for name in self.TENSORS})

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.TENSORS}

    @classmethod
    def of(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> "MicroBatch":
        """A batch of tensors made elsewhere (benchmarks, tests); its real tokens counted from them."""
        return cls(input_ids, attention_mask, labels, int(attention_mask.sum()) + int((labels != LABEL_PAD).sum()),
                   not bool(attention_mask.all()))

    @classmethod
    def padded(cls, inputs: "Ragged", targets: "Ragged", pad_id: int, multiple: int = 1) -> "MicroBatch":
        """Rows of input and target ids, right-padded (each to a width that is a multiple of `multiple`)."""
        input_ids, attention = inputs.padded(pad_id, multiple)
        labels, _ = targets.padded(LABEL_PAD, multiple)
        return cls(torch.from_numpy(input_ids), torch.from_numpy(attention.astype(np.int64)), torch.from_numpy(labels),
                   int(inputs.lengths.sum() + targets.lengths.sum()), bool(not attention.all()))

    @classmethod
    def placeholder(cls, eos_id: int) -> "MicroBatch":
        """A row that trains no token: a tail step with fewer samples than micro-batches keeps ranks in step."""
        return cls(torch.tensor([[eos_id]]), torch.tensor([[1]]), torch.tensor([[LABEL_PAD]]), 1, False)


@dataclass
class StepBatch:
    """This rank's micro-batches of one optimizer step, and what the step means for the whole run."""

    micro_batches: list
    epoch: int
    end_sample: int
    """Global samples of the epoch consumed once this step is done: the position to resume from."""
    step_tokens: int
    """Target tokens of the whole global batch (all ranks): the loss's denominator."""
    skipped: int
    """Rows of the global batch dropped for an empty prompt or response."""

    def pin_memory(self) -> "StepBatch":
        return StepBatch([batch.pin_memory() for batch in self.micro_batches], self.epoch, self.end_sample,
                         self.step_tokens, self.skipped)


class RowGroupStream:
    """Reads one row group front to back in small batches, so consecutive windows that share a row group
    decode it once, and one far larger than a window never sits in memory whole."""

    def __init__(self, parquet: pq.ParquetFile, path: str, index: int, global_rg: int, columns, schema: pa.Schema):
        self.global_rg, self.position, self._pending = global_rg, 0, None  # position: row of _pending's start
        self.schema = schema
        # One thread: batches decode in milliseconds, and each Arrow thread keeps its own allocator cache.
        self._batches = read_batches(parquet, path, columns, row_group=index, use_threads=False)

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
        return pa.Table.from_batches(pieces).cast(self.schema)


class Ragged:
    """Token id sequences of different lengths in one flat array: sequence i is flat[offsets[i]:offsets[i + 1]].

    Keeps a window's tokens as two numpy arrays instead of thousands of Python lists.
    """

    def __init__(self, flat: np.ndarray, offsets: np.ndarray):
        self.flat, self.offsets, self.lengths = flat, offsets, np.diff(offsets)

    @classmethod
    def from_encodings(cls, encodings) -> "Ragged":
        return cls.from_lists([encoding.ids for encoding in encodings])

    @classmethod
    def from_lists(cls, id_lists) -> "Ragged":
        lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
        flat = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=np.int32, count=int(lengths.sum()))
        return cls(flat, np.r_[0, np.cumsum(lengths)])

    def slice(self, lo: int, hi: int) -> "Ragged":
        return Ragged(self.flat[self.offsets[lo]:self.offsets[hi]], self.offsets[lo:hi + 1] - self.offsets[lo])

    def take(self, rows: np.ndarray) -> "Ragged":
        lengths = self.lengths[rows]
        offsets = np.r_[0, np.cumsum(lengths)]
        # Element j of the result, in row k, comes from old offset of row k + (j - new offset of row k).
        source = np.repeat(self.offsets[rows] - offsets[:-1], lengths) + np.arange(offsets[-1])
        return Ragged(self.flat[source], offsets)

    @staticmethod
    def concat(parts) -> "Ragged":
        starts = np.cumsum([0] + [part.offsets[-1] for part in parts[:-1]])
        offsets = np.concatenate([[0]] + [part.offsets[1:] + start for part, start in zip(parts, starts)])
        return Ragged(np.concatenate([part.flat for part in parts]), offsets)

    def padded(self, fill: int, multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """An int64 matrix right-padded with `fill` to a width that is a multiple of `multiple`, and the mask of its
        real tokens."""
        width = -(-int(self.lengths.max()) // multiple) * multiple
        real = np.arange(width) < self.lengths[:, None]
        matrix = np.full(real.shape, fill, dtype=np.int64)
        matrix[real] = self.flat
        return matrix, real


class WindowedStream(IterableDataset):
    """The machinery of both datasets. A subclass sets `num_samples` (samples per epoch) and provides `_window`
    (read and tokenize one window of rows), `_step_samples` (the samples of one global batch) and `_build_step`
    (this rank's micro-batches of them).

    `set_epoch(e)` moves to the start of epoch e, unless the dataset already stands in epoch e (after
    `load_state_dict` or a finished epoch e-1): then it keeps that position, so a resumed run may call it
    unconditionally. Iterating runs to the end of the current epoch and leaves the position at the next one.
    With DataLoader workers the position advances inside the workers: take it from the step items
    (`seek(step.epoch, step.end_sample, layout_size)`).
    """

    num_samples: int
    sample_name = "rows"  # what a sample is, in messages

    def __init__(self, files, columns, batch_size, buffer_size, seed, rank, world_size, ultra_low_mem,
                 gradient_accumulation_steps, yield_steps, pad_to_multiple_of):
        for name, value in (("batch_size", batch_size), ("buffer_size", buffer_size),
                            ("pad_to_multiple_of", pad_to_multiple_of),
                            ("world_size", world_size), ("gradient_accumulation_steps", gradient_accumulation_steps)):
            if int(value) < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.batch_size, self.buffer_size = int(batch_size), int(buffer_size)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.gradient_accumulation_steps = int(gradient_accumulation_steps)
        self.ultra_low_mem, self.yield_steps = bool(ultra_low_mem), bool(yield_steps)
        self.pad_to_multiple_of = int(pad_to_multiple_of)  # a compiled model sees few distinct shapes
        # One fixed schema for windows, so files that store `large_string` concatenate with files storing `string`.
        self.columns, self._schema = tuple(columns), pa.schema([(name, pa.string()) for name in columns])

        self._paths = expand_paths(files)
        rows_per_file = [read_footer(path, self.columns).row_group_rows for path in self._paths]
        file_of = np.concatenate([np.full(len(rows), i, dtype=np.int32) for i, rows in enumerate(rows_per_file)])
        index_in_file = np.concatenate([np.arange(len(rows), dtype=np.int32) for rows in rows_per_file])
        first_row = np.concatenate([np.cumsum(rows) - rows for rows in rows_per_file])  # in its file
        rows = np.concatenate(rows_per_file)  # empty row groups are left out: they hold nothing to read
        self._rg_file, self._rg_index, self._rg_rows = file_of[rows > 0], index_in_file[rows > 0], rows[rows > 0]
        self._rg_first_row = first_row[rows > 0]
        self._file_rows = [int(rows.sum()) for rows in rows_per_file]
        if len(self._rg_rows) == 0:
            raise UserError(f"no usable rows: {', '.join(self._paths)} hold 0 rows")
        self.num_rows = int(self._rg_rows.sum())
        self.num_windows = -(-self.num_rows // self.buffer_size)

        self.skipped_rows = 0
        self._epoch, self._sample, self._micro, self._layout_size = 0, 0, 0, self.global_batch_size
        self._epoch_order_cache = None
        self._open_files = {}  # used only when ultra_low_mem is False
        self._stream = None  # the row group being read, positioned where the last read stopped

    @property
    def global_batch_size(self) -> int:
        return global_batch_size(self.batch_size, self.world_size, self.gradient_accumulation_steps)

    def describe(self) -> str:
        """The data in a few words, for the run's log."""
        return f"{self.num_rows} rows"

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.num_samples, self.global_batch_size)

    def __len__(self) -> int:
        return self.steps_per_epoch * (1 if self.yield_steps else self.gradient_accumulation_steps)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            self._epoch, self._sample, self._micro, self._layout_size = int(epoch), 0, 0, self.global_batch_size

    def state_at(self, epoch: int, sample: int, micro: int = 0) -> dict:
        """The state whose next item is micro-batch `micro` of the step starting at `sample` of `epoch`."""
        if sample >= self.num_samples:
            epoch, sample, micro = epoch + 1, 0, 0
        fresh_epoch = sample == 0 and micro == 0
        return {"epoch": int(epoch), "sample": int(sample), "micro": int(micro),
                "layout_size": self.global_batch_size if fresh_epoch or epoch != self._epoch else self._layout_size,
                "num_samples": self.num_samples, "seed": self.seed,
                "world_size": self.world_size, "gradient_accumulation_steps": self.gradient_accumulation_steps}

    def state_dict(self) -> dict:
        return self.state_at(self._epoch, self._sample, self._micro)

    def seek(self, epoch: int, sample: int, layout_size: int) -> None:
        """Stand before the step that starts at global sample `sample` of `epoch`, whose samples were laid out for
        global batches of `layout_size` when the epoch began."""
        self.load_state_dict({**self.state_at(epoch, sample), "layout_size": layout_size})

    def load_state_dict(self, state: dict) -> None:
        saved_samples = state.get("num_samples", state.get("num_rows"))  # (the key before packed text existed)
        if saved_samples != self.num_samples:
            raise UserError(f"{', '.join(self._paths)}: the checkpoint's data had {saved_samples} "
                            f"{self.sample_name}, these files have {self.num_samples}; resume needs the same "
                            "training files")
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
        """Row groups in this epoch's order, and the row of the epoch where each of them ends."""
        if self._epoch_order_cache is None or self._epoch_order_cache[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self._rg_rows))
            self._epoch_order_cache = (epoch, order, np.cumsum(self._rg_rows[order]))
        return self._epoch_order_cache[1:]

    def _pieces(self, epoch: int, lo: int, hi: int):
        """Rows [lo, hi) of the epoch as (global row group, first row, end row) pieces of row groups."""
        order, ends = self._epoch_order(epoch)
        for k in range(np.searchsorted(ends, lo, side="right"), np.searchsorted(ends, hi - 1, side="right") + 1):
            start = ends[k] - self._rg_rows[order[k]]
            yield int(order[k]), int(max(lo - start, 0)), int(min(hi, ends[k]) - start)

    def _read_window_rows(self, epoch: int, window: int) -> pa.Table:
        """The text columns of window `window`'s rows, in the epoch's order."""
        lo = window * self.buffer_size
        hi = min(lo + self.buffer_size, self.num_rows)
        # ultra_low_mem opens the files afresh for each window; only a row group still being read stays open.
        handles = {} if self.ultra_low_mem else self._open_files
        return pa.concat_tables([self._read_rows(rg, first, end, handles) for rg, first, end in
                                 self._pieces(epoch, lo, hi)])

    def _read_rows(self, global_rg: int, lo: int, hi: int, handles: dict) -> pa.Table:
        """Rows [lo, hi) of one row group, continuing the previous read when it stopped at or before `lo`."""
        path, index = self._paths[self._rg_file[global_rg]], int(self._rg_index[global_rg])
        try:
            if self._stream is None or self._stream.global_rg != global_rg or self._stream.position > lo:
                if path not in handles:
                    handles[path] = open_parquet(path)
                self._stream = RowGroupStream(handles[path], path, index, global_rg, self.columns, self._schema)
            return self._stream.read(lo, hi)
        except (pa.ArrowException, OSError) as error:
            raise UnreadableData(f"{path}: cannot read row group {index} ({error})") from None

    def _windows(self, epoch: int, needed: range, layout_size: int, windows: dict, reader) -> list:
        """The windows `needed` by a step, from `windows`, which holds them and the next one, each being read and
        tokenized by `reader` (one background thread) while the steps before it train."""
        for stale in [w for w in windows if w < needed.start]:
            del windows[stale]
        for w in range(needed.start, min(needed.stop + 1, self.num_windows)):
            if w not in windows:
                windows[w] = reader.submit(self._window, epoch, w, layout_size)
        return [windows[w].result() for w in needed]

    def _window(self, epoch: int, window: int, layout_size: int):
        raise NotImplementedError

    def _step_samples(self, epoch: int, lo: int, hi: int, layout_size: int, windows: dict, reader):
        raise NotImplementedError

    def _build_step(self, samples, epoch: int, lo: int, micro_steps) -> tuple[list[MicroBatch], int, int]:
        """This rank's micro-batches `micro_steps` of the global batch `samples` (samples lo.. of the epoch), its
        target-token total and skipped rows."""
        raise NotImplementedError

    def __iter__(self):
        if self.yield_steps and self._micro:
            raise ValueError("yield_steps=True resumes only at step boundaries (micro must be 0)")
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        # One thread reads and tokenizes the windows ahead of the steps (Arrow and the tokenizer release the GIL),
        # so a GPU step waits for no window; only it touches the open files and the row group stream.
        reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="window-reader")
        try:
            yield from self._items(self._epoch, self._sample, self._micro, self._layout_size, worker_id,
                                   num_workers, reader)
        finally:
            reader.shutdown(wait=False, cancel_futures=True)

    def _items(self, epoch, start, first_micro, layout_size, worker_id, num_workers, reader):
        step_size, accumulation = self.global_batch_size, self.gradient_accumulation_steps
        windows = {}
        item = 0  # index of the next item in this rank's sequence; worker w yields items ≡ w (mod workers)
        for lo in range(start, self.num_samples, step_size):
            hi = min(lo + step_size, self.num_samples)
            micro_steps = range(first_micro if lo == start else 0, accumulation)
            items = range(item, item + (1 if self.yield_steps else len(micro_steps)))
            item += len(items)
            mine = [t for t in items if t % num_workers == worker_id]
            if not mine:
                continue
            wanted = micro_steps if self.yield_steps else [micro_steps[t - items.start] for t in mine]
            samples = self._step_samples(epoch, lo, hi, layout_size, windows, reader)
            batches, step_tokens, skipped = self._build_step(samples, epoch, lo, wanted)
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

    def _slot_of(self, micro: int) -> int:
        """Which of the world_size × accumulation slices of a global batch this rank's micro-step `micro` takes."""
        return micro * self.world_size + self.rank

    def __getstate__(self):
        # Spawned DataLoader workers get a copy without open files or decoded data.
        return {**self.__dict__, "_open_files": {}, "_stream": None, "_epoch_order_cache": None}
