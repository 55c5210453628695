"""The T5 encoder-decoder, built from `T5ModelConfig` and the tokenizer (no hub download)."""
import dataclasses

from transformers import T5Config, T5ForConditionalGeneration


class StandInTokenizer:
    """What `build_model` reads from a tokenizer (its size, pad and EOS ids): enough to size a model without one."""

    pad_token_id, eos_token_id = 0, 1

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


def t5_config(model_cfg, tokenizer) -> T5Config:
    """Vocabulary and special ids come from *our* tokenizer: pad starts the decoder, `[EOS]` ends generation."""
    return T5Config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        feed_forward_proj="relu",
        tie_word_embeddings=True,
        **dataclasses.asdict(model_cfg),
    )


def build_model(model_cfg, tokenizer) -> T5ForConditionalGeneration:
    model = T5ForConditionalGeneration(t5_config(model_cfg, tokenizer))
    # Greedy decoding that stops at our [EOS]: the defaults evaluation and `generate` rely on.
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.decoder_start_token_id = tokenizer.pad_token_id
    return model


def count_parameters(model) -> int:
    """Unique parameters: the tied input embedding and output projection count once."""
    return sum(p.numel() for p in model.parameters())


def parameter_shapes(model_cfg, vocab_size: int) -> list[tuple]:
    """The shape of every parameter `build_model` would make, without allocating it (a model on the meta device)."""
    import torch

    with torch.device("meta"):
        model = build_model(model_cfg, StandInTokenizer(vocab_size))
    return [tuple(parameter.shape) for parameter in model.parameters()]


def estimate_parameters(model_cfg, vocab_size: int) -> int:
    """The parameter count `build_model` would give, without building it (for `plan` and pre-flight)."""
    d, inner, buckets = model_cfg.d_model, model_cfg.num_heads * model_cfg.d_kv, model_cfg.relative_attention_num_buckets
    attention = 4 * d * inner + d  # q, k, v, o and the layer norm in front
    feed_forward = 2 * d * model_cfg.d_ff + d
    encoder = model_cfg.num_layers * (attention + feed_forward) + buckets * model_cfg.num_heads + d
    decoder = model_cfg.num_decoder_layers * (2 * attention + feed_forward) + buckets * model_cfg.num_heads + d
    return vocab_size * d + encoder + decoder
