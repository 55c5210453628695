"""Text to token ids for the data pipeline: one private fast encoder per tokenizer and length, and windows of texts
tokenized in slices into `Ragged` arrays."""
import hashlib

import pyarrow as pa
from tokenizers import Tokenizer

from data_pipeline.batch import Ragged
from utils.errors import UserError

_TOKENIZE_SLICE = 512  # texts per tokenizer call
# The encoders of this process, by (tokenizer definition, max_seq_len or None): see `shared_encoder`.
_ENCODERS: dict[tuple[str, int | None], Tokenizer] = {}


def shared_encoder(tokenizer, max_seq_len: int | None) -> Tokenizer:
    """A private copy of the fast backend, truncating to `max_seq_len` tokens with [EOS] kept last (None: no
    truncation), that appends [EOS] to every text.

    One per process for each tokenizer and length (`_ENCODERS`): the trainer builds a dataset every epoch, and a
    tokenizers `Tokenizer` that has encoded an epoch keeps its word cache's memory after it is gone (about 16 MB per
    epoch of distinct rows), while one reused instance levels off.
    """
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if getattr(tokenizer, "backend_tokenizer", None) is None or tokenizer.pad_token_id is None:
        raise UserError(f"tokenizer {name}: needs a fast tokenizer with a pad token")
    definition = tokenizer.backend_tokenizer.to_str()
    key = (hashlib.sha256(definition.encode()).hexdigest(), max_seq_len)
    if key not in _ENCODERS:
        encoder = Tokenizer.from_str(definition)
        encoder.no_padding()
        if max_seq_len is None:
            encoder.no_truncation()
        else:
            encoder.enable_truncation(max_length=max_seq_len)
        _ENCODERS[key] = encoder
    encoder = _ENCODERS[key]
    if encoder.encode("a").ids[-1:] != [tokenizer.eos_token_id]:
        raise UserError(f"tokenizer {name}: its post-processor must append the EOS token to every text")
    return encoder


def tokenize(encoder: Tokenizer, texts: pa.ChunkedArray) -> Ragged:
    # In slices: each call still spreads over all cores, but its Encoding objects (tokens, offsets and the
    # truncated overflow of every text) never pile up for a whole window, which keeps peak memory low.
    return Ragged.concat([
        Ragged.from_encodings(encoder.encode_batch_fast(texts.slice(start, _TOKENIZE_SLICE).to_pylist()))
        for start in range(0, len(texts), _TOKENIZE_SLICE)] or [Ragged.from_lists([])])
