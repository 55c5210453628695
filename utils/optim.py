"""AdamW with decoupled weight decay and the contract's schedule: linear warmup, then cosine to 0.1x."""
import math

import torch

FINAL_LR_FRACTION = 0.1


def decay_progress(step: int, warmup_steps: int, total_steps: int, anchor: tuple | None = None) -> float:
    """How far the cosine decay is (0..1) for the step that runs after `step` steps.

    It runs from the end of the warmup to the run's last step (`step == total_steps - 1`). `anchor` (step,
    progress) is where a re-aimed schedule goes on from instead (see `aim_schedule`).
    """
    start, done = anchor or (warmup_steps, 0.0)
    return min(1.0, done + (1 - done) * (step - start) / max(1, total_steps - 1 - start))


def lr_factor(step: int, warmup_steps: int, total_steps: int, anchor: tuple | None = None) -> float:
    """Multiplier of `learn_rate` for the optimizer step that runs after `step` steps (logged as step + 1).

    0 -> 1 linearly over `warmup_steps`, then cosine from 1 down to exactly 0.1 at the run's last step.
    """
    if step < warmup_steps:
        return step / warmup_steps
    progress = decay_progress(step, warmup_steps, total_steps, anchor)
    return FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model, learn_rate: float, weight_decay: float) -> torch.optim.AdamW:
    """No weight decay on biases and normalisation weights (1-D tensors): decaying them only hurts."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learn_rate, betas=(0.9, 0.999), eps=1e-8)


def build_scheduler(optimizer, warmup_steps: int, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup_steps, total_steps))


def aim_schedule(scheduler, learn_rate: float, warmup_steps: int, total_steps: int, state) -> None:
    """Point a (resumed) schedule at this invocation's `learn_rate` and at the run's length as now known.

    A resume may change the run's length (`epochs`, or the global batch on another number of GPUs). The decay
    then goes on from where it is, over the steps that are left, so the rate neither jumps nor misses 0.1x at
    the real last step. An unchanged length keeps the exact formula: the resumed run equals the uninterrupted one.
    """
    planned = state.schedule_total_steps
    if planned and planned != total_steps and state.global_step > warmup_steps:
        anchor = tuple(state.decay_anchor) or None
        state.decay_anchor = [state.global_step, decay_progress(state.global_step, warmup_steps, planned, anchor)]
    state.schedule_total_steps = total_steps
    anchor = tuple(state.decay_anchor) or None
    inner = scheduler.scheduler  # Accelerate's wrapper holds the LambdaLR
    inner.base_lrs = [learn_rate] * len(inner.base_lrs)
    inner.lr_lambdas = [lambda step: lr_factor(step, warmup_steps, total_steps, anchor)] * len(inner.lr_lambdas)
    for group in inner.optimizer.param_groups:
        group["lr"] = learn_rate * lr_factor(state.global_step, warmup_steps, total_steps, anchor)
