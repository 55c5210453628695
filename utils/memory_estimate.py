"""GPU memory of one training process, worked out without a GPU (for `plan`).

A process holds, between micro-batches, 16 bytes per parameter: fp32 weights (4), the gradients kept from one
micro-batch to the next while accumulating (4) and AdamW's two moments (8). On top of that each micro-batch needs
its activations: what the forward pass saves for the backward pass plus the transient tensors of the backward
pass (the largest: two fp32 gradients over the whole vocabulary for every token, at the loss).

The activations are measured by the probe: the real model (`model.t5.build_model`) runs the real loss
(`utils.evaluation.token_loss_sum`) forward and backward on fake tensors, which carry shapes and dtypes but no
data, so the full model at full sequence length costs seconds and no memory; a dispatch mode adds up the bytes of
every tensor storage while it lives and keeps the peak. On a tiny model this equals the peak of a real CPU step
byte for byte (tests/test_plan_plot.py). Mixed precision runs under CPU autocast, which lowers the same T5 ops
(matmul, linear) to 16 bits as CUDA autocast does. Without the probe, `analytic_activations` uses bytes-per-token
coefficients counted by the probe on transformers' T5.
"""
import weakref
from dataclasses import dataclass

GIB = 1024**3
WEIGHT_BYTES, GRADIENT_BYTES, ADAM_BYTES = 4, 4, 8  # per parameter, all fp32
# DDP reduces gradients through buckets that are a second copy of them (Accelerate leaves
# gradient_as_bucket_view off), allocated at the first backward pass and kept.
DDP_BUCKET_BYTES = 4
# The CUDA context and cuBLAS workspaces: on the card (nvidia-smi) but outside PyTorch's allocator.
CUDA_CONTEXT_BYTES = GIB // 2
# Bytes per token of activations (both sequences have max_seq_len tokens), counted by the probe. Per encoder or
# decoder layer: coefficients of d_model, d_ff, num_heads x d_kv and num_heads x max_seq_len (attention scores,
# whose size grows with the square of the sequence); decoder layers hold self- and cross-attention. Outside the
# layers: the embeddings' and the final layer's tensors (per d_model) and the fp32 log-probabilities over the
# vocabulary, plus, at the start of the backward pass, their gradient and the logits' gradient (8 per entry).
# Under 16-bit autocast the residual stream, layer norms and softmax stay fp32, so activations shrink far less
# than half, and autocast keeps a 16-bit copy of the weights (2 bytes per parameter) through the step.
_PER_TOKEN = {
    "fp32": dict(encoder=(32, 12, 16, 12), decoder=(48, 12, 32, 24), outside_d_model=42, weight_copy=0),
    "16-bit": dict(encoder=(28, 6, 14, 12), decoder=(44, 6, 28, 24), outside_d_model=36, weight_copy=2),
}
_VOCAB_SAVED, _VOCAB_BACKWARD = 4, 8


@dataclass
class Activations:
    """Peak bytes of one micro-batch: `fixed + per_row * rows`, measured by the probe or counted analytically."""

    fixed: int  # independent of the rows: autocast's 16-bit weight copy, T5's position bias
    per_row: int
    method: str  # "probe" or "analytic"

    def at(self, rows: int) -> int:
        return self.fixed + self.per_row * rows


def autocast_dtype_name(mixed_precision: str) -> str | None:
    """The 16-bit type a GPU run computes its matmuls in, or None for fp32."""
    return {"bf16": "bfloat16", "fp16": "float16"}.get(mixed_precision)


def analytic_activations(model_cfg, vocab: int, seq_len: int, mixed_precision: str, parameters: int) -> Activations:
    coefficients = _PER_TOKEN["16-bit" if autocast_dtype_name(mixed_precision) else "fp32"]
    d, heads = model_cfg.d_model, model_cfg.num_heads
    widths = (d, model_cfg.d_ff, heads * model_cfg.d_kv, heads * seq_len)
    layer = lambda kind: sum(c * w for c, w in zip(coefficients[kind], widths))
    per_token = (model_cfg.num_layers * layer("encoder") + model_cfg.num_decoder_layers * layer("decoder")
                 + coefficients["outside_d_model"] * d + (_VOCAB_SAVED + _VOCAB_BACKWARD) * vocab)
    return Activations(fixed=coefficients["weight_copy"] * parameters, per_row=per_token * seq_len,
                       method="analytic")


class _SizedVocabulary:
    """What `model.t5.t5_config` reads from a tokenizer: its size and special ids (their values cost nothing)."""

    pad_token_id, eos_token_id = 0, 1

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


def _peak_tracker():
    """A dispatch mode that follows every storage created under it from allocation to release."""
    from torch import Tensor
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class PeakBytes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live, self.peak, self.tracked = 0, 0, set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            # Views and in-place results share an input's storage: counted already, or older than the step.
            inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
            for tensor in tree_leaves(out):
                if isinstance(tensor, Tensor):
                    self._track(tensor.untyped_storage(), inputs)
            return out

        def _track(self, storage, inputs: set) -> None:
            key = id(storage)
            if key in inputs or key in self.tracked:
                return
            size = storage.nbytes()
            self.tracked.add(key)
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, key, size)

        def _release(self, key: int, size: int) -> None:
            self.tracked.discard(key)
            self.live -= size

    return PeakBytes()


def step_peak_bytes(model, rows: int, seq_len: int, mixed_precision: str, fake_mode=None) -> int:
    """Peak bytes allocated by one forward and backward pass of `model` on `rows` rows of `seq_len` tokens.

    With `fake_mode` (the FakeTensorMode the model was built in) nothing is computed; without it the step runs
    for real on the CPU, which is how the tests check the fake figure.
    """
    import contextlib

    import torch

    from utils.evaluation import token_loss_sum

    dtype = autocast_dtype_name(mixed_precision)
    model.train()
    model.zero_grad(set_to_none=True)
    with fake_mode or contextlib.nullcontext():
        tokens = torch.randint(2, len(model.get_input_embeddings().weight), (rows, seq_len))
        with _peak_tracker() as tracker:
            with torch.autocast("cpu", dtype=getattr(torch, dtype or "bfloat16"), enabled=dtype is not None):
                # No attention mask: transformers asks a mask whether it is all ones, which fake tensors cannot
                # answer; the mask itself is rows x seq_len integers, nothing next to the activations.
                loss, _ = token_loss_sum(model, tokens, None, tokens)
            loss.backward()
    model.zero_grad(set_to_none=True)
    return tracker.peak


def probe_activations(model_cfg, vocab: int, seq_len: int, mixed_precision: str) -> Activations:
    """Measure the configured model at 1 and 2 rows on fake tensors; sizes are linear in the rows beyond that."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from model.t5 import build_model

    fake_mode = FakeTensorMode()
    with fake_mode:
        model = build_model(model_cfg, _SizedVocabulary(vocab))
    one, two = (step_peak_bytes(model, rows, seq_len, mixed_precision, fake_mode) for rows in (1, 2))
    return Activations(fixed=2 * one - two, per_row=two - one, method="probe")


@dataclass
class GpuMemory:
    """One process's GPU memory in bytes, part by part."""

    parts: dict  # label -> bytes, in the order a reader adds them up
    activations: Activations

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def gpu_memory(parameters: int, activations: Activations, rows: int, num_processes: int) -> GpuMemory:
    parts = {
        "weights (fp32)": WEIGHT_BYTES * parameters,
        "gradients (fp32)": GRADIENT_BYTES * parameters,
        "AdamW moments (fp32)": ADAM_BYTES * parameters,
        "activations of a micro-batch": activations.at(rows),
    }
    if num_processes > 1:
        parts["DDP gradient buckets"] = DDP_BUCKET_BYTES * parameters
    parts["CUDA context"] = CUDA_CONTEXT_BYTES
    return GpuMemory(parts, activations)

