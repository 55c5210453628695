"""T5's span-corruption objective: about `noise_density` of a chunk's tokens, in spans of mean length
`mean_noise_span_length`, are cut out; each span becomes one sentinel token in the encoder's input, and the decoder
learns to write the spans, each after its sentinel. As in T5, a chunk always ends with a cut span, and a short
chunk gets a single span. What the code does with a chunk of 40 tokens (ids 0-39; sentinel ids shown by name):

    >>> import numpy as np
    >>> sentinels, eos = np.array([100, 101]), 1000
    >>> name = {100: "<extra_id_0>", 101: "<extra_id_1>", 1000: "[EOS]"}
    >>> inputs, targets = SpanCorruption().corrupt(np.arange(40), np.random.default_rng(0), sentinels, eos)
    >>> print(" ".join(name.get(t, str(t)) for t in inputs[26:]))
    26 27 28 <extra_id_0> 33 34 35 36 37 <extra_id_1> [EOS]
    >>> print(" ".join(name.get(t, str(t)) for t in targets))
    <extra_id_0> 29 30 31 32 <extra_id_1> 38 39 [EOS]
    >>> len(inputs), SpanCorruption().input_length(40), len(targets), SpanCorruption().target_length(40)
    (37, 37, 9, 9)

The counts follow from the chunk's length alone (so step sizes and the loss's denominator are known without
masking anything); where the spans fall is drawn from a generator the caller seeds, so a resumed run masks the
same spans.
"""
from dataclasses import dataclass

import numpy as np

from utils.errors import UserError

SENTINEL_FORMAT = "<extra_id_{}>"
SENTINEL_COUNT = 100  # as T5's own vocabulary


def sentinel_tokens(count: int = SENTINEL_COUNT) -> list[str]:
    return [SENTINEL_FORMAT.format(k) for k in range(count)]


@dataclass(frozen=True)
class SpanCorruption:
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0

    def noise_tokens(self, length: int) -> int:
        if length < 2:
            return 0  # a one-token chunk (the end of an epoch) keeps its token: something must stay in the input
        return min(max(round(length * self.noise_density), 1), length - 1)

    def spans(self, length: int) -> int:
        noise = self.noise_tokens(length)
        return min(max(round(noise / self.mean_noise_span_length), 1), length - noise) if noise else 0

    def input_length(self, length: int) -> int:
        """Tokens the encoder reads for a chunk of `length` tokens: the kept ones, a sentinel per span, [EOS]."""
        return length - self.noise_tokens(length) + self.spans(length) + 1

    def target_length(self, length: int) -> int:
        """Tokens the decoder writes: the cut ones, a sentinel before each span, [EOS]."""
        return self.noise_tokens(length) + self.spans(length) + 1

    def chunk_length(self, max_input_length: int) -> int:
        """The longest chunk whose input fits in `max_input_length` tokens (512 → 568, as in T5 and nanoT5)."""
        length = 1
        while self.input_length(length + 1) <= max_input_length:
            length += 1
        return length

    def noise_mask(self, length: int, rng: np.random.Generator) -> np.ndarray:
        """Which of `length` tokens are cut: `spans` runs of noise, each after a run of kept tokens."""
        noise, spans = self.noise_tokens(length), self.spans(length)
        if not spans:
            return np.zeros(length, dtype=bool)
        runs = np.empty(2 * spans, dtype=np.int64)
        runs[0::2] = _random_parts(length - noise, spans, rng)
        runs[1::2] = _random_parts(noise, spans, rng)
        return np.repeat(np.arange(2 * spans) % 2 == 1, runs)

    def corrupt(self, tokens: np.ndarray, rng: np.random.Generator, sentinel_ids: np.ndarray, eos_id: int
                ) -> tuple[np.ndarray, np.ndarray]:
        """The encoder input and the decoder target of one chunk of token ids."""
        noise = self.noise_mask(len(tokens), rng)
        span_start = noise.copy()
        span_start[1:] &= ~noise[:-1]
        span_of = np.cumsum(span_start) - 1  # at a noise token: the index of its span
        with_sentinels = tokens.astype(np.int64)
        with_sentinels[span_start] = sentinel_ids[span_of[span_start]]
        inputs = np.append(with_sentinels[~noise | span_start], eos_id)
        cut = np.flatnonzero(noise)
        targets = np.empty(len(cut) + int(span_start.sum()) + 1, dtype=np.int64)
        targets[np.arange(len(cut)) + span_of[cut] + 1] = tokens[cut]  # each span shifted by the sentinels before it
        firsts = np.flatnonzero(span_start[cut])
        targets[firsts + np.arange(len(firsts))] = sentinel_ids[:len(firsts)]
        targets[-1] = eos_id
        return inputs, targets


def corruption_of(cfg) -> SpanCorruption:
    """The corruption a train config (its noise_density and mean_noise_span_length) asks for."""
    return SpanCorruption(cfg.noise_density, cfg.mean_noise_span_length)


def _random_parts(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """`parts` positive integers summing to `total`, every such split equally likely."""
    bounds = np.empty(parts + 1, dtype=np.int64)
    bounds[0], bounds[-1] = 0, total
    bounds[1:-1] = np.sort(rng.choice(total - 1, parts - 1, replace=False)) + 1
    return np.diff(bounds)


def restore(inputs, targets, sentinel_ids) -> list[int]:
    """The chunk an input and a target were made from (the inverse of `corrupt`, for tests and examples)."""
    sentinel_index = {int(token): k for k, token in enumerate(sentinel_ids)}
    spans, current = {}, None
    for token in list(targets)[:-1]:
        if int(token) in sentinel_index:
            current = spans.setdefault(sentinel_index[int(token)], [])
        else:
            current.append(int(token))
    chunk = []
    for token in list(inputs)[:-1]:
        chunk.extend(spans[sentinel_index[int(token)]] if int(token) in sentinel_index else [int(token)])
    return chunk


def sentinels_of(tokenizer) -> list[int]:
    """The ids of <extra_id_0>, <extra_id_1>, ... as far as the tokenizer has them."""
    vocab = tokenizer.get_vocab()
    ids = []
    while SENTINEL_FORMAT.format(len(ids)) in vocab:
        ids.append(vocab[SENTINEL_FORMAT.format(len(ids))])
    return ids


def sentinel_ids(tokenizer, needed: int, max_seq_len: int) -> np.ndarray:
    """The sentinels' ids: at least `needed` of them (the spans of a full chunk), or a `UserError` saying why not."""
    ids = sentinels_of(tokenizer)
    name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
    if not ids:
        raise UserError(f"tokenizer {name}: has no sentinel tokens (<extra_id_0>, <extra_id_1>, ...), which span "
                        "corruption needs; train one that has them with `python train_low_mem.py train_tokenizer "
                        "--text_column=text --train_file=... --tokenizer_dir=...`")
    if len(ids) < needed:
        raise UserError(f"tokenizer {name}: has {len(ids)} sentinel tokens, but a chunk of --max_seq_len="
                        f"{max_seq_len} has {needed} noise spans: lower --max_seq_len or --noise_density, or raise "
                        "--mean_noise_span_length")
    return np.array(ids, dtype=np.int64)
