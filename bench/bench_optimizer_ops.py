"""What one optimizer step of the large config asks of the host: top-level aten operators (each one a kernel launch,
or several, on a GPU), before and after the chunked `adafactor_t5`, and the CPU time of a step.

    python bench/bench_optimizer_ops.py [--rounds 3] [--steps 3]

The model is the large config's (`T5ModelConfig()` defaults, vocabulary 32,000: 215 tensors, 189.8M parameters)
on the CPU, with random gradients. Operators are counted with torch.profiler: every `aten::` event whose parent is
not itself an `aten::` event, i.e. what Python asked for (on a GPU each becomes one launch or a few). "before" is
the per-tensor form (`bench/adafactor_per_tensor.py`); the same steps through both also give the largest relative
difference of their weights, which must stay below 1e-6.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from adafactor_per_tensor import PerTensorRelativeAdafactor  # noqa: E402
from config import T5ModelConfig  # noqa: E402
from model.t5 import StandInTokenizer, build_model  # noqa: E402
from training.optim import RECIPES, build_optimizer, parameter_groups  # noqa: E402

LEARNING_RATE = 1e-4


def top_level_ops(work) -> int:
    """aten operators `work()` starts from Python (their own children not counted)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        work()
    return sum(1 for event in profiler.events() if event.name.startswith("aten::")
               and (event.cpu_parent is None or not event.cpu_parent.name.startswith("aten::")))


def large_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(T5ModelConfig(), StandInTokenizer(32000))


def optimizer_of(name: str, model):
    if name == "adafactor_t5 per tensor (before)":
        groups = parameter_groups(model, 0.01, RECIPES["adafactor_t5"].rate_per_learn_rate)
        optimizer = PerTensorRelativeAdafactor(groups, lr=0.0)
    else:
        optimizer = build_optimizer(model, name, 0.01)
    for group in optimizer.param_groups:
        group["lr"] = LEARNING_RATE * group["rate_per_learn_rate"]
    return optimizer


def with_gradients(model, step: int) -> None:
    generator = torch.Generator().manual_seed(step)
    for parameter in model.parameters():
        parameter.grad = torch.randn(parameter.shape, generator=generator) * 1e-3


def largest_relative_difference(steps: int) -> float:
    """The same gradients through both forms for `steps` steps: the weights' largest relative difference."""
    models = [large_model(), large_model()]
    optimizers = [optimizer_of("adafactor_t5 per tensor (before)", models[0]), optimizer_of("adafactor_t5", models[1])]
    for step in range(steps):
        for model, optimizer in zip(models, optimizers):
            with_gradients(model, step)
            optimizer.step()
    return max(((a - b).abs() / b.abs().clamp(min=1e-12)).max().item()
               for a, b in zip(models[0].parameters(), models[1].parameters()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds, best kept")
    parser.add_argument("--steps", type=int, default=3, help="steps compared for the weights' difference")
    args = parser.parse_args()
    names = ["adafactor_t5 per tensor (before)", "adafactor_t5", "adamw", "adafactor"]
    model = large_model()
    optimizers = {name: optimizer_of(name, model) for name in names}
    counts, best = {}, {name: float("inf") for name in names}
    with_gradients(model, 0)
    for name, optimizer in optimizers.items():
        optimizer.step()  # the first step allocates the state: count a later one
        counts[name] = top_level_ops(optimizer.step)
    for _ in range(args.rounds):
        for name, optimizer in optimizers.items():
            started = time.perf_counter()
            optimizer.step()
            best[name] = min(best[name], time.perf_counter() - started)
    print(f"large config: {sum(1 for _ in model.parameters())} tensors, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'optimizer':<34}{'top-level aten ops/step':>24}{'CPU s/step (best)':>19}")
    for name in names:
        print(f"{name:<34}{counts[name]:>24}{best[name]:>19.3f}")
    before, after = counts[names[0]], counts[names[1]]
    print(f"adafactor_t5: {before} -> {after} operators per step ({before / after:.1f}x fewer); CPU step time "
          f"{best[names[0]] / best[names[1]]:.2f}x of before's speed")
    print(f"largest relative weight difference after {args.steps} steps, chunked vs per tensor: "
          f"{largest_relative_difference(args.steps):.2e}")


if __name__ == "__main__":
    main()
