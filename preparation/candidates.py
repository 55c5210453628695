"""Near-duplicate detection, step 2: candidate pairs from the spilled band keys, one partition at a time.

Rows sharing a band key are candidates. Within a bucket (rows of equal key, ascending), each row is paired with
the bucket's first row and with the row before it: linear in the bucket's size (a bucket of a million copies of a
boilerplate line makes two million pairs, not half a trillion), and enough to connect every chain of near
duplicates the bucket holds. Pairs go to PAIR_PARTITIONS files by their first row, so that the next step can
remove the pairs found by several bands one partition at a time.
"""
import os

import numpy as np

from preparation.signature_phase import BAND_RECORD, PARTITIONS, band_file

PAIR_PARTITIONS = 16


def pair_file(directory: str, partition: int) -> str:
    return os.path.join(directory, f"pairs{partition:02d}.u64")


def bucket_pairs(keys: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first, second) row pairs, first < second, of the buckets of equal `keys` (sorted, rows ascending inside)."""
    if len(keys) < 2:
        return np.zeros(0, dtype=np.uint32), np.zeros(0, dtype=np.uint32)
    same = keys[1:] == keys[:-1]
    positions = np.arange(len(keys))
    starts = np.maximum.accumulate(np.where(np.concatenate([[True], ~same]), positions, 0))
    to_previous = np.flatnonzero(same) + 1
    to_first = to_previous[starts[to_previous] != to_previous - 1]
    first = np.concatenate([rows[to_previous - 1], rows[starts[to_first]]])
    second = np.concatenate([rows[to_previous], rows[to_first]])
    return first, second


def write_candidate_pairs(band_dir: str, bands: int, pair_dir: str, progress) -> int:
    """Sort each band partition by key and write its bucket pairs. Returns the pairs written."""
    outputs = [open(pair_file(pair_dir, partition), "wb") for partition in range(PAIR_PARTITIONS)]
    written = 0
    try:
        for band in range(bands):
            for partition in range(PARTITIONS):
                path = band_file(band_dir, band, partition)
                records = np.fromfile(path, dtype=BAND_RECORD)
                order = np.argsort(records["key"], kind="stable")
                first, second = bucket_pairs(records["key"][order], records["row"][order])
                del records, order
                packed = (first.astype(np.uint64) << np.uint64(32)) | second.astype(np.uint64)
                which = first % PAIR_PARTITIONS
                for pair_partition in range(PAIR_PARTITIONS):
                    outputs[pair_partition].write(packed[which == pair_partition].tobytes())
                written += len(packed)
                progress.update(1)
    finally:
        for handle in outputs:
            handle.close()
    return written
