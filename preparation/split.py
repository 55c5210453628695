"""The seeded global shuffle and the split, after deduplication, written in row groups of 5,000.

A seeded permutation gives every kept row its output position; the first `valid_rows` positions are the
validation file, the rest the training file. Since every duplicate cluster kept a single row before this, no
validation row equals or near-duplicates a training row. The shuffle is external: one pass scatters the rows into
bucket files by position range (BUCKET_ROWS positions each), a second reads one bucket at a time, orders it and
appends it to its output, so memory holds one bucket, never the corpus.
"""
import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROW_GROUP_ROWS = 5000  # what the training reader's buffer likes best (one row group, one shuffle buffer)
BUCKET_ROWS = 100_000
SCATTER_BATCH_ROWS = 16_384


def output_positions(kept_rows: int, seed: int) -> np.ndarray:
    """Per kept row (in input order), its position in the shuffled output."""
    order = np.random.default_rng(seed).permutation(kept_rows)
    positions = np.empty(kept_rows, dtype=np.int64)
    positions[order] = np.arange(kept_rows)
    return positions


class RowGroupWriter:
    """A parquet file written in row groups of exactly ROW_GROUP_ROWS rows (the last one may be shorter)."""

    def __init__(self, path: str, schema: pa.Schema):
        self.writer = pq.ParquetWriter(path, schema, compression="zstd")
        self.pending, self.pending_rows, self.rows = [], 0, 0

    def write(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.pending_rows += table.num_rows
        if self.pending_rows >= ROW_GROUP_ROWS:
            whole = pa.concat_tables(self.pending).combine_chunks()
            cut = whole.num_rows - whole.num_rows % ROW_GROUP_ROWS
            self.writer.write_table(whole.slice(0, cut), row_group_size=ROW_GROUP_ROWS)
            self.pending, self.pending_rows = [whole.slice(cut)], whole.num_rows - cut
        self.rows += table.num_rows

    def close(self) -> None:
        if self.pending_rows:
            self.writer.write_table(pa.concat_tables(self.pending).combine_chunks(), row_group_size=ROW_GROUP_ROWS)
        self.writer.close()


@dataclass
class SplitResult:
    rows: dict = field(default_factory=dict)
    """Rows written per split."""
    lengths: dict = field(default_factory=dict)
    """Per split, per column: the characters of each row (for the histograms)."""


def scatter(spill_path: str, columns, keep: np.ndarray, positions: np.ndarray, bucket_dir: str, progress) -> int:
    """Write every kept row, with its position, to the bucket of its position range. Returns the buckets used."""
    buckets = max(1, -(-len(positions) // BUCKET_ROWS))
    schema = pa.schema([(name, pa.string()) for name in columns] + [("position", pa.int64())])
    writers = [None] * buckets
    kept_before, first_row = 0, 0
    parquet = pq.ParquetFile(spill_path, buffer_size=1 << 20, pre_buffer=False)
    try:
        for batch in parquet.iter_batches(batch_size=SCATTER_BATCH_ROWS, columns=list(columns), use_threads=False):
            mask = keep[first_row:first_row + batch.num_rows]
            first_row += batch.num_rows
            chosen = batch.filter(pa.array(mask))
            where = positions[kept_before:kept_before + chosen.num_rows]
            kept_before += chosen.num_rows
            bucket_of = where // BUCKET_ROWS
            order = np.argsort(bucket_of, kind="stable")
            table = pa.Table.from_batches([chosen]).take(pa.array(order)).append_column(
                "position", pa.array(where[order]))
            bounds = np.searchsorted(bucket_of[order], np.arange(buckets + 1))
            for bucket in np.flatnonzero(bounds[1:] > bounds[:-1]):
                if writers[bucket] is None:
                    writers[bucket] = pa.ipc.new_stream(os.path.join(bucket_dir, f"{bucket:06d}.arrow"), schema)
                writers[bucket].write_table(table.slice(bounds[bucket], bounds[bucket + 1] - bounds[bucket]))
            progress.update(batch.num_rows)
    finally:
        for writer in writers:
            if writer is not None:
                writer.close()
    return buckets


def gather(bucket_dir: str, buckets: int, columns, valid_rows: int, outputs: dict, progress) -> SplitResult:
    """Read the buckets in order, each sorted by position, into the valid (first positions) and train files."""
    schema = pa.schema([(name, pa.string()) for name in columns])
    writers = {split: RowGroupWriter(path, schema) for split, path in outputs.items()}
    lengths = {split: {name: [] for name in columns} for split in outputs}
    try:
        for bucket in range(buckets):
            path = os.path.join(bucket_dir, f"{bucket:06d}.arrow")
            if not os.path.exists(path):
                continue
            with pa.ipc.open_stream(path) as reader:
                table = reader.read_all()
            table = table.take(pc.sort_indices(table, [("position", "ascending")]))
            cut = int(np.searchsorted(table.column("position").to_numpy(), valid_rows))
            for split, part in (("valid", table.slice(0, cut)), ("train", table.slice(cut))):
                if part.num_rows == 0:
                    continue
                part = part.select(list(columns))
                writers[split].write(part)
                for name in columns:
                    lengths[split][name].append(pc.utf8_length(part.column(name)).to_numpy().astype(np.int32))
            progress.update(1)
    finally:
        for writer in writers.values():
            writer.close()
    return SplitResult(rows={split: writer.rows for split, writer in writers.items()},
                       lengths={split: {name: np.concatenate(parts) if parts else np.zeros(0, np.int32)
                                        for name, parts in by_column.items()}
                                for split, by_column in lengths.items()})
