"""Near-duplicate detection, step 1: each row's MinHash signature and LSH band keys, spilled to disk.

Signatures go to one row-major file of uint32 (num_perm x 4 bytes a row), read back later only for candidate
pairs. Band keys go to `bands x PARTITIONS` files of (key, row) records, partitioned by the key's top bits, so that
the next step sorts one partition at a time (about rows x bands / PARTITIONS records) instead of an in-memory LSH
index of every row: memory stays bounded however many rows there are, only disk grows.
"""
import os

import numpy as np

from preparation.clean_phase import dedup_keys, spill_batches
from preparation.minhash import Banding, signatures

PARTITIONS = 16
PARTITION_SHIFT = np.uint64(64 - 4)  # log2(PARTITIONS) top bits of a key choose its partition
BAND_RECORD = np.dtype([("key", "<u8"), ("row", "<u4")])  # packed: 12 bytes
HASH_BATCH_ROWS = 8192
SIGNATURE_FILE = "signatures.u32"
BAND_DIR = "bands"


def band_file(directory: str, band: int, partition: int) -> str:
    return os.path.join(directory, f"band{band:02d}-part{partition:02d}.bin")


def write_signatures(spill_path: str, columns, keep: np.ndarray, flags, banding: Banding, directory: str,
                     progress) -> int:
    """Signatures (into `directory`) and band keys (into its BAND_DIR) of the rows `keep` marks (row ids: their
    rank among them). Returns their count."""
    outputs = {(band, partition): open(band_file(os.path.join(directory, BAND_DIR), band, partition), "wb")
               for band in range(banding.bands) for partition in range(PARTITIONS)}
    signed, first_row = 0, 0
    try:
        with open(os.path.join(directory, SIGNATURE_FILE), "wb") as signature_out:
            for values in spill_batches(spill_path, columns, HASH_BATCH_ROWS):
                keys = dedup_keys(values)
                kept = keep[first_row:first_row + len(keys)]
                first_row += len(keys)
                texts = [key for key, wanted in zip(keys, kept) if wanted]
                if texts:
                    block = signatures(texts, flags.dedup_ngram, flags.num_perm, flags.seed)
                    signature_out.write(block.tobytes())
                    spill_band_keys(banding.keys(block), signed, outputs)
                    signed += len(texts)
                progress.update(len(keys))
    finally:
        for handle in outputs.values():
            handle.close()
    return signed


def spill_band_keys(keys: np.ndarray, first_id: int, outputs: dict) -> None:
    rows = np.arange(first_id, first_id + len(keys), dtype=np.uint32)
    for band in range(keys.shape[1]):
        partitions = (keys[:, band] >> PARTITION_SHIFT).astype(np.int64)
        order = np.argsort(partitions, kind="stable")  # rows stay ascending within a partition
        records = np.empty(len(keys), dtype=BAND_RECORD)
        records["key"], records["row"] = keys[order, band], rows[order]
        bounds = np.searchsorted(partitions[order], np.arange(PARTITIONS + 1))
        for partition in range(PARTITIONS):
            if bounds[partition] < bounds[partition + 1]:
                outputs[band, partition].write(records[bounds[partition]:bounds[partition + 1]].tobytes())


def read_signatures(directory: str, num_perm: int, rows: np.ndarray) -> np.ndarray:
    """The signatures of `rows` (ids), each read with its own pread. A memory map would be simpler, but every page
    it touched counts in the process's resident memory until it closes, and the kernel maps pages around each
    one touched: reading 40,000 random rows of a 512 MB file that way made the process 508 MB larger."""
    unique, inverse = np.unique(rows, return_inverse=True)
    width = num_perm * 4
    found = np.empty((len(unique), num_perm), dtype=np.uint32)
    view = memoryview(found).cast("B")
    descriptor = os.open(os.path.join(directory, SIGNATURE_FILE), os.O_RDONLY)
    try:
        for index, row in enumerate(unique.tolist()):
            os.preadv(descriptor, [view[index * width:(index + 1) * width]], row * width)
    finally:
        os.close(descriptor)
    return found[inverse.reshape(-1)]
