"""The two computations of serve's step decoder, written directly on a transformers T5's weights: the prompts'
encoding (with every decoder layer's cross-attention keys and values), and one decoder step for a batch of rows,
each one new token against a key/value cache.

Why not the model's own forward: a step decodes one token per request, so on a small model (or a GPU) a step's
time is the cost of calling small operations one after the other, and transformers' T5 path (masks built by
generic helpers, a cache object's bookkeeping, output records, module calls at every level) spends most of it in
Python. Here a step is ~12 operations per layer. The weights are prepared once: transposed to the layout in which
a small matrix product is fastest (half the time of `F.linear` on a CPU), the query, key and value projections of
a self-attention joined into one product, and each RMS norm's scale (and the tied head's d_model^-0.5) folded into
the projections that follow it. That is a second copy of the weights in memory. The arithmetic is otherwise T5's,
as transformers does it: RMS norms (fp32, eps inside the root), unscaled attention with the relative position
bias added to the scores (through scaled_dot_product_attention, as transformers' sdpa path), ReLU or gated
feed-forward, an fp32 residual stream under autocast. The position buckets and bias come from the model's own
attention modules (`compute_bias`). tests/test_decoding.py checks the logits against the model's forward and the
answers against `generate`, token for token.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def folded(norm, *linears) -> torch.Tensor:
    """The linears' weights as one (d_in, d_out) matrix, each input row scaled by the norm's weight before them."""
    joined = torch.cat([linear.weight.detach() for linear in linears], dim=0)
    return (joined * norm.weight.detach()[None, :]).t().contiguous()


def transposed(linear) -> torch.Tensor:
    return linear.weight.detach().t().contiguous()


@dataclass
class Layer:
    """One T5 block's prepared weights (decoder blocks have the cross-attention ones)."""

    self_projections: torch.Tensor  # (d_model, 3 × inner): query, key, value after the first norm
    self_output: torch.Tensor
    ff_in: torch.Tensor  # (d_model, d_ff), or (d_model, 2 × d_ff) for a gated feed-forward
    ff_out: torch.Tensor
    activation: object
    gated: bool
    cross_query: torch.Tensor | None = None
    cross_output: torch.Tensor | None = None


def prepare_layer(block, decoder: bool) -> Layer:
    self_layer, ff_layer = block.layer[0], block.layer[-1]
    attention, dense = self_layer.SelfAttention, ff_layer.DenseReluDense
    gated = hasattr(dense, "wi_0")  # T5 v1.1's gated-gelu
    layer = Layer(self_projections=folded(self_layer.layer_norm, attention.q, attention.k, attention.v),
                  self_output=transposed(attention.o),
                  ff_in=folded(ff_layer.layer_norm, *((dense.wi_0, dense.wi_1) if gated else (dense.wi,))),
                  ff_out=transposed(dense.wo), gated=gated,
                  # the function, not the module: a module call costs more than ReLU itself on a step's rows
                  activation=torch.relu if type(dense.act) is torch.nn.ReLU else dense.act)
    if decoder:
        cross_layer = block.layer[1]
        layer.cross_query = folded(cross_layer.layer_norm, cross_layer.EncDecAttention.q)
        layer.cross_output = transposed(cross_layer.EncDecAttention.o)
    return layer


class T5Steps:
    def __init__(self, model):
        config = model.config
        self.heads, self.d_kv = config.num_heads, config.d_kv
        self.inner = self.heads * self.d_kv
        with torch.no_grad():
            self.embedding = model.shared.weight.detach()
            self.eps = torch.tensor(config.layer_norm_epsilon, device=self.embedding.device)
            self.encoder = [prepare_layer(block, decoder=False) for block in model.encoder.block]
            self.decoder = [prepare_layer(block, decoder=True) for block in model.decoder.block]
            cross = [block.layer[1].EncDecAttention for block in model.decoder.block]
            # Every decoder layer's cross-attention keys and values, from the encoder's final norm, in one product.
            self.cross_projections = folded(model.encoder.final_layer_norm,
                                            *[attention.k for attention in cross], *[attention.v for attention in cross])
            output_scale = config.d_model ** -0.5 if config.scale_decoder_outputs else 1.0
            self.head = (transposed(model.lm_head) * model.decoder.final_layer_norm.weight.detach()[:, None]
                         * output_scale).contiguous()
        self.encoder_positions = model.encoder.block[0].layer[0].SelfAttention
        self.decoder_positions = model.decoder.block[0].layer[0].SelfAttention
        self.encoder_bias = torch.zeros((1, self.heads, 0, 0))  # (1, heads, n, n), sliced for shorter prompts
        self.bias_by_distance = torch.zeros((self.heads, 0))  # decoder bias, column j: distance width - 1 - j

    def normalized(self, hidden: torch.Tensor) -> torch.Tensor:
        """T5's RMS norm without its scale (folded into the next projection): in fp32, eps inside the root.
        x / sqrt(|x|² / d + eps) in three calls: half the time of torch's rms_norm on a CPU (equal to 2e-7)."""
        hidden = hidden.float()
        length = torch.linalg.vector_norm(hidden, dim=-1, keepdim=True)
        return hidden * torch.addcmul(self.eps, length, length, value=1 / hidden.shape[-1]).rsqrt_()

    def feed_forward(self, layer: Layer, hidden: torch.Tensor) -> torch.Tensor:
        inner = torch.mm(self.normalized(hidden), layer.ff_in)
        if layer.gated:
            gate, linear = inner.chunk(2, dim=-1)
            inner = layer.activation(gate) * linear
        else:
            inner = layer.activation(inner)
        return hidden + torch.mm(inner, layer.ff_out)

    def attend(self, query, keys, values, scores_mask: torch.Tensor) -> torch.Tensor:
        """(rows, heads, queries, d_kv) → (rows × queries, inner): T5's unscaled attention, the position bias
        and the mask already in `scores_mask`."""
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=scores_mask, scale=1.0)
        return out.transpose(1, 2).reshape(-1, self.inner)

    @staticmethod
    def masked(bias: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        return torch.where(allowed, bias, torch.finfo(bias.dtype).min)

    def by_head(self, projected: torch.Tensor, rows: int) -> torch.Tensor:
        """(rows × length, inner) → (rows, heads, length, d_kv)."""
        return projected.view(rows, -1, self.heads, self.d_kv).transpose(1, 2)

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts (rows, length), right-padded, → every decoder layer's cross-attention keys and values,
        each (layers, rows, heads, length, d_kv)."""
        rows, length = ids.shape
        if self.encoder_bias.shape[-1] < length:  # the bias of j - i: a longer prompt's top-left corner is ours
            longest = max(2 * length, 64)
            self.encoder_bias = self.encoder_positions.compute_bias(longest, longest, device=ids.device)
        scores_mask = self.masked(self.encoder_bias[:, :, :length, :length], mask[:, None, None, :])
        hidden = self.embedding.index_select(0, ids.view(-1))
        for layer in self.encoder:
            query, keys, values = torch.mm(self.normalized(hidden), layer.self_projections).split(self.inner, -1)
            attended = self.attend(*(self.by_head(part, rows) for part in (query, keys, values)), scores_mask)
            hidden = self.feed_forward(layer, hidden + torch.mm(attended, layer.self_output))
        layers = len(self.decoder)
        projected = torch.mm(self.normalized(hidden), self.cross_projections)
        # (rows × length, 2 × layers × inner) → keys and values, each (layers, rows, heads, length, d_kv)
        split = projected.view(rows, length, 2, layers, self.heads, self.d_kv).permute(2, 3, 0, 4, 1, 5)
        return split[0], split[1]

    def decoder_bias(self, width: int) -> torch.Tensor:
        """(heads, width): the self-attention bias of the token decoded at column width - 1 for keys at columns
        0 .. width - 1. Computed for twice the width when it grows, then sliced."""
        if self.bias_by_distance.shape[1] < width:
            longest = max(2 * width, 64)
            bias = self.decoder_positions.compute_bias(1, longest, device=self.embedding.device,
                                                       past_seen_tokens=longest - 1)
            self.bias_by_distance = bias[0, :, 0]
        return self.bias_by_distance[:, -width:]

    def decode(self, ids: torch.Tensor, cache, column: int) -> torch.Tensor:
        """One decoder step: `ids` (rows,) the tokens at `column`, each row's keys and values written there into
        `cache` (a DecodingCache: self-attention buffers, cross-attention keys and values, the masks of both);
        returns the logits of the next token (rows, vocabulary)."""
        rows, width = ids.shape[0], column + 1
        self_mask = self.decoder_bias(width)[None, :, None, :] + cache.self_scores_mask[:, None, None, :width]
        hidden = self.embedding.index_select(0, ids)
        for index, layer in enumerate(self.decoder):
            query, key, value = torch.mm(self.normalized(hidden), layer.self_projections).split(self.inner, -1)
            keys, values = cache.self_keys[index], cache.self_values[index]
            keys[:, :, column] = key.view(rows, self.heads, self.d_kv)
            values[:, :, column] = value.view(rows, self.heads, self.d_kv)
            attended = self.attend(query.view(rows, self.heads, 1, self.d_kv), keys[:, :, :width],
                                   values[:, :, :width], self_mask)
            hidden = hidden + torch.mm(attended, layer.self_output)
            query = torch.mm(self.normalized(hidden), layer.cross_query).view(rows, self.heads, 1, self.d_kv)
            attended = self.attend(query, cache.cross_keys[index], cache.cross_values[index],
                                   cache.cross_scores_mask)
            hidden = self.feed_forward(layer, hidden + torch.mm(attended, layer.cross_output))
        return torch.mm(self.normalized(hidden), self.head)
