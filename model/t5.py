"""The T5 encoder-decoder, built from `T5ModelConfig` and the tokenizer (no hub download)."""
import dataclasses

from transformers import T5Config, T5ForConditionalGeneration

from utils.errors import UserError


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


# What each --freeze choice keeps fixed. The shared embedding is also the encoder's and decoder's input embedding
# and, tied, the output projection: freezing it freezes all four.
FROZEN_MODULES = {"none": (), "embeddings": ("shared",), "encoder": ("shared", "encoder")}


def with_generation_defaults(model, tokenizer) -> T5ForConditionalGeneration:
    """Greedy decoding that stops at our [EOS]: the defaults evaluation and `generate` rely on."""
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.decoder_start_token_id = tokenizer.pad_token_id
    return model


def build_model(model_cfg, tokenizer) -> T5ForConditionalGeneration:
    return with_generation_defaults(T5ForConditionalGeneration(t5_config(model_cfg, tokenizer)), tokenizer)


def load_model(model_cfg, tokenizer, model_dir: str) -> T5ForConditionalGeneration:
    """`build_model`'s architecture with the weights saved in `model_dir` (whose shape `model_cfg` already has):
    a run started from it resumes like any other. Every weight must be there: none is left at random."""
    try:
        model, loading = T5ForConditionalGeneration.from_pretrained(
            model_dir, config=t5_config(model_cfg, tokenizer), output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise UserError(f"--init_from={model_dir}: the weights do not load ({str(error).strip()[:300]})") from None
    unfit = sorted(loading["missing_keys"]) + sorted(loading["unexpected_keys"]) + sorted(loading["mismatched_keys"])
    if unfit:
        raise UserError(f"--init_from={model_dir}: its weights do not fit the model its config.json describes "
                        f"({len(unfit)} tensors missing, unexpected or of another shape, e.g. {unfit[0]})")
    # Training keeps fp32 weights whatever the saved dtype; from_pretrained hands the model over in eval mode, and
    # training must see dropout, as a built model does.
    return with_generation_defaults(model.float().train(), tokenizer)


def freeze(model, part: str) -> int:
    """Stop `part` (a --freeze choice) from training; return the count of parameters that still train."""
    for name in FROZEN_MODULES[part]:
        getattr(model, name).requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_parameters(model) -> int:
    """Unique parameters: the tied input embedding and output projection count once."""
    return sum(p.numel() for p in model.parameters())


def parameter_shapes(model_cfg, vocab_size: int, frozen: str = "none") -> list[tuple]:
    """The shape of every parameter `build_model` would make that trains with `--freeze=frozen`, without
    allocating it (a model on the meta device)."""
    import torch

    with torch.device("meta"):
        model = build_model(model_cfg, StandInTokenizer(vocab_size))
    freeze(model, frozen)
    return [tuple(parameter.shape) for parameter in model.parameters() if parameter.requires_grad]


def estimate_parameters(model_cfg, vocab_size: int) -> int:
    """The parameter count `build_model` would give, without building it (for `plan` and pre-flight)."""
    d, inner, buckets = model_cfg.d_model, model_cfg.num_heads * model_cfg.d_kv, model_cfg.relative_attention_num_buckets
    attention = 4 * d * inner + d  # q, k, v, o and the layer norm in front
    feed_forward = 2 * d * model_cfg.d_ff + d
    encoder = model_cfg.num_layers * (attention + feed_forward) + buckets * model_cfg.num_heads + d
    decoder = model_cfg.num_decoder_layers * (2 * attention + feed_forward) + buckets * model_cfg.num_heads + d
    return vocab_size * d + encoder + decoder
