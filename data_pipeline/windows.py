"""The streaming engine both training datasets share: the epoch's row order, windows read ahead, positions, resume
and DataLoader workers. It yields one `StepBatch` (this rank's micro-batches of one optimizer step) at a time.

Every rank derives everything from `seed`, the epoch and the parquet footers (and, for packed text, the cached
token counts), so any process computes any part of the stream without reading what comes before it:
* The row groups of all files form one global list, visited each epoch in a permutation seeded by
  (seed, epoch); their rows, concatenated, are the epoch's rows, cut into windows of `buffer_size` rows. A window
  is read and tokenized once, by one background thread, while the steps before it train.
* The epoch is a sequence of samples (a row of a prompt/response file, a chunk of packed text). Optimizer step k
  covers samples [start + k·G, start + (k+1)·G), G the global batch (`data_pipeline.batch`).
A position is therefore one number (the next step's first sample), and resuming reads only the windows of the
step it resumes at.
"""
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from torch.utils.data import IterableDataset, get_worker_info

from data_pipeline.batch import MicroBatch, StepBatch, global_batch_size, steps_per_epoch
from data_pipeline.parquet import expand_paths, open_parquet, read_batches, read_footer
from utils.errors import UnreadableData, UserError

# What each random stream of an epoch is for. numpy pads a seed list with zeros ([seed, epoch] is the stream of
# [seed, epoch, 0]), so every stream is named by (seed, epoch, purpose, index), four numbers, never fewer.
ROW_GROUP_ORDER, WINDOW_SHUFFLE, CHUNK_MASKS, CHUNK_SHUFFLE = 0, 1, 2, 3


def epoch_stream(seed: int, epoch: int, purpose: int, index: int = 0) -> np.random.Generator:
    """The random stream of `purpose` (one of the names above) for item `index` of `epoch`."""
    return np.random.default_rng([seed, epoch, purpose, index])

@dataclass(frozen=True)
class StreamSpec:
    """What both datasets need to know to stream one rank's steps: the files, the batch settings in force, the
    shuffle window and this rank's place among the processes."""

    files: object
    """A path, a glob, or a list of either."""
    max_seq_len: int = 192
    batch_size: int = 32
    buffer_size: int = 5000
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    ultra_low_mem: bool = True
    gradient_accumulation_steps: int = 1
    pad_to_multiple_of: int = 1
    """Widths of padded batches round up to it (a compiled model sees few distinct shapes)."""

    def __post_init__(self):
        for name in ("max_seq_len", "batch_size", "buffer_size", "world_size", "gradient_accumulation_steps",
                     "pad_to_multiple_of"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank}")

    @property
    def global_batch_size(self) -> int:
        return global_batch_size(self.batch_size, self.world_size, self.gradient_accumulation_steps)


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


class WindowedStream(IterableDataset):
    """The machinery of both datasets. A subclass sets `num_samples` (samples per epoch) and provides `_window`
    (read and tokenize one window of rows), `_step_samples` (the samples of one global batch) and `_build_step`
    (this rank's micro-batches of them).

    `set_epoch(e)` moves to the start of epoch e, unless the dataset already stands in epoch e (after
    `load_state_dict` or a finished epoch e-1): then it keeps that position, so a resumed run may call it
    unconditionally. Iterating runs to the end of the current epoch and leaves the position at the next one.
    With DataLoader workers the position advances inside the workers: take it from the steps
    (`seek(step.epoch, step.end_sample, layout_size)`).
    """

    num_samples: int
    sample_name = "rows"  # what a sample is, in messages

    def __init__(self, spec: StreamSpec, columns):
        self.spec = spec
        # One fixed schema for windows, so files that store `large_string` concatenate with files storing `string`.
        self.columns, self._schema = tuple(columns), pa.schema([(name, pa.string()) for name in columns])

        self._paths = expand_paths(spec.files)
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
        self.buffer_size = spec.buffer_size
        self.num_windows = -(-self.num_rows // self.buffer_size)

        self.skipped_rows = 0
        self._epoch, self._sample, self._layout_size = 0, 0, spec.global_batch_size
        self._epoch_order_cache = None
        self._open_files = {}  # used only when ultra_low_mem is False
        self._stream = None  # the row group being read, positioned where the last read stopped

    def describe(self) -> str:
        """The data in a few words, for the run's log."""
        return f"{self.num_rows} rows"

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.num_samples, self.spec.global_batch_size)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            self._epoch, self._sample, self._layout_size = int(epoch), 0, self.spec.global_batch_size

    def state_at(self, epoch: int, sample: int) -> dict:
        """The state whose next step starts at `sample` of `epoch`."""
        if sample >= self.num_samples:
            epoch, sample = epoch + 1, 0
        return {"epoch": int(epoch), "sample": int(sample),
                "layout_size": self.spec.global_batch_size if sample == 0 or epoch != self._epoch
                else self._layout_size, "num_samples": self.num_samples, "seed": self.spec.seed}

    def state_dict(self) -> dict:
        return self.state_at(self._epoch, self._sample)

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
        if state["seed"] != self.spec.seed:
            raise UserError(f"seed: the checkpoint was trained with seed {state['seed']}, not {self.spec.seed}")
        self._epoch, self._sample = int(state["epoch"]), int(state["sample"])
        # An epoch not yet begun takes the current batch size as its layout; a begun one keeps its own.
        self._layout_size = self.spec.global_batch_size if self._sample == 0 else int(state["layout_size"])

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Row groups in this epoch's order, and the row of the epoch where each of them ends."""
        if self._epoch_order_cache is None or self._epoch_order_cache[0] != epoch:
            order = epoch_stream(self.spec.seed, epoch, ROW_GROUP_ORDER).permutation(len(self._rg_rows))
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
        handles = {} if self.spec.ultra_low_mem else self._open_files
        return pa.concat_tables([self._read_rows(rg, first, end, handles) for rg, first, end in
                                 self._pieces(epoch, lo, hi)])

    def _window_row_ids(self, epoch: int, window: int) -> np.ndarray:
        """The rows of window `window`, in the epoch's order, as numbers of the files' rows taken in order (all of
        the first file's, then the second's, ...): a row's identity whatever the epoch's order."""
        file_start = np.cumsum([0] + self._file_rows[:-1])
        lo = window * self.buffer_size
        hi = min(lo + self.buffer_size, self.num_rows)
        return np.concatenate([np.arange(first, end) + file_start[self._rg_file[rg]] + self._rg_first_row[rg]
                               for rg, first, end in self._pieces(epoch, lo, hi)])

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

    def _build_step(self, samples, epoch: int, lo: int) -> tuple[list[MicroBatch], int, int]:
        """This rank's micro-batches of the global batch `samples` (samples lo.. of the epoch), its target-token
        total and skipped rows."""
        raise NotImplementedError

    def __iter__(self):
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        # One thread reads and tokenizes the windows ahead of the steps (Arrow and the tokenizer release the GIL),
        # so a GPU step waits for no window; only it touches the open files and the row group stream.
        reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="window-reader")
        try:
            yield from self._steps(self._epoch, self._sample, self._layout_size, worker_id, num_workers, reader)
        finally:
            reader.shutdown(wait=False, cancel_futures=True)

    def _steps(self, epoch, start, layout_size, worker_id, num_workers, reader):
        step_size, windows = self.spec.global_batch_size, {}
        # Worker w builds the steps whose index in this epoch's remaining sequence is w modulo the workers.
        for index, lo in enumerate(range(start, self.num_samples, step_size)):
            if index % num_workers != worker_id:
                continue
            hi = min(lo + step_size, self.num_samples)
            samples = self._step_samples(epoch, lo, hi, layout_size, windows, reader)
            batches, step_tokens, skipped = self._build_step(samples, epoch, lo)
            self.skipped_rows += skipped
            self.load_state_dict(self.state_at(epoch, hi))  # state_dict() now resumes right after this step
            yield StepBatch(batches, epoch, hi, step_tokens, skipped)

    def _slices(self, samples: int) -> list:
        """This rank's micro-steps' slices of a global batch of `samples` sorted samples: micro-step m of rank r
        takes slice m·W + r of the world_size × accumulation slices (np.array_split's)."""
        spec = self.spec
        slices = np.array_split(np.arange(samples), spec.world_size * spec.gradient_accumulation_steps)
        return [slices[micro * spec.world_size + spec.rank] for micro in range(spec.gradient_accumulation_steps)]

    def __getstate__(self):
        # Spawned DataLoader workers get a copy without open files or decoded data.
        return {**self.__dict__, "_open_files": {}, "_stream": None, "_epoch_order_cache": None}
