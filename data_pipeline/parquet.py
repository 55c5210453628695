"""Parquet files of text columns: the one validator (footer only) and the one reader every part uses.

The trainer, the tokenizer, evaluation, `plan` and the pre-flight all read the same files, so they find the same
problems with the same words: each names the file and what is wrong with it, as a `UserError`.
"""
import functools
import glob
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from preparation.layout import prepared_file
from utils.errors import UnreadableData, UserError

TEXT_COLUMNS = ("prompt", "response")
READ_BATCH_ROWS = 1024
READ_BUFFER_BYTES = 1 << 20  # buffered column reads without pre-buffering: a huge row group is never loaded whole


def expand_paths(files) -> list[str]:
    """A path, a glob, or a list of either → the list of paths, in a stable order. A directory written by
    `prepare` stands for its train.parquet (preparation.layout.prepared_file)."""
    patterns = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    if not patterns:
        raise UserError("no training files given")
    paths = []
    for pattern in map(os.fspath, patterns):
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [prepared_file(pattern)]
        if not matches:
            raise UserError(f"{pattern}: no file matches this pattern")
        paths.extend(matches)
    return paths


@dataclass(frozen=True)
class Footer:
    """What a file's footer tells without reading any row."""

    path: str
    row_group_rows: np.ndarray
    """Rows of each row group, in file order."""
    uncompressed_bytes: int
    """Bytes of all rows once decoded: about their size in memory."""

    @property
    def num_rows(self) -> int:
        return int(self.row_group_rows.sum())


def _has_usable_rows(row_group, column_positions) -> bool:
    """False only when the footer statistics prove every value of one of the columns is null or empty."""
    for stats in (row_group.column(position).statistics for position in column_positions):
        # All values null, or the largest string "" (so every non-null value is ""): nothing to train on.
        if stats is not None and ((stats.has_null_count and stats.null_count >= row_group.num_rows)
                                  or (stats.has_min_max and stats.max in ("", b""))):
            return False
    return True


def read_footer(path: str, columns=TEXT_COLUMNS, require_usable: bool = True) -> Footer:
    """Validate one file from its footer alone: it exists, is parquet, and has `columns` holding strings (and,
    with `require_usable`, a row group whose statistics do not prove one of them all empty)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(f"{path}: file not found")
    if os.path.isdir(path):
        raise UserError(f"{path}: is a directory, expected a parquet file")
    try:
        metadata = pq.ParquetFile(path).metadata
        schema = metadata.schema.to_arrow_schema()
    except (pa.ArrowException, OSError) as error:
        raise UserError(f"{path}: not a readable parquet file ({error})") from None
    for name in columns:
        if name not in schema.names:
            raise UserError(f"{path}: missing column '{name}' (columns: {', '.join(schema.names)})")
        kind = schema.field(name).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise UserError(f"{path}: column '{name}' must hold strings, found {kind}")
    row_groups = [metadata.row_group(i) for i in range(metadata.num_row_groups)]
    positions = [metadata.schema.names.index(name) for name in columns]
    if require_usable and metadata.num_rows > 0 and not any(_has_usable_rows(rg, positions) for rg in row_groups):
        raise UserError(f"{path}: no usable rows (every {' or every '.join(columns)} is null or empty)")
    return Footer(path, np.array([rg.num_rows for rg in row_groups], dtype=np.int64),
                  sum(rg.total_byte_size for rg in row_groups))


def open_parquet(path: str) -> pq.ParquetFile:
    return pq.ParquetFile(path, buffer_size=READ_BUFFER_BYTES, pre_buffer=False)


def read_batches(parquet: pq.ParquetFile, path: str, columns=TEXT_COLUMNS, row_group: int | None = None,
                 use_threads: bool = True):
    """The record batches of `columns` (of one row group, or of the whole file). A read that fails — a file
    changed or damaged after its footer was checked — is `UnreadableData` naming the file: only the rank that
    read it knows."""
    where = "" if row_group is None else f" row group {row_group}"
    try:
        yield from parquet.iter_batches(batch_size=READ_BATCH_ROWS, columns=list(columns), use_threads=use_threads,
                                        row_groups=None if row_group is None else [row_group])
    except (pa.ArrowException, OSError) as error:
        raise UnreadableData(f"{path}: cannot read{where} ({error})") from None


def non_empty(rows: pa.Table, columns) -> np.ndarray:
    """Rows where every one of `columns` holds text (neither null nor empty)."""
    usable = functools.reduce(pc.and_, [pc.greater(pc.utf8_length(rows[name]), 0) for name in columns])
    return pc.fill_null(usable, False).to_numpy(zero_copy_only=False)


def first_usable_rows(path: str, max_rows: int, columns=TEXT_COLUMNS, usable=None) -> list[list[str]]:
    """Each column's values in the first `max_rows` usable rows: where `usable(table)` (a bool per row of a table
    of `columns`) holds, by default where none of `columns` is null or empty."""
    read_footer(path, columns)
    kept = [[] for _ in columns]
    for batch in read_batches(open_parquet(path), path, columns):
        table = pa.Table.from_batches([batch])
        rows = np.flatnonzero(usable(table) if usable else non_empty(table, columns))[: max_rows - len(kept[0])]
        for values, name in zip(kept, columns):
            values.extend(table[name].take(rows).to_pylist())
        if len(kept[0]) == max_rows:
            break
    return kept
    return kept
