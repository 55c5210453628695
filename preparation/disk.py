"""Disk use, stated before the work starts and checked against the free space once the rows are counted.

What lives at once at the peak: the cleaned spill with the signatures, band keys and candidate pairs (deleted as
soon as the clusters are known), or the spill with the shuffle's buckets and the outputs.
"""
import os
import shutil
from dataclasses import dataclass

from utils.errors import UserError

COMPRESSED_TEXT_RATIO = 4  # text gz/zst files hold about 4 bytes of text per byte on disk
GUESSED_BYTES_PER_ROW = 200  # until the rows are counted (Chinese: ~70 characters of 3 bytes)
SPILL_RATIO = 0.5  # zstd-compressed parquet of Chinese text, per byte of text
BAND_RECORD_BYTES = 12
PAIR_BYTES = 8


@dataclass(frozen=True)
class DiskPlan:
    rows: int
    text_bytes: int
    dedup_bytes: int
    shuffle_bytes: int

    @property
    def peak_bytes(self) -> int:
        return max(self.dedup_bytes, self.shuffle_bytes)

    def describe(self) -> str:
        return (f"disk: about {size(self.peak_bytes)} at the peak for {self.rows:,} rows of {size(self.text_bytes)} "
                f"of text (deduplication {size(self.dedup_bytes)}, shuffle and outputs {size(self.shuffle_bytes)}), "
                "freed at the end except the outputs")


def size(count: int) -> str:
    return f"{count / 1e9:.2f} GB" if count >= 1e9 else f"{count / 1e6:.1f} MB"


def plan_disk(rows: int, text_bytes: int, flags, bands: int) -> DiskPlan:
    spill = int(text_bytes * SPILL_RATIO)
    near = flags.dedup == "near"
    # Pairs: at most two per row and band (each row pairs with its bucket's first and previous row).
    dedup = spill + (rows * (flags.num_perm * 4 + bands * (BAND_RECORD_BYTES + 2 * PAIR_BYTES)) if near else 0)
    return DiskPlan(rows, text_bytes, dedup, spill + text_bytes + spill)


def input_estimate(sources, parquet_rows: dict) -> tuple[int, int]:
    """(rows, text bytes) guessed from the inputs' sizes (parquet: its footer's rows)."""
    rows, text_bytes = 0, 0
    for source in sources:
        if source.path in parquet_rows:
            rows_here, bytes_here = parquet_rows[source.path]
        else:
            bytes_here = source.size * (COMPRESSED_TEXT_RATIO if source.compression else 1)
            rows_here = bytes_here // GUESSED_BYTES_PER_ROW
        rows, text_bytes = rows + rows_here, text_bytes + bytes_here
    return rows, text_bytes


def check_free_space(plan: DiskPlan, directory: str, flag: str) -> None:
    free = shutil.disk_usage(directory).free
    if free < plan.peak_bytes:
        raise UserError(f"{flag}: {size(free)} free in {os.path.abspath(directory)}, preparing these rows needs "
                        f"about {size(plan.peak_bytes)}; free some space or choose another --output_dir")
