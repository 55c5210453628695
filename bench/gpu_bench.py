"""The large model's training step on one GPU: throughput, MFU and peak memory, with and without memory cleanup.

    python bench/gpu_bench.py [--batches 8,16,32,48] [--steps 20] [--cleanup_steps 100] [--cleanup_every 50]
                              [--cap_gib 19]

What runs: `T5ModelConfig()` defaults (d_model 768, 10 + 10 layers) with a 32,000-token vocabulary (a stand-in
for the tokenizer gives `build_model` its size and special ids, so no tokenizer is trained), the trainer's own
step (`training.step.StepRunner`: token-summed loss, clipping at 1.0, the trainer's optimizer) under the
Accelerator that `training.runtime.build_accelerator` builds for the large config (bf16 autocast with fp32 weights where the GPU
has native bf16). Each step is one micro-batch of `batch` rows of random token ids at full length, 192 prompt +
192 response tokens (no padding: the worst case), pre-built in pinned memory; data loading is not measured here.

Per batch size: warm-up steps, then timed steps -> samples/s, tokens/s (prompt + response), MFU, and the peak
allocated and reserved GPU memory since the batch size's first step (the cache is emptied in between, in
increasing batch order). MFU is given two ways: 6 x parameters x tokens/s as usually quoted (every parameter
for every token), and 6 x (encoder parameters x prompt tokens + decoder and output-projection parameters x
response tokens)/s, the matmul work an encoder-decoder really does, which is about half; both over the device's
dense bf16 peak from a small table (n/a for other devices). A batch fits a 20 GB card when its peak reserved
memory is at most 20 GiB; the largest batch that would fit is extrapolated linearly from the two largest
measured batches. The allocator is capped at --cap_gib (`torch.cuda.set_per_process_memory_fraction`), so that an
H100/H200 behaves like a 20 GB RTX 3080 less its CUDA context and NCCL buffers: a batch that would not fit there
runs out of memory here too. The attention kernels that ran are named (from the profiler) and the allocated memory's
slope per row is printed.

Memory cleanup at the trainer's cadence: release_memory() (gc.collect + torch.cuda.empty_cache) every
--cleanup_every steps (the trainer's memory_cleanup_steps, 50) against none, in alternating blocks of
--cleanup_steps steps at batch 32, best block kept; also with the start-up objects not frozen (the trainer
before it froze them), and release_memory() timed alone both ways.

Without CUDA it runs a smoke version (tiny model, fp32, a few steps) that only shows the script works: those
figures are not GPU figures, and it says so.
"""

import argparse
import gc
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from accelerate.utils import set_seed  # noqa: E402

from config import T5ModelConfig, TrainConfigPretrainLarge  # noqa: E402
from data_pipeline.batch import MicroBatch, StepBatch  # noqa: E402
from model.t5 import StandInTokenizer, build_model, count_parameters  # noqa: E402
from training.memory import freeze_startup_objects, release_memory  # noqa: E402
from training.optim import build_optimizer  # noqa: E402
from training.runtime import build_accelerator, start_processes  # noqa: E402
from training.step import StepRunner  # noqa: E402

GIB = 1024**3
FIT_BYTES = 20 * GIB
# Names of the CUDA kernels scaled-dot-product attention may run, as the profiler reports them.
ATTENTION_KERNEL_MARKS = ("flash", "fmha", "efficient_attention", "mem_eff", "cudnn", "sdpa", "softmax", "bmm")
# Dense bf16 tensor-core peak in TFLOPS (with fp32 accumulation), by device name; the first match wins.
PEAK_BF16_TFLOPS = [("H200 NVL", 835.5), ("H200", 989.4), ("H100 PCIe", 756.5), ("H100 NVL", 835.5),
                    ("H100", 989.4), ("A100", 312.0), ("RTX 4090", 165.2), ("RTX 3080", 59.5)]
LEARNING_RATE = 1e-4  # a constant rate: the schedule costs nothing and changes no timing
SMOKE_MODEL = dict(d_model=64, d_ff=256, num_heads=4, d_kv=16, num_layers=2, num_decoder_layers=2)



def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="8,16,32,48", help="comma-separated batch sizes, increasing")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per batch size")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per batch size")
    parser.add_argument("--cleanup_batch", type=int, default=32)
    parser.add_argument("--cleanup_every", type=int, default=50, help="steps between release_memory() calls")
    parser.add_argument("--cleanup_steps", type=int, default=100, help="steps per block of the cleanup comparison")
    parser.add_argument("--cleanup_rounds", type=int, default=2, help="alternating blocks per variant")
    parser.add_argument("--cap_gib", type=float, default=19.0,
                        help="GPU memory this process may use: a 20 GB card less its context (0: no cap)")
    parser.add_argument("--vocab_size", type=int, default=32000)
    parser.add_argument("--prompt_len", type=int, default=192)
    parser.add_argument("--response_len", type=int, default=192)
    return parser.parse_args()


def smoke_settings(args) -> None:
    """Tiny and quick: on a CPU only the mechanics are checked."""
    args.batches, args.warmup, args.steps = "2,4", 1, 3
    args.cleanup_batch, args.cleanup_every, args.cleanup_steps, args.cleanup_rounds = 4, 2, 4, 1
    args.vocab_size, args.prompt_len, args.response_len = 1000, 32, 32


def peak_tflops(name: str):
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


def stack_parameters(model) -> tuple[int, int, int]:
    """Encoder body, decoder body, and the shared embedding (the output projection, tied)."""
    embedding = model.shared.weight.numel()
    body = lambda stack: sum(p.numel() for n, p in stack.named_parameters() if "embed_tokens" not in n)
    return body(model.encoder), body(model.decoder), embedding


@dataclass
class BenchStep:
    """The trainer's step for the large config on this device, and the parameter counts MFU needs."""

    accelerator: object
    runtime: object
    stepper: StepRunner
    encoder: int
    decoder: int
    embedding: int
    parameters: int


def large_config_step(model_cfg, vocab_size: int, output_dir: str, compile: bool = False) -> BenchStep:
    """What build_run builds for one step of the large config (bf16 where native, its optimizer, the fused kernel
    on a GPU), with a stand-in tokenizer of `vocab_size` tokens: no data, no tokenizer training."""
    cfg = TrainConfigPretrainLarge(output_dir=output_dir, mixed_precision="bf16", gradient_accumulation_steps=1,
                                   compile=compile)
    runtime = start_processes(cfg)[1]
    accelerator = build_accelerator(cfg, runtime)
    set_seed(cfg.seed)
    model = build_model(model_cfg, StandInTokenizer(vocab_size))
    encoder, decoder, embedding = stack_parameters(model)
    parameters = count_parameters(model)
    model.to(accelerator.device)  # as build_run does: a fused optimizer is built on the device
    model, optimizer = accelerator.prepare(model, build_optimizer(model, cfg.optimizer, cfg.weight_decay))
    stepper = StepRunner(accelerator, model, optimizer, cfg.max_grad_norm, compile=compile)
    return BenchStep(accelerator, runtime, stepper, encoder, decoder, embedding, parameters)


def make_bundle(args, batch: int, pin: bool) -> StepBatch:
    """One optimizer step of full-length random rows, as the DataFeed yields them."""
    generator = torch.Generator().manual_seed(batch)
    rows = MicroBatch.of(torch.randint(3, args.vocab_size, (batch, args.prompt_len), generator=generator),
                      torch.ones(batch, args.prompt_len, dtype=torch.long),
                      torch.randint(3, args.vocab_size, (batch, args.response_len), generator=generator))
    step = StepBatch([rows], epoch=0, end_sample=batch, step_tokens=batch * args.response_len, skipped=0)
    return step.pin_memory() if pin else step


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_steps(stepper, bundle, steps: int, cleanup_every: int = 0) -> float | None:
    """Seconds per step, or None when a step ran out of memory.

    Cleanups fall mid-cadence (steps 25, 75, ... for every 50), so that the step after each one, which grows the
    emptied CUDA cache back, is timed in the same block.
    """
    synchronize()
    started = time.perf_counter()
    for step in range(1, steps + 1):
        if stepper.run(bundle, LEARNING_RATE).out_of_memory:
            return None
        if cleanup_every and step % cleanup_every == cleanup_every // 2:
            release_memory()
    synchronize()
    return (time.perf_counter() - started) / steps


def measure_batch(args, stepper, batch: int, cuda: bool) -> dict:
    release_memory()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    bundle = make_bundle(args, batch, cuda)
    warm = run_steps(stepper, bundle, args.warmup)
    seconds = run_steps(stepper, bundle, args.steps) if warm is not None else None
    result = {"batch": batch, "seconds": seconds}
    if cuda:
        result.update(allocated=torch.cuda.max_memory_allocated(), reserved=torch.cuda.max_memory_reserved())
    return result


def largest_fitting_batch(results: list) -> int | None:
    """Linear in the batch size through the two largest measured batches that did not run out of memory."""
    measured = [r for r in results if r["seconds"] is not None]
    if len(measured) < 2:
        return None
    (b1, m1), (b2, m2) = [(r["batch"], r["reserved"]) for r in measured[-2:]]
    per_row = (m2 - m1) / (b2 - b1)
    return math.floor(b2 + (FIT_BYTES - m2) / per_row) if per_row > 0 else None


def cap_memory(cap_gib: float) -> None:
    """Make a large card behave like a small one: the allocator raises OutOfMemoryError past `cap_gib`."""
    if cap_gib > 0 and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GIB / total))


def kernels_of_one_step(stepper, bundle) -> list[str]:
    """The attention-related kernels (and softmax/bmm, which only the unfused path runs) of one step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as profiler:
        stepper.run(bundle, LEARNING_RATE)
        synchronize()
    # On a GPU the device kernels (flash/memory-efficient attention or the unfused softmax and bmm); on a CPU the
    # operators, as there are no kernels.
    wanted = "CUDA" if torch.cuda.is_available() else "CPU"
    names = {event.key for event in profiler.key_averages() if event.device_type.name == wanted}
    return sorted(name for name in names if any(mark in name.lower() for mark in ATTENTION_KERNEL_MARKS)
                  and not name.startswith("autograd::"))


def allocated_per_row(results: list) -> float | None:
    """GiB of peak allocated memory per row of batch, through the two largest batches that ran."""
    measured = [r for r in results if r["seconds"] is not None and "allocated" in r]
    if len(measured) < 2:
        return None
    (b1, m1), (b2, m2) = [(r["batch"], r["allocated"]) for r in measured[-2:]]
    return (m2 - m1) / (b2 - b1) / GIB


def time_release(calls: int = 5) -> float:
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        release_memory()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def cleanup_comparison(args, stepper, cuda: bool) -> None:
    bundle = make_bundle(args, args.cleanup_batch, cuda)
    run_steps(stepper, bundle, args.warmup)
    variants = {"no cleanup": dict(every=0, frozen=True),
                f"release_memory every {args.cleanup_every} steps": dict(every=args.cleanup_every, frozen=True),
                "  same, start-up objects not frozen": dict(every=args.cleanup_every, frozen=False)}
    best = {name: math.inf for name in variants}
    for _ in range(args.cleanup_rounds):
        for name, variant in variants.items():
            if not variant["frozen"]:
                gc.unfreeze()
            seconds = run_steps(stepper, bundle, args.cleanup_steps, variant["every"])
            if not variant["frozen"]:
                freeze_startup_objects()
            best[name] = min(best[name], seconds if seconds is not None else math.inf)
    frozen_release = time_release()
    gc.unfreeze()
    unfrozen_release = time_release()
    freeze_startup_objects()
    base = best["no cleanup"]
    print(f"\ncleanup at batch {args.cleanup_batch}: blocks of {args.cleanup_steps} steps, best of "
          f"{args.cleanup_rounds} alternating rounds")
    for name, seconds in best.items():
        print(f"    {name:<38} {1000 * seconds:8.2f} ms/step   cost {100 * (seconds / base - 1):+6.2f} %")
    print(f"    release_memory() alone, median of 5: {1000 * frozen_release:.2f} ms with the start-up objects "
          f"frozen (as train_loop runs it), {1000 * unfrozen_release:.2f} ms without")


def main() -> None:
    args = parse_args()
    cuda = torch.cuda.is_available()
    if not cuda:
        smoke_settings(args)
        print("SMOKE TEST ON CPU (no CUDA device): tiny model, fp32, a few steps. These are NOT GPU figures; "
              "run this script on the GPU machine for the real ones.\n")
    cap_memory(args.cap_gib)
    with tempfile.TemporaryDirectory(prefix="gpu_bench_") as scratch:
        model_cfg = T5ModelConfig() if cuda else T5ModelConfig(**SMOKE_MODEL)
        bench = large_config_step(model_cfg, args.vocab_size, scratch)
        accelerator, runtime, stepper = bench.accelerator, bench.runtime, bench.stepper
        encoder, decoder, embedding, parameters = bench.encoder, bench.decoder, bench.embedding, bench.parameters
        freeze_startup_objects()  # as train_loop does before its first step

        name = torch.cuda.get_device_name() if cuda else "CPU"
        peak = peak_tflops(name) if cuda else None
        memory = f" ({torch.cuda.get_device_properties(0).total_memory / GIB:.0f} GiB)" if cuda else ""
        print(f"device {name}{memory}, torch {torch.__version__}, precision "
              f"{runtime.mixed_precision}, dense bf16 peak {f'{peak:.1f} TFLOPS' if peak else 'n/a (not in table)'}")
        print(f"model {parameters / 1e6:.1f}M parameters (d_model {model_cfg.d_model}, {model_cfg.num_layers} + "
              f"{model_cfg.num_decoder_layers} layers, vocabulary {args.vocab_size}); "
              f"rows of {args.prompt_len} + {args.response_len} tokens; {args.warmup} warm-up + {args.steps} timed "
              f"steps per batch")

        tokens_per_row = args.prompt_len + args.response_len
        flops_quoted = 6 * parameters * tokens_per_row  # per row
        flops_stacks = 6 * (encoder * args.prompt_len + (decoder + embedding) * args.response_len)
        results = [measure_batch(args, stepper, int(b), cuda) for b in args.batches.split(",")]
        print(f"\n{'batch':>5} {'samples/s':>10} {'tokens/s':>10} {'MFU 6NT':>8} {'MFU stacks':>10} "
              f"{'peak alloc GiB':>15} {'peak reserved GiB':>18} {'fits 20 GiB':>12}")
        for r in results:
            if r["seconds"] is None:
                print(f"{r['batch']:>5} {'out of memory':>30}")
                continue
            samples = r["batch"] / r["seconds"]
            mfu = lambda flops: f"{100 * flops * samples / (peak * 1e12):.1f}%" if peak else "n/a"
            memory = f"{'n/a':>15} {'n/a':>18} {'n/a':>12}"
            if cuda:
                memory = (f"{r['allocated'] / GIB:15.2f} {r['reserved'] / GIB:18.2f} "
                          f"{'yes' if r['reserved'] <= FIT_BYTES else 'no':>12}")
            print(f"{r['batch']:>5} {samples:10.1f} {samples * tokens_per_row:10.0f} {mfu(flops_quoted):>8} "
                  f"{mfu(flops_stacks):>10} {memory}")
        if cuda:
            at_32 = next((r for r in results if r["batch"] == 32), None)
            if at_32 is not None:
                fits = at_32["seconds"] is not None and at_32["reserved"] <= FIT_BYTES
                print(f"batch 32 fits in 20 GiB: {'yes' if fits else 'no'}")
            fitting = [r["batch"] for r in results if r["seconds"] is not None and r["reserved"] <= FIT_BYTES]
            print(f"largest measured batch within 20 GiB: {max(fitting) if fitting else 'none'}; extrapolated "
                  f"largest: {largest_fitting_batch(results) or 'n/a'}; allocated memory per row: "
                  f"{allocated_per_row(results) or float('nan'):.3f} GiB; cap {args.cap_gib} GiB")
        kernel_batch = next((int(b) for b in args.batches.split(",") if int(b) == args.cleanup_batch),
                            int(args.batches.split(",")[0]))
        print(f"attention kernels at batch {kernel_batch}: "
              f"{', '.join(kernels_of_one_step(stepper, make_bundle(args, kernel_batch, cuda))) or 'none named'}")
        cleanup_comparison(args, stepper, cuda)
        accelerator.end_training()
    if not cuda:
        print("\n(smoke test on CPU: NOT GPU figures)")


if __name__ == "__main__":
    main()
