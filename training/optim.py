"""The optimizers `--optimizer` chooses, and what `learn_rate` means for each.

T5 starts its shared embedding at std 1.0 and its dense weights near d_model^-0.5 or smaller (attention's q far
smaller), so one absolute step size moves them by very different *relative* amounts: AdamW at the guide's 1e-4
barely moves the embedding. A relative optimizer scales each tensor's step by that tensor's RMS, so every tensor
changes by the same fraction per step (docs/BENCHMARKS.md, "Learning recipe", measures the alternatives).

`learn_rate` keeps its meaning for every choice: the guide's 1e-4 is "the usual rate", 2e-4 twice it and 5e-5 half
of it. Each optimizer's own rate is `learn_rate x rate_per_learn_rate` (set on every parameter group before every
step, see `training.schedule`), and weight decay shrinks every decayed tensor by `learn_rate x weight_decay` per
step (in learn_rate's units, as AdamW does), whichever optimizer runs.
"""
import math
from dataclasses import dataclass

import torch

from training.adafactor import RelativeAdafactor

DEFAULT_OPTIMIZER = "adafactor_t5"


@dataclass(frozen=True)
class Recipe:
    """One `--optimizer` choice."""

    rate_per_learn_rate: float
    """The optimizer's own rate when the schedule asks for `learn_rate`."""
    relative: bool
    """Steps scale with each tensor's RMS (needs whole tensors: not under DeepSpeed ZeRO or FSDP, which flatten)."""


RECIPES = {
    # Adafactor as T5 trained it, at the rate our measurements favour: relative steps (each tensor moves by a
    # fraction of its RMS), factored second moments (almost no optimizer memory), update clipping, no momentum,
    # and only the contract's warmup and cosine (no extra 1/sqrt(t) decay). 1e-4 -> a relative rate of 3e-2.
    "adafactor_t5": Recipe(rate_per_learn_rate=300.0, relative=True),
    # The original project's optimizer (torch's Adafactor, as torch_optimizer's with relative_step=True): relative
    # step min(rate, 1/sqrt(t)) with parameter scaling. 1e-4 -> the original's rate 1e-2.
    "adafactor": Recipe(rate_per_learn_rate=100.0, relative=True),
    # AdamW with one absolute rate for every tensor: learn_rate is its rate.
    "adamw": Recipe(rate_per_learn_rate=1.0, relative=False),
}


def parameter_groups(model, weight_decay: float, rate_per_learn_rate: float) -> list[dict]:
    """Trainable tensors; no weight decay on biases and normalisation weights (1-D tensors): decaying them only
    hurts. The decay is given in learn_rate's units, so it is divided by the optimizer's rate per learn_rate."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    common = {"rate_per_learn_rate": rate_per_learn_rate}
    return [{"params": decay, "weight_decay": weight_decay / rate_per_learn_rate, **common},
            {"params": no_decay, "weight_decay": 0.0, **common}]


def build_optimizer(model, name: str, weight_decay: float) -> torch.optim.Optimizer:
    groups = parameter_groups(model, weight_decay, RECIPES[name].rate_per_learn_rate)
    if name == "adafactor_t5":
        return RelativeAdafactor(groups, lr=0.0)
    if name == "adafactor":
        return torch.optim.Adafactor(groups, lr=0.0, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0)
    # On a GPU the fused kernel updates every tensor in a few launches instead of several per tensor.
    fused = all(parameter.is_cuda for group in groups for parameter in group["params"])
    return torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.999), eps=1e-8, fused=fused or None)


def state_bytes(name: str, shapes) -> int:
    """Bytes of the optimizer's fp32 state for tensors of these shapes: AdamW keeps two moments per value, the
    Adafactors a row and a column mean per matrix (one value per element of a vector)."""
    if not RECIPES[name].relative:
        return sum(8 * math.prod(shape) for shape in shapes)
    return sum(4 * (math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1] if len(shape) >= 2
                    else math.prod(shape)) for shape in shapes)


def set_learning_rate(optimizer, rate: float) -> None:
    """`rate` in learn_rate's units; each group gets its optimizer's own rate."""
    for group in optimizer.param_groups:
        group["lr"] = rate * group.get("rate_per_learn_rate", 1.0)


@torch.no_grad()
def allocate_state(optimizer) -> None:
    """Make the optimizer's state now, before the first step: AdamW's moments (8 bytes per parameter, 1.4 GiB for
    the large model) are otherwise allocated inside the first optimizer step, where running out of GPU memory
    could not be recovered. A step with zero gradients at rate 0 makes the state and moves nothing (the weight
    decay multiplies by exactly 1); its step counters are set back to 0, so the first real step is the first."""
    torch_optimizer = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper would consult the scaler
    rates = [group["lr"] for group in torch_optimizer.param_groups]
    parameters = [p for group in torch_optimizer.param_groups for p in group["params"]]
    for group in torch_optimizer.param_groups:
        group["lr"] = 0.0
    for parameter in parameters:
        parameter.grad = torch.zeros_like(parameter)
    torch_optimizer.step()
    for parameter, state in ((p, torch_optimizer.state[p]) for p in parameters):
        parameter.grad = None
        state["step"] = state["step"].zero_() if isinstance(state["step"], torch.Tensor) else 0
    for group, rate in zip(torch_optimizer.param_groups, rates):
        group["lr"] = rate
