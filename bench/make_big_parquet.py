"""Write a large benchmark parquet by sampling rows (seeded, with replacement) from a small one.

    python bench/make_big_parquet.py --rows 10000000 --out /tmp/big_10m.parquet

Streams one row group at a time, so memory stays at the source table plus one row group however many rows
are written. The default row group size, 5,000 rows, equals the dataset's default window, so a window
touches at most two row groups. Smaller groups would mix a few more places of the file into each window,
but the footer grows with their number and ultra_low_mem re-reads it for every window: 2,000-row groups
make it 6.5 MB for 10M rows (2.6 MB at 5,000) and cost about 20 MB more peak memory.
"""

import argparse
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq

DEFAULT_SOURCE = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "sample_train_3k.parquet"
COLUMNS = ["prompt", "response"]


def make_big_parquet(out, rows: int, row_group_size: int = 5000, source=DEFAULT_SOURCE, seed: int = 0,
                     text: bool = False) -> None:
    """Write `rows` rows drawn from `source` to `out`, `row_group_size` rows per row group. With `text`, each row
    is one document in a `text` column (its prompt and response on two lines), for span corruption."""
    pool = pq.read_table(source, columns=COLUMNS).cast(pa.schema([(name, pa.string()) for name in COLUMNS]))
    if text:
        pool = pa.table({"text": pa.compute.binary_join_element_wise(pool["prompt"], pool["response"], "\n")})
    rng = np.random.default_rng(seed)
    # Written under a temporary name so an interrupted run never leaves a plausible-looking file behind.
    partial = f"{out}.partial"
    with pq.ParquetWriter(partial, pool.schema) as writer:
        for start in range(0, rows, row_group_size):
            picks = rng.integers(0, pool.num_rows, size=min(row_group_size, rows - start))
            writer.write_table(pool.take(picks), row_group_size=row_group_size)
    os.replace(partial, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--out", required=True, help="parquet file to write (keep it outside the repository)")
    parser.add_argument("--row_group_size", type=int, default=5000)
    parser.add_argument("--source", default=str(DEFAULT_SOURCE), help="parquet with prompt/response to sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text", action="store_true", help="one `text` column of documents (prompt + response)")
    args = parser.parse_args()
    if args.rows < 1 or args.row_group_size < 1:
        parser.error("--rows and --row_group_size must be positive")
    started = time.perf_counter()
    make_big_parquet(args.out, args.rows, args.row_group_size, args.source, args.seed, args.text)
    size_mb = os.path.getsize(args.out) / 2**20
    print(f"wrote {args.rows:,} rows to {args.out} ({size_mb:,.0f} MB) in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
