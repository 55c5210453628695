"""`--optimizer=adafactor_t5` as it was computed before its chunked form: tensor by tensor, ~18 small operators
each. Kept as the reference that `bench/bench_optimizer_ops.py` counts against and `tests/test_optimizer.py`
checks the chunked optimizer's updates against (the same formulas, written the plain way)."""
import torch


class PerTensorRelativeAdafactor(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-2, beta2_decay: float = -0.8, eps1: float = 1e-30,
                 eps2: float = 1e-3, clip: float = 1.0, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, beta2_decay=beta2_decay, eps1=eps1, eps2=eps2, clip=clip,
                                      weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            updates = [self._scaled_gradient(p, group) for p in params]
            sizes = [p.numel() ** 0.5 for p in params]
            update_rms = [norm / size for norm, size in zip(torch._foreach_norm(updates), sizes)]
            weight_rms = [norm / size for norm, size in zip(torch._foreach_norm(params), sizes)]
            factors = [w.clamp(min=group["eps2"]) / (u / group["clip"]).clamp(min=1.0)
                       for u, w in zip(update_rms, weight_rms)]
            torch._foreach_mul_(updates, factors)
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1.0 - group["lr"] * group["weight_decay"])
            torch._foreach_add_(params, updates, alpha=-group["lr"])

    def _scaled_gradient(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        grad, state = p.grad.float(), self.state[p]
        if not state:
            state["step"] = 0
            if p.ndim >= 2:
                state["row"] = torch.zeros(p.shape[:-1], dtype=torch.float32, device=p.device)
                state["col"] = torch.zeros(p.shape[:-2] + p.shape[-1:], dtype=torch.float32, device=p.device)
            else:
                state["variance"] = torch.zeros_like(grad)
        state["step"] += 1
        new_weight = state["step"] ** group["beta2_decay"]
        squared = grad.square().add_(group["eps1"])
        if p.ndim >= 2:
            state["row"].lerp_(squared.mean(dim=-1), new_weight)
            state["col"].lerp_(squared.mean(dim=-2), new_weight)
            row = state["row"] / state["row"].mean(dim=-1, keepdim=True)
            return grad * (row.unsqueeze(-1) * state["col"].unsqueeze(-2)).rsqrt()
        state["variance"].lerp_(squared, new_weight)
        return grad * state["variance"].rsqrt()
