"""Does the training loop wait for data? Time blocked in the data feed against a simulated GPU step, on the 12 GB box.

    python bench/bench_feed.py                        # 3 ranks' rank 0, 0.3 s steps, 150 steps, ~2 min
    python bench/bench_feed.py --steps 20 --rows 4000 --step_seconds 0.05    # a smoke run

The target box (3 GPUs, 12 GB of host RAM) runs with `auto`'s low-memory settings: no DataLoader workers and
ultra_low_mem, so every rank reads and tokenizes each window itself. This drives the trainer's own `DataFeed` with
those settings and the guide's batch settings as rank 0 of `--world_size` ranks, "trains" each step by sleeping
`--step_seconds` (what a GPU step costs the host thread: it waits for the device), and measures how long each
`next(step)` blocks. It does so twice in one run: as the trainer does it (a thread reads and tokenizes the windows
ahead, another builds the steps ahead) and with both inline, as before, and prints both shares of the step time and
their ratio.

The rows are distinct Chinese texts (random common characters), so the tokenizer's word cache never helps: the
slowest case for tokenizing.
"""
import argparse
import sys
import tempfile
import time
from concurrent.futures import Future
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pyarrow.parquet as pq  # noqa: E402
from bench_long_run import distinct_rows  # noqa: E402

import data_pipeline.windows as windows_module  # noqa: E402
import training.feed as feed_module  # noqa: E402
from config import TrainConfigPretrainLarge  # noqa: E402
from model.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402
from training.feed import DataFeed  # noqa: E402
from training.runtime import Runtime  # noqa: E402
from training.state import TrainingState  # noqa: E402


class InlineExecutor:
    """A stand-in for the reader thread that does the work when it is asked for: the feed as it was before."""

    def __init__(self, *args, **kwargs):
        pass

    def submit(self, function, *args):
        future = Future()
        future.set_result(function(*args))
        return future

    def shutdown(self, *args, **kwargs):
        pass


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=40_000, help="distinct rows in the training file")
    parser.add_argument("--steps", type=int, default=150, help="steps timed in each arm")
    parser.add_argument("--step_seconds", type=float, default=0.3, help="the simulated GPU step")
    parser.add_argument("--world_size", type=int, default=3)
    parser.add_argument("--vocab_size", type=int, default=8000)
    return parser.parse_args()


def blocked_share(cfg, tokenizer, steps: int, step_seconds: float, world_size: int) -> tuple[float, float, int]:
    """(share of the step time spent waiting in the feed, the longest wait in seconds, windows read)."""
    runtime = Runtime(mixed_precision="no", ultra_low_mem=True, num_workers=0, pin_memory=False, total_ram_gb=12.0,
                      notes=[])
    feed = DataFeed(cfg, tokenizer, runtime, rank=0, world_size=world_size)
    state = TrainingState(batch_size_per_gpu=cfg.batch_size_per_gpu,
                          gradient_accumulation_steps=cfg.gradient_accumulation_steps, world_size=world_size)
    waits = []
    feed_steps = feed.epoch_steps(state)
    for _ in range(steps):
        started = time.perf_counter()
        step = next(feed_steps, None)
        waits.append(time.perf_counter() - started)
        if step is None:
            raise SystemExit(f"the epoch ended after {len(waits) - 1} steps: give more --rows")
        time.sleep(step_seconds)
    feed_steps.close()
    windows = -(-steps * feed.global_batch_size(state) // cfg.dataloader_buffer_size)
    # The first step always waits for the first window: a run pays it once, at its start.
    return sum(waits[1:]) / ((steps - 1) * step_seconds), max(waits[1:]), windows


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_feed_") as scratch:
        train_file = Path(scratch) / "train.parquet"
        pq.write_table(distinct_rows(args.rows, seed=0), train_file, row_group_size=5000)
        train_tokenizer([str(train_file)], Path(scratch) / "tokenizer", vocab_size=args.vocab_size, max_rows=5000)
        tokenizer = load_tokenizer(Path(scratch) / "tokenizer")
        cfg = TrainConfigPretrainLarge(train_file=str(train_file))
        print(f"rank 0 of {args.world_size}, batch {cfg.batch_size_per_gpu} x {cfg.gradient_accumulation_steps} "
              f"accumulation per rank, windows of {cfg.dataloader_buffer_size} rows, max_seq_len "
              f"{cfg.max_seq_len}, simulated step {args.step_seconds} s, {args.steps} steps per arm", flush=True)
        threaded = blocked_share(cfg, tokenizer, args.steps, args.step_seconds, args.world_size)
        with mock.patch.object(windows_module, "ThreadPoolExecutor", InlineExecutor), \
                mock.patch.object(feed_module, "ahead_in_a_thread", iter):
            inline = blocked_share(cfg, tokenizer, args.steps, args.step_seconds, args.world_size)
    print(f"\n  {'data preparation':<28}{'blocked / step time':>20}{'longest wait':>14}{'windows':>9}")
    for name, (share, longest, windows) in (("threads (the trainer)", threaded), ("inline (before)", inline)):
        print(f"  {name:<28}{share:>19.2%}{longest:>13.3f}s{windows:>9}")
    print(f"  inline / threads = {inline[0] / max(threaded[0], 1e-9):.1f}x the waiting")


if __name__ == "__main__":
    main()
