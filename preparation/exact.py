"""Exact deduplication: rows whose cleaned fields are identical (after normalisation) keep their first copy.

Each row is reduced to an 8-byte BLAKE2b digest (10M rows: 80 MB; a chance collision among 10M rows is about
3e-6), and a stable sort of the digests finds every repeat with its first occurrence in input order.
"""
import hashlib

import numpy as np

from preparation.clean_phase import dedup_keys, spill_batches


def row_digests(spill_path: str, columns, total_rows: int, progress) -> np.ndarray:
    digests = np.empty(total_rows, dtype=np.uint64)
    filled = 0
    for values in spill_batches(spill_path, columns):
        keys = dedup_keys(values)
        joined = b"".join(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
                          for key in keys)
        digests[filled:filled + len(keys)] = np.frombuffer(joined, dtype=np.uint64)
        filled += len(keys)
        progress.update(len(keys))
    return digests


def first_copies(digests: np.ndarray) -> tuple[np.ndarray, int]:
    """A mask of the rows to keep (the first of each group of equal digests) and the number of groups with
    repeats."""
    order = np.argsort(digests, kind="stable")
    ordered = digests[order]
    repeat = np.concatenate([[False], ordered[1:] == ordered[:-1]])
    keep = np.ones(len(digests), dtype=bool)
    keep[order[repeat]] = False
    groups = int(np.count_nonzero(repeat & ~np.concatenate([[False], repeat[:-1]])))
    return keep, groups
