"""The optimizer: AdamW with decoupled weight decay. Its rate is set before every step (`training.schedule`)."""
import torch


def build_optimizer(model, weight_decay: float) -> torch.optim.AdamW:
    """No weight decay on biases and normalisation weights (1-D tensors): decaying them only hurts."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.999), eps=1e-8)


def set_learning_rate(optimizer, rate: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = rate
