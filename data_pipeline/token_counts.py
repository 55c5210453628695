"""How many tokens each document of a text column has: counted once per file and tokenizer, kept on disk.

A packed epoch is cut into chunks of a fixed number of tokens, so its number of steps, and where each window of
documents starts in it, depend on every document's token count, which no footer holds. One pass counts them (as
fast as the tokenizer, on all cores, in bounded memory) and writes, per file, the running total before each row:
8 bytes per row. The dataset then reads only the entries at row-group and window boundaries, so
its memory stays flat whatever the corpus size, and every later run or resume on the same file and tokenizer
reuses the counts. A changed file (size or modification time) or another tokenizer gets new counts.
"""
import hashlib
import logging
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_pipeline.parquet import open_parquet, read_batches
from utils.atomic import TMP_PREFIX

log = logging.getLogger("trainer")
WAIT_SECONDS = 1.0


def counts_paths(counts_dir: str, paths: list, column: str, encoder) -> list[str]:
    """Where the counts of each file's `column` under `encoder` live: names that change with any of them."""
    tokenizer = hashlib.sha256(encoder.to_str().encode()).hexdigest()

    def name(path: str) -> str:
        stat = os.stat(path)
        identity = "|".join((os.path.realpath(path), str(stat.st_size), str(stat.st_mtime_ns), column, tokenizer))
        return os.path.join(counts_dir, hashlib.sha256(identity.encode()).hexdigest()[:24] + ".int64")

    return [name(path) for path in paths]


def is_document(texts) -> pa.Array:
    """Which texts are documents: a null or empty text is none (it holds no token, not even [EOS])."""
    return pc.fill_null(pc.greater(pc.utf8_length(texts), 0), False)


def documents(texts) -> pa.Array:
    """The texts that are documents, in their order."""
    return texts.filter(is_document(texts))


def document_lengths(encoder, texts) -> np.ndarray:
    """Tokens of each text, [EOS] included; 0 for a text that is no document."""
    present = is_document(texts).to_numpy(zero_copy_only=False)
    lengths = np.zeros(len(texts), dtype=np.int64)
    kept = documents(texts).to_pylist()
    lengths[present] = [len(encoding) for encoding in encoder.encode_batch_fast(kept)] if kept else []
    return lengths


def count_tokens(path: str, column: str, encoder, destination: str) -> int:
    """Write the running token totals of `path`'s rows to `destination` (entry i: tokens before row i; one more
    entry than rows) and return the file's total. Written under a temporary name, then renamed: a count cut short
    by a crash is never taken for a whole one."""
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    partial = os.path.join(os.path.dirname(destination), f"{TMP_PREFIX}{os.getpid()}-{os.path.basename(destination)}")
    total = 0
    try:
        with open(partial, "wb") as out:
            out.write(np.zeros(1, dtype=np.int64).tobytes())
            for batch in read_batches(open_parquet(path), path, [column]):
                running = total + np.cumsum(document_lengths(encoder, batch.column(0)))
                out.write(running.astype(np.int64).tobytes())
                total = int(running[-1]) if len(running) else total
        os.replace(partial, destination)
    finally:
        if os.path.exists(partial):  # a count cut short (Ctrl-C, a damaged file) leaves nothing behind
            os.remove(partial)
    return total


def ensure_counts(paths: list, column: str, encoder, wanted: list, is_counter: bool = True) -> list[str]:
    """The counts files `wanted` of `paths` (see `counts_paths`), counting those missing. Only the counter (the main
    process) counts; the other processes wait for its files, so a corpus is tokenized once, not once per process.
    Give every process the main process's names: on another machine the files' paths or times may differ."""
    missing = [(path, counts) for path, counts in zip(paths, wanted) if not os.path.exists(counts)]
    if missing and is_counter:
        for path, counts in missing:
            started = time.time()
            log.info("counting the tokens of every document of %s (once per file and tokenizer; packing needs "
                     "them to cut the epoch into chunks) ...", path)
            total = count_tokens(path, column, encoder, counts)
            log.info("%s: %d tokens counted in %.1fs, kept in %s", path, total, time.time() - started, counts)
    elif missing:
        while not all(os.path.exists(counts) for _, counts in missing):
            time.sleep(WAIT_SECONDS)
    return wanted


class RunningTotals:
    """A counts file: `before(i)` is the number of tokens in rows [0, i) of its parquet file.

    Each entry is read on its own (`pread`), not memory-mapped: the pages of a mapping stay in the process's resident
    memory, and the entries a run reads (two per row group and window) lie on thousands of different pages of a
    10M-row file's 80 MB.
    """

    ENTRY_BYTES = 8

    def __init__(self, counts_file: str):
        self.file = counts_file

    def before(self, rows) -> np.ndarray:
        rows = np.atleast_1d(np.asarray(rows, dtype=np.int64))
        rows = np.where(rows < 0, rows + len(self), rows)
        descriptor = os.open(self.file, os.O_RDONLY)
        try:
            raw = b"".join(os.pread(descriptor, self.ENTRY_BYTES, int(row) * self.ENTRY_BYTES) for row in rows)
        finally:
            os.close(descriptor)
        return np.frombuffer(raw, dtype="<i8")

    def __len__(self) -> int:
        return os.path.getsize(self.file) // self.ENTRY_BYTES
