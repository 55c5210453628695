"""`--optimizer=adafactor_t5`: Adafactor with relative steps and no internal schedule, computed for many tensors
at once.

Each tensor p moves by `lr x max(eps2, RMS(p)) x U`, U its gradient over the square root of its factored second
moment, clipped to RMS(U) <= clip. torch's Adafactor caps the rate at 1/sqrt(t) (its own schedule, which would
fight the contract's) and reads two numbers per tensor back to the host every step; this one never synchronises.

Why in chunks of tensors of one shape: a T5 has hundreds of tensors but only a handful of shapes (the large
config: 215 tensors, 6 shapes). Written tensor by tensor, a step launches ~18 small kernels per tensor (3,893
operators for the large config), which on a fast GPU can cost more than the forward and backward. Stacking the
gradients of one shape turns the factored moments into a few batched operators per shape, and the per-tensor
clipping and the update run as `torch._foreach_*` operators over the whole group: about a hundred operators per
step, whatever the depth. The moments of a chunk live in one stacked buffer; each parameter's state holds views
of its rows, so `state_dict` and a resume see per-parameter state as before.
"""
from dataclasses import dataclass

import torch

# Largest stacked chunk: its copy of the gradients and one same-sized temporary are the step's extra memory (the
# large config's 120 768x768 matrices split in two), while keeping the operator count near one chunk per shape.
MAX_CHUNK_BYTES = 256 * 1024**2


@dataclass
class Chunk:
    """Parameters of one shape (and step count) whose moments live stacked in `moments` (row and column means
    for matrices, the full second moment for vectors); `sizes` are their element counts' square roots."""

    params: list
    moments: list
    sizes: list

    @property
    def factored(self) -> bool:
        return self.params[0].ndim >= 2


class RelativeAdafactor(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-2, beta2_decay: float = -0.8, eps1: float = 1e-30,
                 eps2: float = 1e-3, clip: float = 1.0, weight_decay: float = 0.0,
                 max_chunk_bytes: int = MAX_CHUNK_BYTES):
        super().__init__(params, dict(lr=lr, beta2_decay=beta2_decay, eps1=eps1, eps2=eps2, clip=clip,
                                      weight_decay=weight_decay))
        self.max_chunk_bytes = max_chunk_bytes
        self._chunks = {}  # tuple of parameter ids -> Chunk, rebuilt after load_state_dict

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self._chunks = {}  # the loaded moments are new tensors: stack them again at the next step

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._step_group(group, params)

    def _step_group(self, group: dict, params: list) -> None:
        chunks = self._chunks_of(params)
        for chunk in chunks:
            for p in chunk.params:
                self.state[p]["step"] += 1
        # 1 - beta2 starts at 1 and decays as t^-0.8: the estimate follows fresh gradients early, then averages.
        updates = [u for chunk in chunks for u in self._scaled_gradients(
            chunk, group, self.state[chunk.params[0]]["step"] ** group["beta2_decay"]).unbind(0)]
        ordered = [p for chunk in chunks for p in chunk.params]
        sizes = [size for chunk in chunks for size in chunk.sizes]
        # Clip each update to RMS <= clip, then scale it by its tensor's RMS (taken before the decay).
        update_rms = torch._foreach_div(torch._foreach_norm(updates), [size * group["clip"] for size in sizes])
        factors = torch._foreach_div(torch._foreach_norm(ordered), sizes)
        torch._foreach_clamp_min_(factors, group["eps2"])
        torch._foreach_clamp_min_(update_rms, 1.0)
        torch._foreach_div_(factors, update_rms)
        torch._foreach_mul_(updates, factors)
        if group["weight_decay"]:
            torch._foreach_mul_(ordered, 1.0 - group["lr"] * group["weight_decay"])
        torch._foreach_add_(ordered, updates, alpha=-group["lr"])

    def _scaled_gradients(self, chunk: Chunk, group: dict, new_weight: float) -> torch.Tensor:
        """The chunk's gradients, stacked, each divided by the root of its second moment, which is factored into
        row and column means for matrices (memory: rows + columns instead of rows x columns)."""
        grads = torch.stack([p.grad for p in chunk.params])
        if grads.dtype != torch.float32:
            grads = grads.float()
        squared = grads.square().add_(group["eps1"])
        if not chunk.factored:
            variance, = chunk.moments
            variance.lerp_(squared, new_weight)
            return grads.mul_(variance.rsqrt())
        row, col = chunk.moments
        row.lerp_(squared.mean(dim=-1), new_weight)
        col.lerp_(squared.mean(dim=-2), new_weight)
        del squared  # before the denominator: one chunk-sized temporary at a time
        normalised_row = row / row.mean(dim=-1, keepdim=True)
        return grads.mul_(torch.mul(normalised_row.unsqueeze(-1), col.unsqueeze(-2)).rsqrt_())

    def _chunks_of(self, params: list) -> list:
        """`params` in chunks of one shape and step count, at most `max_chunk_bytes` each (cached)."""
        key = tuple(map(id, params))
        if key not in self._chunks:
            for p in params:
                if not self.state[p]:
                    self._init_state(p)
            by_kind = {}
            for p in params:
                by_kind.setdefault((tuple(p.shape), self.state[p]["step"]), []).append(p)
            chunks = []
            for members in by_kind.values():
                per_chunk = max(1, self.max_chunk_bytes // (members[0].numel() * 4))
                chunks += [self._stacked(members[i:i + per_chunk]) for i in range(0, len(members), per_chunk)]
            self._chunks[key] = chunks
        return self._chunks[key]

    def _init_state(self, p: torch.Tensor) -> None:
        state = self.state[p]
        state["step"] = 0
        if p.ndim >= 2:
            state["row"] = torch.zeros(p.shape[:-1], dtype=torch.float32, device=p.device)
            state["col"] = torch.zeros(p.shape[:-2] + p.shape[-1:], dtype=torch.float32, device=p.device)
        else:
            state["variance"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)

    def _stacked(self, params: list) -> Chunk:
        """One buffer per moment for the chunk; each parameter's state then holds views of its rows."""
        names = ("row", "col") if params[0].ndim >= 2 else ("variance",)
        moments = []
        for name in names:
            stacked = torch.stack([self.state[p][name] for p in params])
            for index, p in enumerate(params):
                self.state[p][name] = stacked[index]
            moments.append(stacked)
        return Chunk(params, moments, [p.numel() ** 0.5 for p in params])
