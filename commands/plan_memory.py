"""GPU memory of one training process, worked out without a GPU (for `plan`).

A process holds, between micro-batches, 16 bytes per parameter: fp32 weights (4), the gradients kept from one
micro-batch to the next while accumulating (4) and AdamW's two moments (8). On top of that each micro-batch needs
its activations: what the forward pass saves for the backward pass plus the transient tensors of the backward
pass (the largest: two fp32 gradients over the whole vocabulary for every token, at the loss).

The activations are measured by the probe: the real model (`model.t5.build_model`) runs the real loss
(`model.loss.token_loss_sum`) forward and backward on fake tensors, which carry shapes and dtypes but no
data, so the full model at full sequence length costs seconds and no memory; a dispatch mode adds up the bytes of
every tensor storage while it lives and keeps the peak. On a tiny model this equals the peak of a real CPU step
byte for byte (tests/test_plan_plot.py). Mixed precision runs under CPU autocast, which lowers the same T5 ops
(matmul, linear) to 16 bits as CUDA autocast does. Without the probe, `AnalyticActivations` uses bytes-per-token
coefficients counted by the probe on transformers' T5.
"""
import contextlib
import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from model.loss import token_loss_sum
from model.t5 import StandInTokenizer, build_model

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


def autocast_dtype_name(mixed_precision: str) -> str | None:
    """The 16-bit type a GPU run computes its matmuls in, or None for fp32."""
    return {"bf16": "bfloat16", "fp16": "float16"}.get(mixed_precision)


class AnalyticActivations:
    """Activation bytes from the per-token coefficients above: instant, within a few percent of the probe."""

    method = "analytic"

    def __init__(self, model_cfg, vocab: int, mixed_precision: str, parameters: int):
        self.model_cfg, self.vocab, self.parameters = model_cfg, vocab, parameters
        self.coefficients = _PER_TOKEN["16-bit" if autocast_dtype_name(mixed_precision) else "fp32"]

    def bytes(self, rows: int, seq_len: int) -> int:
        cfg, coefficients = self.model_cfg, self.coefficients
        widths = (cfg.d_model, cfg.d_ff, cfg.num_heads * cfg.d_kv, cfg.num_heads * seq_len)
        layer = lambda kind: sum(c * w for c, w in zip(coefficients[kind], widths))
        per_token = (cfg.num_layers * layer("encoder") + cfg.num_decoder_layers * layer("decoder")
                     + coefficients["outside_d_model"] * cfg.d_model + (_VOCAB_SAVED + _VOCAB_BACKWARD) * self.vocab)
        return coefficients["weight_copy"] * self.parameters + per_token * rows * seq_len



class PeakBytes(TorchDispatchMode):
    """Follows every tensor storage created under it from allocation to release, and keeps the peak.

    Gradients are forgotten as soon as they reach their parameter: they count among the 16 bytes per parameter,
    and left in they would move the peak of small batches to the end of the backward pass.
    """

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.sizes = 0, 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Views and in-place results share an input's storage: counted already, or older than the step.
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and id(tensor.untyped_storage()) not in inputs:
                self._track(tensor.untyped_storage())
        return out

    def _track(self, storage) -> None:
        if id(storage) in self.sizes:
            return
        self.sizes[id(storage)] = storage.nbytes()
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self.forget, id(storage))

    def forget(self, key: int) -> None:
        self.live -= self.sizes.pop(key, 0)


def step_peak_bytes(model, rows: int, seq_len: int, mixed_precision: str, fake_mode=None) -> int:
    """Peak bytes allocated by one forward and backward pass of `model` on `rows` rows of `seq_len` tokens.

    With `fake_mode` (the FakeTensorMode the model was built in) nothing is computed; without it the step runs
    for real on the CPU, which is how the tests check the fake figure.
    """
    dtype = autocast_dtype_name(mixed_precision)
    model.train()
    model.zero_grad(set_to_none=True)
    with fake_mode or contextlib.nullcontext():
        tokens = torch.randint(2, len(model.get_input_embeddings().weight), (rows, seq_len))
        tracker = PeakBytes()
        hooks = [parameter.register_post_accumulate_grad_hook(lambda p: tracker.forget(id(p.grad.untyped_storage())))
                 for parameter in model.parameters()]
        with tracker:
            with torch.autocast("cpu", dtype=getattr(torch, dtype or "bfloat16"), enabled=dtype is not None):
                # No attention mask: transformers asks a mask whether it is all ones, which fake tensors cannot
                # answer; the mask itself is rows x seq_len integers, nothing next to the activations.
                loss, _ = token_loss_sum(model, tokens, None, tokens)
            loss.backward()
    for hook in hooks:
        hook.remove()
    model.zero_grad(set_to_none=True)
    return tracker.peak


class ProbedActivations:
    """Activation bytes measured on the configured model, built once on fake tensors (a few seconds a figure).

    Each figure is measured at its own batch size: a fixed-size transient (the tied embedding's gradient) is the
    peak of small batches, so a small batch scaled up would miss the peak of a large one.
    """

    method = "probe"

    def __init__(self, model_cfg, vocab: int, mixed_precision: str):
        self.mixed_precision = mixed_precision
        self.fake_mode = FakeTensorMode()
        with self.fake_mode:
            self.model = build_model(model_cfg, StandInTokenizer(vocab))

    def bytes(self, rows: int, seq_len: int) -> int:
        return step_peak_bytes(self.model, rows, seq_len, self.mixed_precision, self.fake_mode)


def gpu_memory(parameters: int, activation_bytes: int, num_processes: int) -> dict:
    """One process's GPU memory in bytes, part by part, in the order a reader adds them up."""
    return {
        "weights": WEIGHT_BYTES * parameters,
        "gradients": GRADIENT_BYTES * parameters,
        "adam_moments": ADAM_BYTES * parameters,
        "activations": activation_bytes,
        "ddp_buckets": DDP_BUCKET_BYTES * parameters if num_processes > 1 else 0,
        "cuda_context": CUDA_CONTEXT_BYTES,
    }
