"""The one-GPU check: what the tool decides, how fast and how big a large-config step is, and whether a real run
trains, evaluates, saves, resumes and survives running out of memory, on one H100/H200-class GPU in a few minutes.
It uses nothing but the repository (its rows are generated): it runs on a fresh clone on an offline GPU box.

    bash bench/gpu_check.sh [--wheels DIR]           # on the GPU machine: ≤ 6 minutes, prints a table, writes JSON
    bash bench/gpu_check.sh --smoke                  # anywhere (the suite runs it on CPU): tiny sizes, NOT GPU figures
    bash bench/gpu_check.sh --only train,resume      # some parts again (they make the data they need)

Each part runs in a process of its own under its own time limit, and `gpu_check.json` is written after every part,
so a part that fails or runs out of time costs only its own figures:
- versions: versions and the runtime decisions `auto` makes for the large config (precision, workers, allocator);
- data: generated Chinese rows long enough to fill 192 tokens, and a tokenizer trained on them;
- step_eager, step_compiled: one optimizer step of the large config (`T5ModelConfig()` defaults, batch 32 of
  192 + 192 tokens) under a 19 GiB cap, eager and `--compile=True`: attention kernels the profiler saw, peak
  allocated/reserved, samples/s, tokens/s, MFU (the encoder-decoder's matmul work over the card's dense bf16 peak),
  compile time;
- train, resume: `train --use_large_config=True` for 30 steps with evaluation, best-k and a state save, then
  `--is_keep_training=True` to 45 steps (through `bench/capped_cli.py`, capped at 19 GiB);
- out_of_memory: the same run capped at 8 GiB, where batch 32 must run out of memory and be halved;
- dpo (only when asked for: `--only dpo`, about a minute more): `train --objective=dpo` from the train part's model on
  pairs of the generated rows, bf16: the reference pass's time, the step's samples/s and reward figures.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SMOKE_MODEL = dict(d_model=32, d_ff=64, num_heads=2, d_kv=16, num_layers=1, num_decoder_layers=1)
RESULT_MARK = "GPU_CHECK_RESULT "


@dataclass(frozen=True)
class Part:
    name: str
    seconds: int
    """Its time limit on an H100/H200; the smoke run on a CPU gets `smoke_seconds`."""
    smoke_seconds: int


# 20 + 30 + 45 + 120 + 75 + 60 + 60 = 410 s, within the 420 s that bench/gpu_check.sh gives the whole script.
PARTS = [Part("versions", 20, 60), Part("data", 30, 120), Part("step_eager", 45, 180),
         Part("step_compiled", 120, 420), Part("train", 75, 240), Part("resume", 60, 240),
         Part("out_of_memory", 60, 60), Part("dpo", 60, 240)]
OPTIONAL = ("dpo",)  # beyond the 420 s: run when the device time allows


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on any machine: checks the script only")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for gpu_check.json")
    parser.add_argument("--only", default="", help="comma-separated parts to run (default: all)")
    parser.add_argument("--cap_gib", type=float, default=19.0)
    parser.add_argument("--oom_cap_gib", type=float, default=8.0)
    parser.add_argument("--steps", type=int, default=30, help="first run's steps; the resume goes 50%% further")
    parser.add_argument("--part", help=argparse.SUPPRESS)  # a child process runs this one part
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    return parser.parse_args()


# --- the parts, each run in a child process ---


def versions(args) -> dict:
    import platform

    import accelerate
    import torch
    import transformers

    from config import TrainConfigPretrainLarge
    from training.runtime import decide

    decided = decide(TrainConfigPretrainLarge())
    cuda = torch.cuda.is_available()
    return {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__,
            "device": torch.cuda.get_device_name() if cuda else "CPU",
            "device_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 1024**3, 1) if cuda else None,
            "installed_from_wheels": os.environ.get("GPU_CHECK_FROM_WHEELS", ""),
            "auto": {"mixed_precision": decided.mixed_precision, "num_workers": decided.num_workers,
                     "pin_memory": decided.pin_memory, "ultra_low_mem": decided.ultra_low_mem,
                     "notes": decided.notes}}


def data_paths(scratch: str) -> dict:
    return {"train_file": os.path.join(scratch, "train.parquet"), "validation_file": os.path.join(scratch, "valid.parquet"),
            "tokenizer_dir": os.path.join(scratch, "tokenizer")}


def make_data(args) -> dict:
    """Distinct Chinese rows of 150-300 characters a side: at 192 tokens nearly every row is cut, so batches are full
    length, as the step parts measure them."""
    import pyarrow.parquet as pq
    from bench_long_run import distinct_rows

    from model.tokenizer import train_tokenizer

    paths = data_paths(args.scratch)
    rows = 600 if args.smoke else 3000
    pq.write_table(distinct_rows(rows, seed=1, prompt_chars=(150, 300), response_chars=(150, 300)),
                   paths["train_file"], row_group_size=500)
    pq.write_table(distinct_rows(256, seed=2, prompt_chars=(150, 300), response_chars=(150, 300)),
                   paths["validation_file"])
    tokenizer = train_tokenizer(paths["train_file"], paths["tokenizer_dir"], vocab_size=1000 if args.smoke else 32000,
                                max_rows=None)
    return {"train_rows": rows, "vocabulary": len(tokenizer)}


def one_step(args, compile: bool) -> dict:
    """One large-config optimizer step, timed after warm-up, in this process (capped)."""
    import gc

    import torch
    from gpu_bench import GIB, cap_memory, kernels_of_one_step, large_config_step, make_bundle, peak_tflops, run_steps

    from config import T5ModelConfig

    cuda = torch.cuda.is_available()
    cap_memory(args.cap_gib)
    sizes = argparse.Namespace(vocab_size=1000 if args.smoke else 32000, prompt_len=32 if args.smoke else 192,
                               response_len=32 if args.smoke else 192)
    batch = 4 if args.smoke else 32
    with tempfile.TemporaryDirectory(prefix="gpu_check_step_") as scratch:
        model_cfg = T5ModelConfig(**SMOKE_MODEL) if args.smoke else T5ModelConfig()
        bench = large_config_step(model_cfg, sizes.vocab_size, scratch, compile=compile)
        stepper, accelerator = bench.stepper, bench.accelerator
        bundle = make_bundle(sizes, batch, cuda)
        gc.collect()  # Accelerate's autocast wrapper of the forward holds a reference cycle: only what lives counts
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        first = run_steps(stepper, bundle, 1)  # compiles, when compiling
        first_seconds = time.perf_counter() - started
        run_steps(stepper, bundle, 2)
        seconds = run_steps(stepper, bundle, 2 if args.smoke else 10) if first is not None else None
        result = {"compile": compile, "batch": batch, "tokens_per_row": sizes.prompt_len + sizes.response_len,
                  "parameters_m": round(bench.parameters / 1e6, 1), "first_step_s": round(first_seconds, 2),
                  "out_of_memory": seconds is None}
        if seconds is not None:
            samples = batch / seconds
            flops = 6 * (bench.encoder * sizes.prompt_len + (bench.decoder + bench.embedding) * sizes.response_len)
            peak = peak_tflops(torch.cuda.get_device_name()) if cuda else None
            result.update(step_s=round(seconds, 4), samples_per_s=round(samples, 1),
                          tokens_per_s=round(samples * result["tokens_per_row"]),
                          mfu=round(flops * samples / (peak * 1e12), 3) if peak else None,
                          kernels=kernels_of_one_step(stepper, bundle))
        if cuda:
            torch.cuda.synchronize()
            result.update(peak_allocated_gib=round(torch.cuda.max_memory_allocated() / GIB, 2),
                          peak_reserved_gib=round(torch.cuda.max_memory_reserved() / GIB, 2))
        accelerator.end_training()
        return result


def run_flags(args, name: str) -> dict:
    flags = dict(use_large_config=True, **data_paths(args.scratch), output_dir=os.path.join(args.scratch, name),
                 log_dir=os.path.join(args.scratch, "logs"), max_steps=args.steps, save_steps=args.steps // 2,
                 logging_steps=1, eval_max_samples=64, keep_latest_n_ckp=2, warmup_steps=10)
    if args.smoke:
        flags.update(SMOKE_MODEL, max_seq_len=32, batch_size_per_gpu=4, mixed_precision="no", eval_max_samples=8)
    return flags


def cli(cap_gib: float, flags: dict) -> tuple[subprocess.CompletedProcess, float]:
    command = [sys.executable, str(BENCH / "capped_cli.py"), str(cap_gib), "train",
               *[f"--{name}={value}" for name, value in flags.items()]]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)  # the part's limit bounds it
    return result, time.perf_counter() - started


def records(output_dir: str, event: str) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["event"] == event]


def run_summary(run: subprocess.CompletedProcess, seconds: float, output_dir: str) -> dict:
    train = records(output_dir, "train")
    summary = {"exit": run.returncode, "seconds": round(seconds, 1), "steps_logged": [r["step"] for r in train][-1:],
               "loss_first_last": [round(train[0]["loss"], 3), round(train[-1]["loss"], 3)] if train else None,
               "evaluations": [(r["step"], round(r["eval_loss"], 3)) for r in records(output_dir, "eval")],
               "best_models": sorted(p.name for p in (Path(output_dir) / "best").glob("step-*")),
               "samples_per_s": train[-1]["samples_per_s"] if train else None}
    if run.returncode != 0:
        summary["error"] = (run.stderr or run.stdout)[-1500:]
    return summary


def train(args) -> dict:
    flags = run_flags(args, "run")
    return run_summary(*cli(args.cap_gib, flags), flags["output_dir"])


def resume(args) -> dict:
    flags = dict(run_flags(args, "run"), is_keep_training=True, max_steps=args.steps * 3 // 2)
    run, seconds = cli(args.cap_gib, flags)
    summary = run_summary(run, seconds, flags["output_dir"])
    summary["resumed_from_step"] = args.steps if f"step {args.steps}," in run.stdout + run.stderr else None
    return summary


def out_of_memory(args) -> dict:
    if args.smoke:
        return {"skipped": "a CPU has no allocator cap to run out of"}
    flags = dict(run_flags(args, "oom"), max_steps=5, save_steps=1000, eval_max_samples=0, keep_latest_n_ckp=0)
    run, seconds = cli(args.oom_cap_gib, flags)
    halvings = re.findall(r"retrying with batch_size_per_gpu=(\d+)", run.stdout + run.stderr)
    summary = run_summary(run, seconds, flags["output_dir"])
    summary.update(cap_gib=args.oom_cap_gib, batch_sizes_after_halving=[int(b) for b in halvings])
    return summary


def dpo(args) -> dict:
    """Preference tuning of the train part's model on pairs of the generated rows (chosen = a row's response,
    rejected = the next row's), with the reference pass first."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pairs = {}
    for name, path in data_paths(args.scratch).items():
        if name != "tokenizer_dir":
            table = pq.read_table(path)
            responses = table["response"].to_pylist()
            pairs[name] = os.path.join(args.scratch, f"pairs_{name}.parquet")
            pq.write_table(pa.table({"prompt": table["prompt"], "chosen": responses,
                                     "rejected": responses[1:] + responses[:1]}), pairs[name], row_group_size=500)
    flags = dict(objective="dpo", init_from=os.path.join(args.scratch, "run", "final"), **pairs,
                 output_dir=os.path.join(args.scratch, "dpo"), log_dir=os.path.join(args.scratch, "logs"),
                 max_steps=args.steps, save_steps=args.steps // 2, logging_steps=1, eval_max_samples=64,
                 keep_latest_n_ckp=1, warmup_steps=10, max_seq_len=32 if args.smoke else 192,
                 **({"mixed_precision": "no"} if args.smoke else {}))
    run, seconds = cli(args.cap_gib, flags)
    summary = run_summary(run, seconds, flags["output_dir"])
    passed = re.search(r"reference pass done in ([\d.]+)s", run.stdout + run.stderr)
    summary.update(reference_pass_s=float(passed.group(1)) if passed else None,
                   reward_accuracy=[(r["step"], round(r["reward_accuracy"], 3))
                                    for r in records(flags["output_dir"], "eval")])
    return summary


WORK = {"versions": versions, "data": make_data, "step_eager": lambda args: one_step(args, compile=False),
        "step_compiled": lambda args: one_step(args, compile=True), "train": train, "resume": resume,
        "out_of_memory": out_of_memory, "dpo": dpo}
NEEDS = {"train": "data", "resume": "train", "out_of_memory": "data", "dpo": "train"}  # a part run alone makes what it needs first


# --- the parent: runs the parts, writes the report after each ---


def run_part(args, part: Part) -> dict:
    limit = part.smoke_seconds if args.smoke else part.seconds
    command = [sys.executable, str(Path(__file__).resolve()), "--part", part.name, "--scratch", args.scratch,
               "--cap_gib", str(args.cap_gib), "--oom_cap_gib", str(args.oom_cap_gib), "--steps", str(args.steps)]
    command += ["--smoke"] if args.smoke else []
    try:
        child = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired as expired:
        tail = (expired.stderr or b"")[-1500:]
        return {"error": f"timed out after its limit of {limit} s",
                "stderr": tail.decode(errors="replace") if isinstance(tail, bytes) else tail}
    found = [line[len(RESULT_MARK):] for line in child.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if child.returncode != 0 or not found:
        return {"error": f"exit {child.returncode}", "stderr": (child.stderr or child.stdout)[-1500:]}
    return json.loads(found[-1])


def table(report: dict) -> str:
    lines = []
    versions = report.get("versions", {})
    if "torch" in versions:
        lines += [f"gpu_check {versions['date']}: {versions['device']} ({versions['device_memory_gib']} GiB), torch "
                  f"{versions['torch']} (CUDA {versions['cuda']}), transformers {versions['transformers']}, "
                  f"accelerate {versions['accelerate']}",
                  f"auto for the large config: {json.dumps(versions['auto'], ensure_ascii=False)}", ""]
    eager, compiled = report.get("step_eager", {}), report.get("step_compiled", {})
    lines.append(f"{'step, batch x tokens':<30}{'eager':>16}{'compile':>16}")
    for key in ("first_step_s", "step_s", "samples_per_s", "tokens_per_s", "mfu", "peak_allocated_gib",
                "peak_reserved_gib", "out_of_memory", "error"):
        lines.append(f"  {key:<28}{str(eager.get(key, 'n/a'))[:15]:>16}{str(compiled.get(key, 'n/a'))[:15]:>16}")
    for name, values in (("eager", eager), ("compile", compiled)):
        lines.append(f"  attention kernels ({name}): {', '.join(values.get('kernels', [])) or 'n/a'}")
    for name in ("data", "train", "resume", "out_of_memory", "dpo"):
        lines.append(f"{name}: {json.dumps(report.get(name, 'not run'), ensure_ascii=False)[:400]}")
    lines.append(f"seconds per part: {json.dumps(report.get('seconds', {}))}")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.part:  # a child: one part, its result on one marked line
        sys.path[:0] = [str(REPO), str(BENCH)]
        from training.runtime import set_cuda_defaults

        set_cuda_defaults()  # before anything starts CUDA, as the trainer does
        print(RESULT_MARK + json.dumps(WORK[args.part](args), ensure_ascii=False, default=str), flush=True)
        return
    wanted = [name for name in args.only.split(",") if name] or [part.name for part in PARTS
                                                                 if part.name not in OPTIONAL]
    unknown = sorted(set(wanted) - set(WORK))
    if unknown:
        raise SystemExit(f"unknown parts {unknown}; the parts are {', '.join(WORK)}")
    while any(NEEDS.get(name) and NEEDS[name] not in wanted for name in wanted):
        wanted += [NEEDS[name] for name in wanted if NEEDS.get(name) and NEEDS[name] not in wanted]
    if not args.smoke and subprocess.run([sys.executable, "-c", "import torch; assert torch.cuda.is_available()"],
                                         capture_output=True).returncode:
        raise SystemExit("no CUDA device here: run with --smoke for the CPU smoke version")
    if args.smoke:
        print("SMOKE RUN (tiny sizes): these are NOT GPU figures.\n", flush=True)
    os.makedirs(args.out, exist_ok=True)
    path = Path(args.out) / "gpu_check.json"
    report = {"smoke": args.smoke, "seconds": {}}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
        args.scratch = scratch
        for part in (part for part in PARTS if part.name in wanted):
            started = time.perf_counter()
            report[part.name] = run_part(args, part)
            report["seconds"][part.name] = round(time.perf_counter() - started, 1)
            path.write_text(json.dumps(report, indent=1, ensure_ascii=False, default=str))
            print(f"[{part.name}: {report['seconds'][part.name]} s{', FAILED' if 'error' in report[part.name] else ''}]",
                  flush=True)
    print(table(report))
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
