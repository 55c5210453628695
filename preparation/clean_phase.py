"""Phase 1: every input row read, mapped to the output columns, cleaned, and spilled to one parquet file.

The spill keeps, with each kept row, the file and line it came from (for the report's examples); its row numbers
are the row ids every later phase uses, in input order, so "keep the first of a cluster" means the first read.
"""
import os
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from preparation.cleaning import Cleaner
from preparation.columns import OUTPUT_COLUMNS, Mapping, resolve
from preparation.formats import READ_ERRORS, BadRow, Opened, Record, Source, parquet_columns, read_parquet, read_rows
from utils.errors import UserError

SPILL_ROWS = 50_000
BAD_ROW_EXAMPLES = 20
ROWS_TO_FIND_A_RECORD = 1000


@dataclass
class CleanResult:
    rows_read: int = 0
    bad_rows: int = 0
    bad_rows_by_file: Counter = field(default_factory=Counter)
    bad_row_examples: list = field(default_factory=list)
    cleaning: dict = field(default_factory=dict)
    rows_out: int = 0
    files: list = field(default_factory=list)

    def add_bad(self, path: str, bad: BadRow) -> None:
        self.bad_rows += 1
        self.bad_rows_by_file[path] += 1
        if len(self.bad_row_examples) < BAD_ROW_EXAMPLES:
            self.bad_row_examples.append({"file": path, "line": bad.line, "reason": bad.reason})


def spill_schema(objective: str) -> pa.Schema:
    return pa.schema([(name, pa.string()) for name in OUTPUT_COLUMNS[objective]]
                     + [("source", pa.int32()), ("line", pa.int64())])


def mapping_of(source: Source, flags) -> Mapping:
    """Decide a file's mapping before anything is read in earnest: a UserError naming the file if it cannot be
    opened, decompressed, or has no usable column."""
    try:
        if source.format == "parquet":
            names, _ = parquet_columns(source.path)
            return resolve(names, flags.objective, flags, source.path)
        opened = Opened(source)
        try:
            for count, item in enumerate(read_rows(opened, source, flags.text_blocks)):
                if isinstance(item, Record):
                    return resolve(item.fields.keys(), flags.objective, flags, source.path)
                if count >= ROWS_TO_FIND_A_RECORD:
                    break
        finally:
            opened.close()
    except READ_ERRORS as error:
        raise unreadable(source.path, error) from None
    # Nothing parseable at the start: the clean phase counts its bad rows and finds what it can by these names.
    wanted = {"prompt": flags.prompt_column, "response": flags.response_column, "text": flags.text_column}
    return Mapping(flags.objective, tuple(wanted[column] or column for column in OUTPUT_COLUMNS[flags.objective]))


def unreadable(path: str, error: Exception) -> UserError:
    return UserError(f"{path}: cannot read it ({type(error).__name__}: {error}); check or re-download the file, "
                     "or leave it out of --input")


def records_of(source: Source, mapping: Mapping, flags, opened: Opened | None):
    if source.format == "parquet":
        return read_parquet(source.path, mapping.needed())
    return read_rows(opened, source, flags.text_blocks)


def run_clean(sources: list[Source], mappings: list[Mapping], flags, spill_path: str, progress) -> CleanResult:
    """Write the cleaned rows of every source to `spill_path` (whole, or not at all) and count what happened."""
    result, cleaner = CleanResult(), Cleaner(flags)
    schema = spill_schema(flags.objective)
    columns = [[] for _ in schema.names]
    tmp = spill_path + ".tmp"
    with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for index, (source, mapping) in enumerate(zip(sources, mappings)):
            rows_before, done_bytes = result.rows_read + result.bad_rows, 0
            opened = None if source.format == "parquet" else Opened(source)
            # Progress in bytes of the file on disk: a parquet file's share of its rows read.
            parquet_rows = parquet_columns(source.path)[1] if opened is None else 0
            position = opened.bytes_read if opened is not None else \
                (lambda: source.size * count // max(1, parquet_rows))
            count = 0
            try:
                for count, item in enumerate(records_of(source, mapping, flags, opened), start=1):
                    if isinstance(item, BadRow):
                        result.add_bad(source.path, item)
                        continue
                    result.rows_read += 1
                    values = mapping.extract(item.fields)
                    if isinstance(values, str):
                        result.add_bad(source.path, BadRow(item.line, values))
                        result.rows_read -= 1
                        continue
                    cleaned = cleaner.clean(values)
                    if cleaned is not None:
                        for column, value in zip(columns, (*cleaned, index, item.line)):
                            column.append(value)
                        if len(columns[0]) >= SPILL_ROWS:
                            result.rows_out += flush(writer, schema, columns)
                    if count % 4096 == 0:
                        progress.update(position() - done_bytes)
                        done_bytes = position()
            except READ_ERRORS as error:
                raise unreadable(source.path, error) from None
            finally:
                if opened is not None:
                    opened.close()
            progress.update(source.size - done_bytes)
            result.files.append({"path": source.path, "format": source.format, "compression": source.compression,
                                 "rows": result.rows_read + result.bad_rows - rows_before})
        result.rows_out += flush(writer, schema, columns)
    os.replace(tmp, spill_path)
    result.cleaning = cleaner.counts.as_dict()
    return result


def flush(writer, schema: pa.Schema, columns: list) -> int:
    rows = len(columns[0])
    if rows:
        writer.write_table(pa.table([pa.array(values, type=kind) for values, kind in zip(columns, schema.types)],
                                    schema=schema))
        for values in columns:
            values.clear()
    return rows


def spill_batches(spill_path: str, columns, batch_rows: int = 8192):
    """The spill's values of `columns`, batch by batch in row order, as lists of Python strings."""
    parquet = pq.ParquetFile(spill_path, buffer_size=1 << 20, pre_buffer=False)
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=list(columns), use_threads=False):
        yield [batch.column(name).to_pylist() for name in columns]


def dedup_keys(values: list[list[str]]) -> list[str]:
    """What deduplication compares: a row's fields joined by a newline (a prompt with its response)."""
    return values[0] if len(values) == 1 else ["\n".join(fields) for fields in zip(*values)]


def spill_rows(spill_path: str, row_ids, columns) -> dict:
    """Row id -> {column: value} for a few rows, reading only the row groups that hold them."""
    parquet = pq.ParquetFile(spill_path)
    wanted, found, first = sorted(set(int(row) for row in row_ids)), {}, 0
    for group in range(parquet.metadata.num_row_groups):
        end = first + parquet.metadata.row_group(group).num_rows
        inside = [row for row in wanted if first <= row < end]
        if inside:
            table = parquet.read_row_group(group, columns=list(columns)).to_pydict()
            for row in inside:
                found[row] = {name: table[name][row - first] for name in columns}
        first = end
    return found
