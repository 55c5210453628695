"""AdamW with decoupled weight decay and the contract's schedule: linear warmup, then cosine to 0.1x."""
import math

import torch

FINAL_LR_FRACTION = 0.1


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of `learn_rate` for the optimizer step that runs after `step` steps (logged as step + 1).

    0 -> 1 linearly over `warmup_steps`, then cosine from 1 down to exactly 0.1 at the run's last step
    (`step == total_steps - 1`).
    """
    if step < warmup_steps:
        return step / warmup_steps
    decay_steps = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
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
