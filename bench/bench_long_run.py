"""Host memory over a long run: RSS and USS per epoch must stay flat however many epochs a run lasts.

    python bench/bench_long_run.py                                   # 40 epochs x 500 steps, tiny model, ~6 min
    python bench/bench_long_run.py --epochs 20 --rows 1000 --batch_size 10 --max_slope 0.5   # the suite's version

It runs the real `train` command on rows of distinct Chinese text (random common characters: every text is new to
the tokenizer, which is what made memory grow before, ~16 MB per epoch of distinct rows), with evaluation, best-k
and state saves on as in a real run, and reads the `memory` lines the run writes every `--memory_every` steps
(this process's RSS and USS, and its DataLoader workers' USS). It fits a line through the figures after the first
`--settle` epochs and prints the slope in MB per epoch; with `--max_slope` it exits 1 when a slope is above it.
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
TINY_MODEL = dict(d_model=32, d_ff=64, num_heads=2, d_kv=16, num_layers=1, num_decoder_layers=1)
COMMON_CHARACTERS = [chr(code) for code in range(0x4E00, 0x4E00 + 3000)]
FIGURES = ("rss_mb", "uss_mb", "workers_uss_mb")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4000, help="distinct training rows")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--memory_every", type=int, default=500, help="steps between memory lines")
    parser.add_argument("--settle", type=int, default=5, help="epochs left out before the slope is fitted")
    parser.add_argument("--max_slope", type=float, default=0.0, help="MB per epoch; 0: report only")
    parser.add_argument("--num_workers", type=int, default=0)
    return parser.parse_args()


def distinct_rows(count: int, seed: int, prompt_chars=(8, 30), response_chars=(20, 60)) -> pa.Table:
    """Rows of random common characters, of lengths drawn from the given ranges."""
    rng = random.Random(seed)
    text = lambda low, high: "".join(rng.choices(COMMON_CHARACTERS, k=rng.randint(low, high)))  # noqa: E731
    return pa.table({"prompt": [text(*prompt_chars) + "？" for _ in range(count)],
                     "response": [text(*response_chars) + "。" for _ in range(count)]})


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (x, y) points."""
    n = len(points)
    mean_x, mean_y = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread if spread else 0.0


def main() -> None:
    args = parse_args()
    steps_per_epoch = -(-args.rows // args.batch_size)
    with tempfile.TemporaryDirectory(prefix="bench_long_run_") as scratch:
        train, valid = os.path.join(scratch, "train.parquet"), os.path.join(scratch, "valid.parquet")
        pq.write_table(distinct_rows(args.rows, seed=1), train, row_group_size=500)
        pq.write_table(distinct_rows(64, seed=2), valid)
        flags = dict(train_file=train, validation_file=valid, tokenizer_dir=os.path.join(scratch, "tokenizer"),
                     vocab_size=1000, output_dir=os.path.join(scratch, "out"), log_dir=os.path.join(scratch, "logs"),
                     max_seq_len=32, batch_size_per_gpu=args.batch_size, gradient_accumulation_steps=1,
                     dataloader_buffer_size=1000, epochs=args.epochs, save_steps=max(1, 4 * steps_per_epoch),
                     eval_max_samples=32, eval_batch_size=32, keep_latest_n_ckp=2, logging_steps=args.memory_every,
                     memory_log_steps=args.memory_every, mixed_precision="no", num_workers=args.num_workers,
                     **TINY_MODEL)
        command = [sys.executable, str(REPO / "train_low_mem.py"), "train"] + [f"--{k}={v}" for k, v in flags.items()]
        env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        print(f"{args.epochs} epochs x {steps_per_epoch} steps of {args.rows} distinct rows, tiny model, evaluation "
              f"and saves on; memory every {args.memory_every} steps", flush=True)
        finished = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        if finished.returncode:
            raise SystemExit(f"train failed:\n{finished.stderr[-3000:]}")
        with open(os.path.join(flags["output_dir"], "metrics.jsonl"), encoding="utf-8") as lines:
            memory = [record for record in map(json.loads, lines) if record["event"] == "memory"]
    print(f"\n{'step':>7} {'epoch':>6}" + "".join(f"{name:>16}" for name in FIGURES))
    for record in memory:
        print(f"{record['step']:>7} {record['step'] / steps_per_epoch:6.1f}"
              + "".join(f"{record[name]:16.1f}" for name in FIGURES))
    settled = [record for record in memory if record["step"] / steps_per_epoch >= args.settle]
    slopes = {name: slope([(r["step"] / steps_per_epoch, r[name]) for r in settled]) for name in FIGURES}
    print(f"\nslope after epoch {args.settle} ({len(settled)} points), MB per epoch: "
          + ", ".join(f"{name} {value:+.3f}" for name, value in slopes.items()))
    if args.max_slope and any(value > args.max_slope for value in slopes.values()):
        raise SystemExit(f"memory grows faster than {args.max_slope} MB per epoch")


if __name__ == "__main__":
    main()
