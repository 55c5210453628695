"""The one-GPU check: what the tool decides, how fast and how big a large-config step is, and whether a real run
trains, evaluates, saves, resumes and survives running out of memory, on one H100/H200-class GPU in a few minutes.

    bash bench/gpu_check.sh                 # on the GPU machine: ≤ 6 minutes, prints one table, writes JSON
    bash bench/gpu_check.sh --smoke         # anywhere (the suite runs it on CPU): tiny sizes, NOT GPU figures

1. versions and the runtime decisions `auto` makes for the large config (precision, workers, attention kernel);
2. one optimizer step of the large config (`T5ModelConfig()` defaults, batch 32 of 192 + 192 tokens) under a
   19 GiB cap, eager and `--compile=True`: attention kernels the profiler saw, peak allocated/reserved, samples/s,
   tokens/s, MFU (the encoder-decoder's matmul work over the card's dense bf16 peak) and compile time;
3. `train --use_large_config=True` on the shared sample rows for 30 steps with evaluation, best-k and a state
   save, then `--is_keep_training=True` to 45 steps (through `bench/capped_cli.py`, capped at 19 GiB);
4. the same run capped at 8 GiB, where batch 32 must run out of memory and the trainer must halve it and go on.
"""
import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from gpu_bench import (GIB, cap_memory, kernels_of_one_step, large_config_step, make_bundle,  # noqa: E402
                       peak_tflops, run_steps, synchronize)

SHARED = REPO.parent / "shared" / "data"
SMOKE_MODEL = dict(d_model=32, d_ff=64, num_heads=2, d_kv=16, num_layers=1, num_decoder_layers=1)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on any machine: checks the script only")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for gpu_check.json")
    parser.add_argument("--cap_gib", type=float, default=19.0)
    parser.add_argument("--oom_cap_gib", type=float, default=8.0)
    parser.add_argument("--steps", type=int, default=30, help="first run's steps; the resume goes 50%% further")
    return parser.parse_args()


def versions() -> dict:
    import accelerate
    import transformers

    from config import TrainConfigPretrainLarge
    from training.runtime import decide

    decided = decide(TrainConfigPretrainLarge())
    cuda = torch.cuda.is_available()
    return {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__,
            "device": torch.cuda.get_device_name() if cuda else "CPU",
            "device_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / GIB, 1) if cuda else None,
            "auto": {"mixed_precision": decided.mixed_precision, "num_workers": decided.num_workers,
                     "pin_memory": decided.pin_memory, "ultra_low_mem": decided.ultra_low_mem,
                     "notes": decided.notes}}


def one_step(compile: bool, smoke: bool, cap_gib: float) -> dict:
    """One large-config optimizer step, timed after warm-up, in this process (capped)."""
    from config import T5ModelConfig

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()  # the eager measurement's blocks must not count against the compiled one
    cap_memory(cap_gib)
    sizes = argparse.Namespace(vocab_size=1000 if smoke else 32000, prompt_len=32 if smoke else 192,
                               response_len=32 if smoke else 192)
    batch = 4 if smoke else 32
    with tempfile.TemporaryDirectory(prefix="gpu_check_step_") as scratch:
        model_cfg = T5ModelConfig(**SMOKE_MODEL) if smoke else T5ModelConfig()
        bench = large_config_step(model_cfg, sizes.vocab_size, scratch, compile=compile)
        stepper, accelerator = bench.stepper, bench.accelerator
        encoder, decoder, embedding = bench.encoder, bench.decoder, bench.embedding
        bundle = make_bundle(sizes, batch, cuda)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        first = run_steps(stepper, bundle, 1)  # compiles, when compiling
        first_seconds = time.perf_counter() - started
        run_steps(stepper, bundle, 2)
        seconds = run_steps(stepper, bundle, 2 if smoke else 10) if first is not None else None
        result = {"compile": compile, "batch": batch, "tokens_per_row": sizes.prompt_len + sizes.response_len,
                  "parameters_m": round(bench.parameters / 1e6, 1), "first_step_s": round(first_seconds, 2),
                  "out_of_memory": seconds is None}
        if seconds is not None:
            samples = batch / seconds
            flops = 6 * (encoder * sizes.prompt_len + (decoder + embedding) * sizes.response_len) * samples
            peak = peak_tflops(torch.cuda.get_device_name()) if cuda else None
            result.update(step_s=round(seconds, 4), samples_per_s=round(samples, 1),
                          tokens_per_s=round(samples * result["tokens_per_row"]),
                          mfu=round(flops / (peak * 1e12), 3) if peak else None,
                          kernels=kernels_of_one_step(stepper, bundle))
        if cuda:
            synchronize()
            result.update(peak_allocated_gib=round(torch.cuda.max_memory_allocated() / GIB, 2),
                          peak_reserved_gib=round(torch.cuda.max_memory_reserved() / GIB, 2))
        accelerator.end_training()
        return result


def cli(cap_gib: float, flags: dict, timeout: int) -> tuple[subprocess.CompletedProcess, float]:
    command = [sys.executable, str(BENCH / "capped_cli.py"), str(cap_gib), "train",
               *[f"--{name}={value}" for name, value in flags.items()]]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    return result, time.perf_counter() - started


def records(output_dir: str, event: str) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["event"] == event]


def end_to_end(args, scratch: str) -> dict:
    """30 steps with evaluation, best-k and a save, then a resume to 45 steps; then the out-of-memory run."""
    tokenizer_dir = os.path.join(scratch, "tokenizer")
    flags = dict(use_large_config=True, train_file=SHARED / "sample_train_3k.parquet",
                 validation_file=SHARED / "sample_valid_1k.parquet", tokenizer_dir=tokenizer_dir,
                 output_dir=os.path.join(scratch, "run"), log_dir=os.path.join(scratch, "logs"),
                 max_steps=args.steps, save_steps=args.steps // 2, logging_steps=1, eval_max_samples=64,
                 keep_latest_n_ckp=2, warmup_steps=10)
    if args.smoke:
        flags.update(SMOKE_MODEL, vocab_size=1000, max_seq_len=32, batch_size_per_gpu=4, mixed_precision="no",
                     eval_max_samples=8)
    timeout = 120 if args.smoke else 240
    first, first_s = cli(args.cap_gib, flags, timeout)
    resumed_to = args.steps * 3 // 2
    second, second_s = cli(args.cap_gib, dict(flags, is_keep_training=True, max_steps=resumed_to), timeout)
    train = records(flags["output_dir"], "train")
    evals = records(flags["output_dir"], "eval")
    best = sorted(p.name for p in (Path(flags["output_dir"]) / "best").glob("step-*"))
    result = {"train_exit": first.returncode, "train_s": round(first_s, 1), "resume_exit": second.returncode,
              "resume_s": round(second_s, 1), "steps_logged": [r["step"] for r in train][-1:],
              "resumed_from_step": args.steps if f"step {args.steps}" in second.stdout + second.stderr else None,
              "loss_first_last": [round(train[0]["loss"], 3), round(train[-1]["loss"], 3)] if train else None,
              "evaluations": [(r["step"], round(r["eval_loss"], 3)) for r in evals], "best_models": best,
              "samples_per_s": train[-1]["samples_per_s"] if train else None}
    for run, name in ((first, "train"), (second, "resume")):
        if run.returncode != 0:
            result[f"{name}_error"] = (run.stderr or run.stdout)[-1500:]
    if args.smoke:
        result["out_of_memory_run"] = "not run: a CPU has no allocator cap to run out of"
        return result
    oom_flags = dict(flags, output_dir=os.path.join(scratch, "oom"), max_steps=5, save_steps=1000,
                     eval_max_samples=0)
    oom, oom_s = cli(args.oom_cap_gib, oom_flags, 240)
    halvings = re.findall(r"retrying with batch_size_per_gpu=(\d+)", oom.stdout + oom.stderr)
    result["out_of_memory_run"] = {"cap_gib": args.oom_cap_gib, "exit": oom.returncode, "seconds": round(oom_s, 1),
                                   "batch_sizes_after_halving": [int(b) for b in halvings],
                                   "steps_logged": [r["step"] for r in records(oom_flags["output_dir"], "train")]}
    if oom.returncode != 0:
        result["out_of_memory_run"]["error"] = (oom.stderr or oom.stdout)[-1500:]
    return result


def table(report: dict) -> str:
    if any("error" in report[name] for name in ("versions", "end_to_end") if isinstance(report[name], dict)) or \
            isinstance(report["step"], dict):
        return json.dumps(report, indent=1, ensure_ascii=False, default=str)
    v = report["versions"]
    lines = [f"gpu_check {v['date']}: {v['device']} ({v['device_memory_gib']} GiB), torch {v['torch']} "
             f"(CUDA {v['cuda']}), transformers {v['transformers']}, accelerate {v['accelerate']}",
             f"auto for the large config: {json.dumps(v['auto'], ensure_ascii=False)}", ""]
    eager, compiled = report["step"]
    title = f"step, batch {eager['batch']} x {eager['tokens_per_row']} tokens"
    lines.append(f"{title:<30}{'eager':>16}{'compile':>16}")
    for key in ("first_step_s", "step_s", "samples_per_s", "tokens_per_s", "mfu", "peak_allocated_gib",
                "peak_reserved_gib", "out_of_memory"):
        lines.append(f"  {key:<28}{str(eager.get(key, 'n/a')):>16}{str(compiled.get(key, 'n/a')):>16}")
    lines.append(f"  attention kernels (eager): {', '.join(eager.get('kernels', [])) or 'n/a'}")
    lines.append(f"  attention kernels (compile): {', '.join(compiled.get('kernels', [])) or 'n/a'}")
    lines.append("")
    for key, value in report["end_to_end"].items():
        lines.append(f"  {key:<28}{json.dumps(value, ensure_ascii=False)[:300]}")
    return "\n".join(lines)


def section(report: dict, name: str, path: Path, work) -> None:
    """One part of the report, written to disk as soon as it is known: a GPU session is short, and a part that
    fails (or the time limit) must not take the others' figures with it."""
    started = time.perf_counter()
    try:
        report[name] = work()
    except Exception as error:  # noqa: BLE001 - recorded in the report, and the next part still runs
        report[name] = {"error": f"{type(error).__name__}: {error}"[-1500:]}
    report.setdefault("seconds", {})[name] = round(time.perf_counter() - started, 1)
    path.write_text(json.dumps(report, indent=1, ensure_ascii=False, default=str))
    print(f"[{name}: {report['seconds'][name]} s]", flush=True)


def main() -> None:
    args = parse_args()
    if not (SHARED / "sample_train_3k.parquet").is_file():
        raise SystemExit(f"needs the shared sample rows: {SHARED} is missing")
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --smoke for the CPU smoke version")
    if args.smoke:
        print("SMOKE RUN (tiny sizes): these are NOT GPU figures.\n", flush=True)
    from training.runtime import set_cuda_defaults

    set_cuda_defaults()  # before anything starts CUDA, as the trainer does
    os.makedirs(args.out, exist_ok=True)
    path = Path(args.out) / "gpu_check.json"
    report = {"smoke": args.smoke}
    section(report, "versions", path, versions)
    section(report, "step", path, lambda: [one_step(compile, args.smoke, args.cap_gib) for compile in (False, True)])
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
        section(report, "end_to_end", path, lambda: end_to_end(args, scratch))
    print(table(report))
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
