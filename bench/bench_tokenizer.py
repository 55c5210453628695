"""Benchmark: wall time and peak memory of `train_tokenizer` on an N-row parquet.

    python bench/bench_tokenizer.py --rows 3000
    python bench/bench_tokenizer.py --rows 1000000 --distinct
    python bench/bench_tokenizer.py --file data/pretrain_train_10m.parquet --vocab_size 32000

The rows are drawn (seeded, with replacement) from a real file. Plain sampling repeats the same few thousand
texts, which flatters BPE training: its cost grows with the number of *distinct* pre-tokenized words.
`--distinct` instead glues random fragments of different rows together, so almost every row is new text.
Training runs in a fresh subprocess, so the peak RSS reported is the training's own, not the generator's.
"""

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # run as a script from anywhere: `model` lives at the repository root

DEFAULT_SOURCE = REPO_ROOT.parent / "shared" / "data" / "sample_train_3k.parquet"
ROWS_PER_GROUP = 50_000


def _fragment(rng: random.Random, text: str) -> str:
    start = rng.randrange(len(text))
    return text[start : start + rng.randint(8, 120)]


def _distinct_text(rng: random.Random, texts: list[str], pieces: int) -> str:
    return "".join(_fragment(rng, rng.choice(texts)) for _ in range(pieces))


def write_benchmark_parquet(source: Path, out_path: Path, rows: int, distinct: bool, seed: int) -> None:
    """Writes `rows` rows drawn from `source`, one row group at a time so memory stays flat."""
    table = pq.read_table(source, columns=["prompt", "response"])
    prompts = [text for text in table.column("prompt").to_pylist() if text]
    responses = [text for text in table.column("response").to_pylist() if text]
    rng = random.Random(seed)
    with pq.ParquetWriter(out_path, pa.schema([("prompt", pa.string()), ("response", pa.string())])) as writer:
        for group_start in range(0, rows, ROWS_PER_GROUP):
            group_rows = min(ROWS_PER_GROUP, rows - group_start)
            if distinct:
                group_prompts = [_distinct_text(rng, prompts, 1) for _ in range(group_rows)]
                group_responses = [_distinct_text(rng, responses, 3) for _ in range(group_rows)]
            else:
                picks = [rng.randrange(min(len(prompts), len(responses))) for _ in range(group_rows)]
                group_prompts = [prompts[pick] for pick in picks]
                group_responses = [responses[pick] for pick in picks]
            writer.write_table(pa.table({"prompt": group_prompts, "response": group_responses}))


def train_and_measure(parquet: Path, out_dir: Path, vocab_size: int, max_rows: int | None) -> dict:
    """Runs in the child process: trains, then reports time and memory as a dict."""
    import psutil

    from model.tokenizer import DEFAULT_MAX_ROWS, train_tokenizer

    cap = DEFAULT_MAX_ROWS if max_rows is None else (max_rows or None)
    rss_before_mb = psutil.Process().memory_info().rss / 2**20
    started = time.perf_counter()
    tokenizer = train_tokenizer(parquet, out_dir, vocab_size=vocab_size, max_rows=cap)
    return {
        "max_rows": cap,
        "train_seconds": round(time.perf_counter() - started, 2),
        # ru_maxrss is in KiB on Linux.
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_after_imports_mb": round(rss_before_mb, 1),
        "vocab": len(tokenizer),
    }


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows in the generated parquet")
    parser.add_argument("--vocab_size", type=int, default=8000)
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="parquet to draw the rows from")
    parser.add_argument("--file", type=Path, help="train on this parquet as it is instead of generating one")
    parser.add_argument("--distinct", action="store_true", help="glue fragments of different rows together")
    parser.add_argument(
        "--max_rows", type=int, default=None, help="passed to train_tokenizer; 0 means all rows (default: its own)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", nargs=2, metavar=("PARQUET", "OUT_DIR"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _prepare_parquet(args: argparse.Namespace, work_dir: Path) -> Path:
    """The parquet to train on: `--file` as it is, or `--rows` rows generated from `--source`."""
    if args.file:
        if not args.file.is_file():
            sys.exit(f"error: --file {args.file}: no such file")
        return args.file
    if not args.source.is_file():
        sys.exit(f"error: --source {args.source}: no such file")
    parquet = work_dir / "bench.parquet"
    write_benchmark_parquet(args.source, parquet, args.rows, args.distinct, args.seed)
    return parquet


def _train_in_fresh_process(parquet: Path, out_dir: Path, vocab_size: int, max_rows: int | None) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(parquet), str(out_dir)]
    command += ["--vocab_size", str(vocab_size)] + ([] if max_rows is None else ["--max_rows", str(max_rows)])
    child = subprocess.run(command, capture_output=True, text=True)
    if child.returncode != 0:
        sys.exit(f"error: training subprocess failed:\n{child.stderr}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
    args = _parse_args(argv)
    if args.child:
        parquet, out_dir = map(Path, args.child)
        print(json.dumps(train_and_measure(parquet, out_dir, args.vocab_size, args.max_rows)))
        return

    with tempfile.TemporaryDirectory(prefix="bench_tokenizer_") as work_dir:
        started = time.perf_counter()
        parquet = _prepare_parquet(args, Path(work_dir))
        prepare_seconds = time.perf_counter() - started
        figures = _train_in_fresh_process(parquet, Path(work_dir) / "tokenizer", args.vocab_size, args.max_rows)
        figures.update(
            source=str(args.file or args.source),
            rows=pq.ParquetFile(parquet).metadata.num_rows,
            distinct=args.distinct and not args.file,
            parquet_mb=round(parquet.stat().st_size / 2**20, 1),
            generate_seconds=round(prepare_seconds, 1),
        )
        print(json.dumps(figures))


if __name__ == "__main__":
    main(sys.argv[1:])
