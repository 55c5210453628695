"""Peak memory of each training process on a 10M-row and a 1M-row parquet, and `plan` on the 10M file (CPU).

    python bench/bench_scale.py [--big /tmp/big_10m.parquet] [--small /tmp/big_1m.parquet] [--steps 300]
    python bench/bench_scale.py --objective span_corruption      # raw text: one `text` column of documents

With --objective span_corruption the files hold generated documents (make_big_parquet.py --text), the tokenizer
is trained with --text_column=text (sentinels), and each run first counts the tokens of every document of its
file (timed, in the same process: its peak includes the count).

1. Files: make_big_parquet.py writes the 10M-row and the 1M-row file (5,000-row groups) unless they exist with
   that many rows.
2. A tokenizer, once: `train_low_mem.py train_tokenizer --train_file=<10M> --vocab_size=8000` (it samples 40k
   rows), kept in --tokenizer_dir for the next runs.
3. `train_low_mem.py plan --num_samples=10000000` and `plan --train_file=<10M> --json --probe=False`, printed
   as they come (skipped, and said so, while the plan command does not exist yet).
4. For each file, a short run of the real CLI under torchrun, with gloo on CPU:
       ACCELERATE_USE_CPU=true python -m torch.distributed.run --nproc_per_node 2 train_low_mem.py train
           --use_large_config=True --batch_size_per_gpu=16 --gradient_accumulation_steps=1 --max_steps=300
           --ultra_low_mem=True --num_workers=0 --eval_max_samples=0 --keep_latest_n_ckp=0 (tiny model) ...
   one thread per process. The large config keeps its 5,000-row data window and 192-token sequences.

Peak RSS, exactly: every measured command runs under a wrapper (this script with --rss_wrapper, standard library
only) that starts it as a child, waits for it with os.wait4 and keeps the kernel's ru_maxrss of that child: the
high-water mark of its resident memory over its whole life, nothing sampled, nothing missed at exit. Under
torchrun the wrapper is what torchrun starts for each rank, and the rank's own `python train_low_mem.py train`
is its child with the same environment. Linux counts into ru_maxrss the memory of the parent at fork; the
wrapper's (printed) is a few MB, far below any figure here. Goal: at most 1.5 GB per process, and the 10M-row
file within about 10% of the 1M-row file.
"""

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENTRY = REPO / "train_low_mem.py"
TINY_MODEL = dict(d_model=32, d_ff=64, num_heads=2, d_kv=16, num_layers=1, num_decoder_layers=1)
GOAL_MB, FLAT_TOLERANCE = 1536, 0.10


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objective", choices=("seq2seq", "span_corruption"), default="seq2seq")
    parser.add_argument("--big", help="10M-row parquet, written when absent (default /tmp/big_10m.parquet, "
                                      "/tmp/big_text_10m.parquet for span_corruption)")
    parser.add_argument("--small", help="1M-row parquet, written when absent (defaults alike)")
    parser.add_argument("--big_rows", type=int, default=10_000_000)
    parser.add_argument("--small_rows", type=int, default=1_000_000)
    parser.add_argument("--tokenizer_dir", help="tokenizer directory; trained (vocab 8000, on --big) when it holds "
                                                "none (default /tmp/bench_scale_tokenizer_8000, _text_8000 alike)")
    parser.add_argument("--nproc", type=int, default=2, help="training processes (torchrun ranks)")
    parser.add_argument("--steps", type=int, default=300, help="--max_steps of each training run")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed to each command")
    parser.add_argument("--rss_wrapper", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("command", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if bool(args.rss_wrapper) != bool(args.command):
        parser.error("--rss_wrapper DIR and a command go together (internal use)")
    text = "_text" if args.objective == "span_corruption" else ""
    args.big = args.big or f"/tmp/big{text}_10m.parquet"
    args.small = args.small or f"/tmp/big{text}_1m.parquet"
    args.tokenizer_dir = args.tokenizer_dir or f"/tmp/bench_scale_tokenizer{text}_8000"
    return args


def high_water_mb() -> float:
    """Peak RSS of this process (VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status: this benchmark needs Linux")


def rss_wrapper(out_dir: str, command: list) -> int:
    """Run `python COMMAND...`, record its exact peak RSS in OUT_DIR, exit as it did."""
    child = subprocess.Popen([sys.executable] + command, cwd=REPO)
    # torchrun stops its workers with SIGTERM: pass it on, so the real process saves and exits as it would. A
    # Ctrl-C reaches the child directly (same process group); forwarding it too would count as a second one.
    signal.signal(signal.SIGTERM, lambda number, _frame: child.send_signal(number))
    signal.signal(signal.SIGINT, lambda number, _frame: None)
    _, status, usage = os.wait4(child.pid, 0)  # retried by Python when a forwarded signal interrupts it
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
    record = {"rank": int(os.environ.get("RANK", 0)), "pid": child.pid, "returncode": child.returncode,
              "peak_rss_mb": usage.ru_maxrss / 1024, "wrapper_peak_rss_mb": high_water_mb()}
    Path(out_dir, f"rss-{record['rank']}-{child.pid}.json").write_text(json.dumps(record))
    return child.returncode


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def child_env() -> dict:
    """One compute thread per process: the ranks share this machine's cores."""
    return dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                RAYON_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))


def measured(command: list, nproc: int, scratch: Path, timeout: int) -> dict:
    """Run `train_low_mem.py ...` (under torchrun when nproc > 1), each process under the RSS wrapper."""
    records_dir = Path(tempfile.mkdtemp(prefix="rss-", dir=scratch))
    wrapper = [str(Path(__file__).resolve()), "--rss_wrapper", str(records_dir), str(ENTRY)] + command
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                    "--master_port", str(free_port())] + wrapper
    else:
        launcher = [sys.executable] + wrapper
    started = time.perf_counter()
    result = subprocess.run(launcher, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=timeout)
    records = sorted((json.loads(p.read_text()) for p in records_dir.glob("rss-*.json")), key=lambda r: r["rank"])
    return {"returncode": result.returncode, "seconds": time.perf_counter() - started, "stdout": result.stdout,
            "stderr": result.stderr, "processes": records}


def footer_rows(path: str) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows if Path(path).is_file() else -1


def ensure_file(path: str, rows: int, text: bool) -> None:
    from make_big_parquet import make_big_parquet

    if footer_rows(path) == rows:
        print(f"reusing {path} ({rows:,} rows)")
        return
    started = time.perf_counter()
    make_big_parquet(path, rows, text=text)
    print(f"wrote {path} ({rows:,} rows) in {time.perf_counter() - started:.0f} s")


def describe_failure(what: str, result: dict) -> str:
    tail = (result["stderr"].strip() or result["stdout"].strip()).splitlines()[-5:]
    return f"{what}: exit {result['returncode']}\n    " + "\n    ".join(tail)


def ensure_tokenizer(args, scratch: Path) -> None:
    if (Path(args.tokenizer_dir) / "tokenizer.json").is_file():
        print(f"reusing the tokenizer in {args.tokenizer_dir}")
        return
    text = ["--text_column=text"] if args.objective == "span_corruption" else []
    result = measured(["train_tokenizer", f"--train_file={args.big}", f"--tokenizer_dir={args.tokenizer_dir}",
                       "--vocab_size=8000"] + text, 1, scratch, args.timeout)
    if result["returncode"]:
        sys.exit(describe_failure("train_tokenizer", result))
    print(f"train_tokenizer on {args.big}: {result['seconds']:.0f} s, peak RSS "
          f"{result['processes'][0]['peak_rss_mb']:.0f} MB")


def plans(args, scratch: Path) -> None:
    settings = [f"--objective={args.objective}", f"--tokenizer_dir={args.tokenizer_dir}"]
    # (Packed text has no --num_samples plan: its chunks depend on the documents' tokens.)
    by_rows = [["plan", f"--num_samples={args.big_rows}"] + settings] if args.objective == "seq2seq" else []
    for command in by_rows + [["plan", f"--train_file={args.big}", "--json", "--probe=False"] + settings]:
        result = measured(command, 1, scratch, args.timeout)
        peak = result["processes"][0]["peak_rss_mb"] if result["processes"] else float("nan")
        print(f"\n$ python train_low_mem.py {' '.join(command)}   ({result['seconds']:.1f} s, peak RSS {peak:.0f} MB, "
              f"exit {result['returncode']})")
        print((result["stdout"] + result["stderr"]).rstrip())


def training_flags(args, data: str, scratch: Path) -> tuple[list, Path]:
    out = Path(tempfile.mkdtemp(prefix="run-", dir=scratch))
    flags = dict(use_large_config=True, train_file=data, tokenizer_dir=args.tokenizer_dir, output_dir=out / "out",
                 log_dir=out / "logs", batch_size_per_gpu=args.batch_size, gradient_accumulation_steps=1,
                 max_steps=args.steps, save_steps=10**6, logging_steps=max(1, args.steps // 6), eval_max_samples=0,
                 keep_latest_n_ckp=0, ultra_low_mem=True, num_workers=0, objective=args.objective, **TINY_MODEL)
    return ["train"] + [f"--{name}={value}" for name, value in flags.items()], out / "out"


def steps_per_second(output_dir: Path, global_batch: int) -> float:
    """Mean of the logged throughput after the first interval (which includes start-up's first window)."""
    path = output_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    rates = [r["samples_per_s"] for r in map(json.loads, lines) if r["event"] == "train"][1:]
    return sum(rates) / len(rates) / global_batch if rates else float("nan")


def training_runs(args, scratch: Path) -> None:
    rows = []
    for path, count in ((args.big, args.big_rows), (args.small, args.small_rows)):
        command, output_dir = training_flags(args, path, scratch)
        result = measured(command, args.nproc, scratch, args.timeout)
        if result["returncode"] or len(result["processes"]) != args.nproc:
            print(describe_failure(f"training on {path}", result))
            continue
        peaks = [p["peak_rss_mb"] for p in result["processes"]]
        counted = re.search(r"tokens counted in ([0-9.]+)s", result["stdout"])
        if counted:
            print(f"{path}: the token count before training took {float(counted.group(1)):.0f} s")
        rows.append(dict(path=path, rows=count, seconds=result["seconds"], peaks=peaks,
                         steps_s=steps_per_second(output_dir, args.batch_size * args.nproc),
                         wrapper=max(p["wrapper_peak_rss_mb"] for p in result["processes"])))
    print(f"\ntraining ({args.objective}): {args.nproc} processes (torchrun, gloo, 1 thread each), {args.steps} steps, "
          f"batch "
          f"{args.batch_size}/process, large config (window 5,000 rows, max_seq_len 192), ultra_low_mem, "
          f"model {TINY_MODEL}")
    ranks = " ".join(f"{f'rank {r} MB':>10}" for r in range(args.nproc))
    print(f"{'file':<26} {'rows':>11} {'wall s':>7} {'steps/s':>8} {ranks} {'max MB':>8}  goal <= {GOAL_MB} MB")
    for row in rows:
        peaks = " ".join(f"{peak:10.0f}" for peak in row["peaks"])
        verdict = "met" if max(row["peaks"]) <= GOAL_MB else "NOT met"
        print(f"{Path(row['path']).name:<26} {row['rows']:>11,} {row['seconds']:7.0f} {row['steps_s']:8.2f} {peaks} "
              f"{max(row['peaks']):8.0f}  {verdict}")
    if len(rows) == 2:
        ratio = max(rows[0]["peaks"]) / max(rows[1]["peaks"])
        verdict = "met" if abs(ratio - 1) <= FLAT_TOLERANCE else "NOT met"
        print(f"peak RSS {rows[0]['rows']:,} rows / {rows[1]['rows']:,} rows = {ratio:.3f} (goal: within "
              f"{FLAT_TOLERANCE:.0%}: {verdict}); wrapper's own peak, an upper bound on what fork adds: "
              f"{max(r['wrapper'] for r in rows):.0f} MB")


def main() -> None:
    args = parse_args()
    if args.rss_wrapper:
        sys.exit(rss_wrapper(args.rss_wrapper, args.command))
    sys.path.insert(0, str(REPO / "bench"))
    ensure_file(args.big, args.big_rows, args.objective == "span_corruption")
    ensure_file(args.small, args.small_rows, args.objective == "span_corruption")
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as scratch:
        scratch = Path(scratch)
        ensure_tokenizer(args, scratch)
        plans(args, scratch)
        training_runs(args, scratch)


if __name__ == "__main__":
    main()
