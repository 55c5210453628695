"""Reading raw corpora: which format a file is, its decompression, and one reader per format.

Every reader yields `Record`s (a row's fields, with the line it starts on) and `BadRow`s (a row that cannot be
parsed, with its line and why) in file order, holding one row at a time (a JSON array is decoded element by
element). A file that cannot be opened or decompressed at all is a `UserError` naming it.
"""
import codecs
import csv
import gzip
import io
import json
import os
from dataclasses import dataclass

from utils.errors import UserError

FORMATS = ("parquet", "jsonl", "json", "csv", "tsv", "text")
EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
              ".csv": "csv", ".tsv": "tsv", ".txt": "text", ".text": "text"}
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
PARQUET_BATCH_ROWS = 4096
TEXT_CHUNK_CHARS = 1 << 20
LARGEST_JSON_ELEMENT_CHARS = 64 << 20  # a JSON array element still incomplete after this much text is malformed
csv.field_size_limit(1 << 30)  # the default 128 KiB refuses long documents


def _read_errors() -> tuple:
    """What reading a damaged, truncated or unreadable file raises (zstandard's error is its own class)."""
    errors = (OSError, EOFError, ValueError)
    try:
        import zstandard
    except ImportError:
        return errors
    return errors + (zstandard.ZstdError,)


READ_ERRORS = _read_errors()


@dataclass(frozen=True)
class Record:
    line: int
    """Line (row, for parquet) of the file where the row starts, from 1."""
    fields: dict


@dataclass(frozen=True)
class BadRow:
    line: int
    reason: str


@dataclass(frozen=True)
class Source:
    path: str
    format: str
    compression: str | None

    @property
    def size(self) -> int:
        return os.path.getsize(self.path)


def source_of(path: str, forced_format: str = "auto") -> Source:
    """The format and compression of `path` from its name (`data.jsonl.zst`), or `forced_format`."""
    stem, compression = path, None
    for ending, kind in COMPRESSIONS.items():
        if path.lower().endswith(ending):
            stem, compression = path[: -len(ending)], kind
    extension = os.path.splitext(stem)[1].lower()
    kind = forced_format if forced_format != "auto" else EXTENSIONS.get(extension)
    if kind is None:
        raise UserError(f"{path}: unknown format {extension or '(no extension)'!r}; name the file "
                        f"{', '.join(sorted(EXTENSIONS))} (optionally .gz or .zst), or pass --format="
                        f"{'|'.join(FORMATS)}")
    if kind == "parquet" and compression:
        raise UserError(f"{path}: a parquet file compresses its own columns and must be seekable; decompress it "
                        f"first (e.g. {'gunzip' if compression == 'gzip' else 'unzstd'} {path})")
    return Source(path, kind, compression)


class Opened:
    """A source's decompressed bytes, and how far into the file on disk reading has got (for progress)."""

    def __init__(self, source: Source):
        self.raw = open(source.path, "rb")
        if source.compression == "gzip":
            self.stream = gzip.GzipFile(fileobj=self.raw)
        elif source.compression == "zstd":
            try:
                import zstandard
            except ImportError:
                self.raw.close()
                raise UserError(f"{source.path}: reading .zst files needs zstandard: pip install zstandard") \
                    from None

            self.stream = zstandard.ZstdDecompressor().stream_reader(self.raw, read_across_frames=True)
        else:
            self.stream = self.raw
        self.stream = io.BufferedReader(self.stream, 1 << 20) if source.compression else self.stream

    def bytes_read(self) -> int:
        return self.raw.tell()

    def close(self) -> None:
        self.stream.close()
        self.raw.close()


def decoded_lines(stream, bad_rows: list):
    """(line number, text) of each line; a line that is not UTF-8 becomes a BadRow in `bad_rows` instead."""
    for number, raw in enumerate(stream, start=1):
        try:
            yield number, raw.decode("utf-8")
        except UnicodeDecodeError as error:
            bad_rows.append(BadRow(number, f"not UTF-8 text ({error.reason} at byte {error.start})"))


def read_jsonl(stream):
    bad = []
    for number, line in decoded_lines(stream, bad):
        yield from _drain(bad)
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            yield BadRow(number, f"not JSON ({error.msg} at column {error.colno})")
            continue
        yield Record(number, value) if isinstance(value, dict) else BadRow(number, "not a JSON object")
    yield from _drain(bad)


def _drain(bad: list):
    while bad:
        yield bad.pop(0)


def read_json_array(stream):
    """Elements of a top-level JSON array, decoded one at a time; a file starting with `{` is read as jsonl."""
    decode_chunk = codecs.getincrementaldecoder("utf-8")().decode
    decoder = json.JSONDecoder()
    head = stream.read(TEXT_CHUNK_CHARS)
    try:
        text = decode_chunk(head, final=not head)
    except UnicodeDecodeError as error:
        yield BadRow(1, f"not UTF-8 text ({error.reason}); the rest of this file cannot be read")
        return
    stripped = text.lstrip()
    if stripped.startswith("{"):
        yield from read_jsonl(io.BufferedReader(_Prefixed(head, stream)))
        return
    if not stripped.startswith("["):
        if stripped:
            yield BadRow(1, "not a JSON array of objects (it should start with '[')")
        return
    position, line, finished = text.index("[") + 1, 1 + text[: text.index("[")].count("\n"), not head
    while True:
        while position < len(text) and text[position] in " \t\r\n,":
            line += text[position] == "\n"
            position += 1
        if position < len(text) and text[position] == "]":
            return
        try:
            if position >= len(text):
                raise json.JSONDecodeError("the array is not closed with ']'", text, position)
            value, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            if not finished and len(text) - position < LARGEST_JSON_ELEMENT_CHARS:
                chunk = stream.read(TEXT_CHUNK_CHARS)
                finished = not chunk
                try:
                    text = text[position:] + decode_chunk(chunk, final=finished)
                except UnicodeDecodeError as bad_bytes:
                    yield BadRow(line, f"not UTF-8 text ({bad_bytes.reason}); the rest of this file cannot be read")
                    return
                position = 0
                continue
            yield BadRow(line + text.count("\n", position, error.pos),
                         f"not JSON ({error.msg}); the rest of this array cannot be read")
            return
        yield Record(line, value) if isinstance(value, dict) else BadRow(line, "not a JSON object")
        line += text.count("\n", position, end)
        position = end


class _Prefixed(io.RawIOBase):
    """A stream that first gives back bytes already read from it."""

    def __init__(self, head: bytes, stream):
        self.head, self.stream = head, stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.head:
            count = min(len(buffer), len(self.head))
            buffer[:count], self.head = self.head[:count], self.head[count:]
            return count
        data = self.stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def read_delimited(stream, delimiter: str):
    bad = []
    lines = decoded_lines(stream, bad)
    reader = csv.reader((text for _, text in lines), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        yield from _drain(bad)
        return
    except csv.Error as error:
        yield BadRow(1, f"unreadable header ({error})")
        return
    while True:
        start = reader.line_num + 1
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as error:
            yield BadRow(start, f"not valid {'CSV' if delimiter == ',' else 'TSV'} ({error})")
            continue
        yield from _drain(bad)
        if not values:
            continue
        if len(values) != len(header):
            yield BadRow(start, f"{len(values)} fields, the header has {len(header)}")
            continue
        yield Record(start, dict(zip(header, values)))
    yield from _drain(bad)


def read_text(stream, blocks: bool):
    """One document per line, or (blocks) per run of lines between blank lines."""
    bad, block, first = [], [], 0
    for number, line in decoded_lines(stream, bad):
        yield from _drain(bad)
        line = line.rstrip("\r\n")
        if not blocks:
            if line.strip():
                yield Record(number, {"text": line})
        elif line.strip():
            first = first or number
            block.append(line)
        elif block:
            yield Record(first, {"text": "\n".join(block)})
            block, first = [], 0
    if block:
        yield Record(first, {"text": "\n".join(block)})
    yield from _drain(bad)


def read_parquet(path: str, columns: list[str]):
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
    row = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns, use_threads=False):
        values = [batch.column(name).to_pylist() for name in columns]
        for fields in zip(*values):
            row += 1
            yield Record(row, dict(zip(columns, fields)))


def parquet_columns(path: str) -> tuple[list[str], int]:
    """A parquet file's column names and rows, from its footer."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        metadata = pq.ParquetFile(path).metadata
        return metadata.schema.to_arrow_schema().names, metadata.num_rows
    except (pa.ArrowException, OSError) as error:
        raise UserError(f"{path}: not a readable parquet file ({error}); check the file or leave it out of "
                        "--input") from None


def read_rows(opened: Opened, source: Source, text_blocks: bool):
    """The records of a row-based source, in file order."""
    if source.format == "jsonl":
        return read_jsonl(opened.stream)
    if source.format == "json":
        return read_json_array(opened.stream)
    if source.format in ("csv", "tsv"):
        return read_delimited(opened.stream, "," if source.format == "csv" else "\t")
    return read_text(opened.stream, text_blocks)
