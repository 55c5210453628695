"""Trainer throughput against a bare PyTorch loop on the same tiny model and batches (CPU, fp32).

    python bench/bench_train.py [--threads 1] [--rounds 3] [--profile]

Contenders, each on the same steps (same model config and seed, same batches):
* trainer: the real run. `training.run.build_run` builds it (Accelerator through `training.runtime`,
  DataFeed, StepRunner, checkpointer, metrics, MemoryHygiene) and `training.loop.fit` drives it, with
  evaluation and saving off (eval_max_samples=0, keep_latest_n_ckp=0, save_steps beyond the run). A wrapper on
  `MemoryHygiene.after_step`, the loop's last per-step hook, time-stamps every step, so a step's time covers all
  the loop does for it: reading and tokenizing data windows, building the batch, the step itself (token-summed
  loss, gradient clipping, the rank agreement, optimizer, learning rate), the Reporter and the memory hooks.
  Timing inside the running loop, rather than from metrics.jsonl's tokens_per_s, lets the contenders alternate
  in one process and leaves start-up and the end-of-run saves out exactly.
* trainer, memory hygiene off: the same with memory_cleanup_steps=0 and memory_log_steps=0.
* bare: `model(**batch).loss.backward(); optimizer.step(); optimizer.zero_grad()` with torch's AdamW over the
  same steps' micro-batches, pre-built by the run's DataFeed before any timing.
* bare + clip: the bare loop plus `clip_grad_norm_`, which the trainer does by design (max_grad_norm=1.0), to
  tell the price of clipping from the trainer's own overhead.

Every round replays one range of steps on every contender: the trainer's TrainingState is set back to the range's
start, which restarts its data feed there as a resume does (the weights keep learning; the shapes, hence the work,
repeat). The range's first step is never timed: it opens the data and tokenizes a window (start-up). The range
spans one window's worth of steps (buffer_size / global batch) and starts mid-window, so its timed steps include
exactly one window load, as every such stretch of a long run does. Contenders alternate inside each round and each
keeps its best round (the machine is shared). With --threads N, torch and the tokenizer both use N threads.

Then the cost of memory hygiene: `release_memory()` (gc.collect + CUDA cache release, every memory_cleanup_steps)
and `memory_report()` (every memory_log_steps) timed alone in this process, amortized per step, next to the
measured difference between the trainer with and without hygiene. --profile adds a cProfile of one trainer round
and one bare round with a breakdown of the trainer's step.
"""

import argparse
import cProfile
import dataclasses
import logging
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLE_TRAIN = REPO.parent / "shared" / "data" / "sample_train_3k.parquet"
SAMPLE_VALID = REPO.parent / "shared" / "data" / "sample_valid_1k.parquet"
TINY_MODEL = dict(d_model=64, d_ff=256, num_heads=4, d_kv=16, num_layers=2, num_decoder_layers=2)
GOAL = 0.95
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch and tokenizer threads (1 or 2 here)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each contender keeps its best")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--accumulation", type=int, default=1, help="gradient_accumulation_steps")
    parser.add_argument("--max_seq_len", type=int, default=192)
    parser.add_argument("--buffer_size", type=int, default=5000, help="dataloader_buffer_size (large config's)")
    parser.add_argument("--vocab_size", type=int, default=8000)
    parser.add_argument("--steps", type=int, default=0,
                        help="timed steps per round (0: one window's worth, buffer_size / global batch)")
    parser.add_argument("--train_file", default="/tmp/bench_train_50k.parquet",
                        help="training parquet; written with make_big_parquet.py (50k rows) when absent")
    parser.add_argument("--memory_calls", type=int, default=20, help="calls of each memory function timed")
    parser.add_argument("--profile", action="store_true", help="cProfile one trainer and one bare round")
    return parser.parse_args()


import torch  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402
from make_big_parquet import make_big_parquet  # noqa: E402

from config import T5ModelConfig, TrainConfig, with_resolved_paths  # noqa: E402
from model.t5 import build_model, count_parameters  # noqa: E402
from model.tokenizer import train_tokenizer  # noqa: E402
from training.loop import fit  # noqa: E402
from training.memory import memory_report, release_memory  # noqa: E402
from training.run import build_run  # noqa: E402
from training.runtime import build_accelerator, start_processes  # noqa: E402


class StepClock:
    """Wraps the run's MemoryHygiene.after_step (called once at the end of every step) to time-stamp steps."""

    def __init__(self, memory):
        self.memory, self.stamps = memory, []
        self.inner = memory.after_step
        memory.after_step = self

    def __call__(self, step: int) -> None:
        self.inner(step)
        self.stamps.append(time.perf_counter())


def build_trainer(args, scratch: Path, tokenizer_dir: Path):
    cfg = with_resolved_paths(TrainConfig(
        train_file=args.train_file, validation_file=str(SAMPLE_VALID), tokenizer_dir=str(tokenizer_dir),
        output_dir=str(scratch / "out"), log_dir=str(scratch / "logs"), max_seq_len=args.max_seq_len,
        batch_size_per_gpu=args.batch_size, gradient_accumulation_steps=args.accumulation,
        dataloader_buffer_size=args.buffer_size, epochs=1, eval_max_samples=0, keep_latest_n_ckp=0,
        save_steps=10**9, mixed_precision="no", num_workers=0))
    model_cfg = T5ModelConfig(**TINY_MODEL)
    runtime = start_processes(cfg)[1]
    run = build_run(cfg, model_cfg, build_accelerator(cfg, runtime), runtime)
    # The loop's INFO lines still go to the log file; on the console they would bury the figures.
    for handler in logging.getLogger("trainer").handlers:
        if type(handler) is logging.StreamHandler:
            handler.setLevel(logging.WARNING)
    return run, model_cfg


def trainer_round(run, clock: StepClock, start, steps: int, hygiene: tuple) -> float:
    """Seconds per step over `steps` timed steps after `start` (a TrainingState), with (cleanup, log) steps."""
    for field in dataclasses.fields(start):
        setattr(run.state, field.name, getattr(start, field.name))
    run.memory.cleanup_steps, run.memory.log_steps = hygiene
    run.cfg.max_steps = start.global_step + 1 + steps
    clock.stamps.clear()
    fit(run)
    assert len(clock.stamps) == steps + 1, f"{len(clock.stamps)} steps ran, expected {steps + 1}"
    return (clock.stamps[-1] - clock.stamps[0]) / steps


def bare_round(model, optimizer, bundles: list, clip: bool) -> float:
    """Seconds per step of the plain loop over bundles[1:] (bundles[0] runs untimed, as the trainer's does)."""
    started = None
    for index, bundle in enumerate(bundles):
        if index == 1:
            started = time.perf_counter()
        for batch in bundle.micro_batches:
            model(**batch.as_dict()).loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    return (time.perf_counter() - started) / (len(bundles) - 1)


def time_calls(function, calls: int) -> tuple[float, float]:
    """Best and median seconds of one call."""
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times), statistics.median(times)


def cumulative(stats: pstats.Stats, path_end: str, name: str) -> tuple[float, int]:
    """Total inclusive seconds and calls of every profiled function `name` in a file ending with `path_end`."""
    seconds = calls = 0
    for (path, _, function), (_, ncalls, _, inclusive, _) in stats.stats.items():
        if function == name and path.endswith(path_end):
            seconds, calls = seconds + inclusive, calls + ncalls
    return seconds, calls


def profile(run, clock, start, steps, hygiene, bare_model, bare_optimizer, bundles) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    trainer_round(run, clock, start, steps, hygiene)
    profiler.disable()
    stats = pstats.Stats(profiler)
    loop, _ = cumulative(stats, "training/loop.py", "fit")
    print(f"\nprofile of one trainer round ({steps + 1} steps; inclusive seconds, share of fit):")
    parts = [("StepRunner.run (whole step)", "training/step.py", "run"),
             ("  forward + token loss", "training/step.py", "forward"),
             ("  accelerator.backward", "accelerate/accelerator.py", "backward"),
             ("  clip_grad_norm_", "accelerate/accelerator.py", "clip_grad_norm_"),
             ("  optimizer.step (Accelerate wrapper)", "accelerate/optimizer.py", "step"),
             ("  optimizer.zero_grad", "accelerate/optimizer.py", "zero_grad"),
             ("  accelerator.reduce", "accelerate/accelerator.py", "reduce"),
             ("  accelerator.accumulate (enter/exit)", "contextlib.py", "__enter__"),
             ("  rng_snapshot", "training/step.py", "rng_snapshot"),
             ("data: DataLoader __next__", "torch/utils/data/dataloader.py", "__next__"),
             ("  window read + tokenize", "model/dataset.py", "_window"),
             ("  step batch build", "model/dataset.py", "_build_step"),
             ("Reporter.after_step", "training/reporting.py", "after_step"),
             ("MemoryHygiene.after_step", "training/memory.py", "after_step"),
             ("  release_memory", "training/memory.py", "release_memory"),
             ("  memory_report", "training/memory.py", "memory_report"),
             ("Checkpointer.due", "training/checkpoint.py", "due"),
             ("finish (end-of-round save, untimed)", "training/loop.py", "finish")]
    for label, path_end, name in parts:
        seconds, calls = cumulative(stats, path_end, name)
        if calls:
            print(f"    {label:<42} {seconds:8.3f} s {100 * seconds / loop:6.1f} %   {calls:>6} calls")
    print("  top functions by own time:")
    stats.sort_stats("tottime").print_stats(15)

    profiler = cProfile.Profile()
    profiler.enable()
    bare_round(bare_model, bare_optimizer, bundles, clip=False)
    profiler.disable()
    print(f"profile of one bare round ({len(bundles)} steps), top functions by own time:")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


def main() -> None:
    args = parse_args()
    # The tokenizer's thread pool starts with its first parallel call and reads this then: --threads bounds
    # every compute pool of the process, torch's and the tokenizer's.
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    if not Path(args.train_file).is_file():
        make_big_parquet(args.train_file, 50_000)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as scratch:
        scratch = Path(scratch)
        tokenizer = train_tokenizer([SAMPLE_TRAIN], scratch / "tokenizer", vocab_size=args.vocab_size)
        run, model_cfg = build_trainer(args, scratch, scratch / "tokenizer")
        torch.set_num_threads(args.threads)  # in case set-up changed it
        global_batch = run.feed.global_batch_size(run.state)
        steps = args.steps or max(1, args.buffer_size // global_batch)
        first = max(1, steps // 2)  # the timed range starts mid-window
        clock = StepClock(run.memory)
        default_hygiene = (run.memory.cleanup_steps, run.memory.log_steps)

        # Before fit freezes the start-up objects, a cleanup has all of them to scan.
        unfrozen_release = time_calls(release_memory, 5)[1]
        # Warm-up, untimed: steps [0, first) through the real loop, leaving the state at the range's start.
        run.cfg.max_steps = first
        fit(run)
        start = dataclasses.replace(run.state)

        # The same steps' batches for the bare loops, from the run's own feed (a copy of the state).
        bundles = []
        for bundle in run.feed.epoch_steps(dataclasses.replace(start)):
            bundles.append(bundle)
            if len(bundles) == steps + 1:
                break
        set_seed(run.cfg.seed)
        bare_model = build_model(model_cfg, tokenizer)
        bare_optimizer = torch.optim.AdamW(bare_model.parameters(), lr=run.cfg.learn_rate,
                                           weight_decay=run.cfg.weight_decay)
        assert bare_model.training and run.model.training
        bare_round(bare_model, bare_optimizer, bundles[:first + 1], clip=False)  # the bare side's warm-up

        print(f"model {count_parameters(run.model) / 1e6:.2f}M parameters {TINY_MODEL}, vocabulary {len(tokenizer)}; "
              f"batch {args.batch_size} x accumulation {args.accumulation}, max_seq_len {args.max_seq_len}, "
              f"buffer {args.buffer_size} rows; CPU fp32, {torch.get_num_threads()} thread(s)")
        print(f"timed steps {first + 2}..{first + steps + 1} of {args.train_file} (one window load among them), "
              f"{args.rounds} interleaved rounds, best round kept; memory hygiene: cleanup every "
              f"{default_hygiene[0]} steps, report every {default_hygiene[1]}")
        contenders = {
            "trainer (fit, real pieces)": lambda: trainer_round(run, clock, start, steps, default_hygiene),
            "trainer, memory hygiene off": lambda: trainer_round(run, clock, start, steps, (0, 0)),
            "bare loop": lambda: bare_round(bare_model, bare_optimizer, bundles, clip=False),
            "bare loop + clip_grad_norm_": lambda: bare_round(bare_model, bare_optimizer, bundles, clip=True),
        }
        best = {name: float("inf") for name in contenders}
        for round_index in range(args.rounds):
            for name, contender in contenders.items():
                best[name] = min(best[name], contender())
            rates = ", ".join(f"{1 / seconds:.2f}" for seconds in best.values())
            print(f"  round {round_index + 1}: {rates} steps/s (best so far, in the order of the table)")

        bare = best["bare loop"]
        print(f"\n{'contender':<38} {'steps/s':>8} {'ms/step':>8} {'vs bare':>8} {'vs bare+clip':>13}")
        for name, seconds in best.items():
            print(f"{name:<38} {1 / seconds:8.2f} {1000 * seconds:8.2f} {bare / seconds:8.3f} "
                  f"{best['bare loop + clip_grad_norm_'] / seconds:13.3f}")
        ratio = bare / best["trainer (fit, real pieces)"]
        print(f"trainer/bare = {ratio:.3f} (goal >= {GOAL}: {'met' if ratio >= GOAL else 'NOT met'})")

        release_best, release_median = time_calls(release_memory, args.memory_calls)
        report_best, report_median = time_calls(memory_report, args.memory_calls)
        cleanup_steps, log_steps = default_hygiene
        amortized = release_median / cleanup_steps + report_median / log_steps
        trainer_step = best["trainer (fit, real pieces)"]
        measured = trainer_step / best["trainer, memory hygiene off"] - 1
        print(f"\nmemory hygiene ({args.memory_calls} calls each, in this process):")
        print(f"    release_memory() (gc.collect{' + empty_cache' if torch.cuda.is_available() else ''}): "
              f"best {1000 * release_best:.2f} ms, median {1000 * release_median:.2f} ms (start-up objects frozen, "
              f"as fit runs it); {1000 * unfrozen_release:.1f} ms before fit froze them")
        print(f"    memory_report(): best {1000 * report_best:.2f} ms, median {1000 * report_median:.2f} ms")
        print(f"    amortized (median/{cleanup_steps} + median/{log_steps}): {1000 * amortized:.2f} ms per step = "
              f"{100 * amortized / trainer_step:.2f} % of a trainer step")
        print(f"    measured: trainer with hygiene / without = {1 + measured:.3f} steps-time ratio "
              f"({100 * measured:+.2f} %, within round-to-round noise when small)")

        if args.profile:
            profile(run, clock, start, steps, default_hygiene, bare_model, bare_optimizer, bundles)
        run.signals.restore()
        run.accelerator.end_training()


if __name__ == "__main__":
    main()
