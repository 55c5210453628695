"""GPU memory of one training process, worked out without a GPU (for `plan`).

A process holds, between micro-batches, 8 bytes per parameter plus the optimizer's state: fp32 weights (4), the
gradients kept from one micro-batch to the next while accumulating (4), and AdamW's two moments (8 more) or the
Adafactors' factored second moments (a row and a column per matrix: a few MB for the large model). On top of that each micro-batch needs
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
import unittest.mock
import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from model.loss import token_loss_sum
from model.preference import answer_logps
from model.t5 import StandInTokenizer, build_model, freeze

GIB = 1024**3
GPU_BUDGET_BYTES = 20 * GIB  # the user's cards (the guide: 3 x 20 GB)
WEIGHT_BYTES, GRADIENT_BYTES = 4, 4  # per parameter, fp32 (the optimizer's state: `training.optim.state_bytes`)
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
# Bytes per attention-score element (rows x heads x query x key tokens, per attention) that only the CPU's math
# attention keeps at the peak, fitted to the probe with and without `EfficientAttention` (within 0.3% for the
# guide's model at its length): the coefficients above count the CPU's path.
_CPU_ONLY_ATTENTION_BYTES = {"fp32": 10.6, "16-bit": 13.3}
# Bytes per element of the masks CUDA's kernel keeps when a row is padded: the position bias expanded to every row
# (rows x heads x query x key, in the encoder's attentions and the decoder's cross-attentions), in the kernel's
# input type; fitted to the probe (which the CPU's path already counts among its scores).
_PADDING_MASK_BYTES = {"fp32": 3.93, "16-bit": 1.96}


def autocast_dtype_name(mixed_precision: str) -> str | None:
    """The 16-bit type a GPU run computes its matmuls in, or None for fp32."""
    return {"bf16": "bfloat16", "fp16": "float16"}.get(mixed_precision)


class AnalyticActivations:
    """Activation bytes from the per-token coefficients above: instant, within a few percent of the probe."""

    method = "analytic"

    def __init__(self, model_cfg, vocab: int, mixed_precision: str, parameters: int, cuda_attention: bool = True):
        self.model_cfg, self.vocab, self.parameters = model_cfg, vocab, parameters
        self.precision = "16-bit" if autocast_dtype_name(mixed_precision) else "fp32"
        self.coefficients = _PER_TOKEN[self.precision]
        self.cuda_attention = cuda_attention

    def bytes(self, rows: int, seq_len: int, target_len: int | None = None, answers: int = 1) -> int:
        """`target_len`: the decoder's tokens when they differ from the encoder's `seq_len` (span corruption). The
        coefficients were counted with equal lengths; with unequal ones the decoder's attention scores and the
        tensors outside the layers are taken at the mean of the two lengths (an approximation the probe avoids).
        `answers`: decoder rows per encoder row (2 for a preference pair)."""
        cfg, coefficients = self.model_cfg, self.coefficients
        target = target_len or seq_len
        mean = (seq_len + target) / 2

        def layer(kind: str, keys: float) -> float:
            widths = (cfg.d_model, cfg.d_ff, cfg.num_heads * cfg.d_kv, cfg.num_heads * keys)
            return sum(c * w for c, w in zip(coefficients[kind], widths))

        encoder_bytes = cfg.num_layers * layer("encoder", seq_len) * seq_len
        decoder_bytes = (cfg.num_decoder_layers * layer("decoder", mean) * target
                         + coefficients["outside_d_model"] * cfg.d_model * mean
                         + (_VOCAB_SAVED + _VOCAB_BACKWARD) * self.vocab * target)
        total = coefficients["weight_copy"] * self.parameters + (encoder_bytes + answers * decoder_bytes) * rows
        if self.cuda_attention:
            decoder_scores = cfg.num_decoder_layers * (target**2 + target * seq_len)
            scores = cfg.num_layers * seq_len**2 + answers * decoder_scores
            masked = cfg.num_layers * seq_len**2 + answers * cfg.num_decoder_layers * target * seq_len
            total -= rows * cfg.num_heads * (_CPU_ONLY_ATTENTION_BYTES[self.precision] * scores
                                             - _PADDING_MASK_BYTES[self.precision] * masked)
        return round(total)


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


class EfficientAttention(torch.autograd.Function):
    """What CUDA's memory-efficient attention kernel allocates and keeps, standing in for it in the probe.

    On a GPU, `scaled_dot_product_attention` with T5's float position-bias mask runs the memory-efficient kernel
    (flash attention takes no float mask): it keeps query, key, value, the mask, the output and one log-sum-exp per
    query row for the backward pass, never the attention probabilities, and applies dropout inside. The CPU's math
    path instead stores the probabilities and their dropout mask for every layer (both grow with the square of the
    sequence), so a probe on the CPU's own kernel overstates a GPU run.
    """

    @staticmethod
    def forward(ctx, query, key, value, mask):
        output = query.new_empty(*query.shape[:-1], value.shape[-1])
        log_sum_exp = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, mask, output, log_sum_exp)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, mask, _, _ = ctx.saved_tensors
        grad_mask = torch.empty_like(mask) if ctx.needs_input_grad[3] else None
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value), grad_mask


def efficient_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                        enable_gqa=False):
    """`scaled_dot_product_attention` as the memory-efficient kernel allocates it, autocast included (which casts
    every floating input, the mask too, to the 16-bit type)."""
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        query, key, value = (t.to(dtype) for t in (query, key, value))
        attn_mask = attn_mask.to(dtype) if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
    return EfficientAttention.apply(query, key, value, attn_mask)


def step_peak_bytes(model, rows: int, seq_len: int, mixed_precision: str, fake_mode=None,
                    cuda_attention: bool = False, target_len: int | None = None, answers: int = 1) -> int:
    """Peak bytes allocated by one forward and backward pass of `model` on `rows` rows of `seq_len` input tokens
    and `target_len` (default: `seq_len`) target tokens, with an attention mask: the worst case, a batch with a
    padded row (T5 then expands its position bias into a mask for every row, in the encoder's attentions and the
    decoder's cross-attentions; without padding no mask is passed).

    With `fake_mode` (the FakeTensorMode the model was built in) nothing is computed; without it the step runs
    for real on the CPU, which is how the tests check the fake figure. `cuda_attention` models the attention
    kernel a CUDA run uses (`EfficientAttention`) instead of the CPU's. `answers` 2: each row is a preference
    pair's prompt, encoded once, with two answers through the decoder (`model.preference.answer_logps`).
    """
    dtype = autocast_dtype_name(mixed_precision)
    model.train()
    model.zero_grad(set_to_none=True)
    with fake_mode or contextlib.nullcontext():
        vocab = len(model.get_input_embeddings().weight)
        tokens = torch.randint(2, vocab, (rows, seq_len))
        targets = tokens if target_len is None and answers == 1 else torch.randint(
            2, vocab, (answers * rows, target_len or seq_len))
        tracker = PeakBytes()
        hooks = [parameter.register_post_accumulate_grad_hook(lambda p: tracker.forget(id(p.grad.untyped_storage())))
                 for parameter in model.parameters() if parameter.requires_grad]
        attention = (unittest.mock.patch.object(torch.nn.functional, "scaled_dot_product_attention",
                                                efficient_attention) if cuda_attention else contextlib.nullcontext())
        with tracker, attention:
            with torch.autocast("cpu", dtype=getattr(torch, dtype or "bfloat16"), enabled=dtype is not None):
                mask = torch.ones(rows, seq_len, dtype=torch.long)
                loss = (answer_logps(model, tokens, mask, targets).sum() if answers == 2
                        else token_loss_sum(model, tokens, mask, targets)[0])
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

    def __init__(self, model_cfg, vocab: int, mixed_precision: str, cuda_attention: bool = True,
                 frozen: str = "none"):
        self.mixed_precision, self.cuda_attention = mixed_precision, cuda_attention
        self.fake_mode = FakeTensorMode()
        with self.fake_mode:
            self.model = build_model(model_cfg, StandInTokenizer(vocab))
        freeze(self.model, frozen)  # a frozen encoder keeps no activations for a backward pass

    def bytes(self, rows: int, seq_len: int, target_len: int | None = None, answers: int = 1) -> int:
        return step_peak_bytes(self.model, rows, seq_len, self.mixed_precision, self.fake_mode, self.cuda_attention,
                               target_len, answers)


def window_rows(cfg, rows: int) -> int:
    """Rows a data window holds: the buffer, or the whole file when it is smaller."""
    return min(cfg.dataloader_buffer_size, rows)


def gpu_memory(parameters: int, trainable: int, optimizer_bytes: int, activation_bytes: int) -> dict:
    """One process's GPU memory in bytes, part by part, in the order a reader adds them up: gradients only for the
    `trainable` parameters. With several processes the gradients are views into DDP's all-reduce buckets
    (`gradient_as_bucket_view`): no second copy."""
    return {
        "weights": WEIGHT_BYTES * parameters,
        "gradients": GRADIENT_BYTES * trainable,
        "optimizer_state": optimizer_bytes,
        "activations": activation_bytes,
        "cuda_context": CUDA_CONTEXT_BYTES,
    }
