"""Decoding many requests together, one token each per step, where requests come and go between steps: the
engine of `serve`'s continuous batching (serving/scheduler.py drives it).

T5 is an encoder-decoder: each request's prompt goes through the encoder once, when it joins, and so do the
cross-attention keys and values of every decoder layer (they depend on the prompt only). Every step then runs the
decoder once for all rows, one new token per row, against a key/value cache (inference/t5_steps.py): a step
costs the same whatever the answers' lengths so far, bar attention over the cache.

The cache is a set of rows, one per request, in buffers that outlive the requests. Every step writes its token's
keys and values at the next column, for all rows. A request that joins takes a free row (one whose request ended)
and starts at the current column: the columns before it are masked, so its first token sits at distance 0 from
itself, and T5's relative position bias (query column minus key column) sees its own distances, whatever ran in
that row before. Its prompt's cross-attention keys and values are written into the row, right-padded and masked
to the longest prompt. A request that leaves only frees its row. The buffers are rebuilt (`rebuild`: live rows
gathered, the columns no live row reaches cut) only when there are not enough rows, when the columns run out,
when a prompt is longer than the cross-attention buffers, or when free rows outnumber live ones (free rows are
computed at every step, for nothing). Tokens are chosen by transformers' own logits processors, in generate's
order, so a request decodes by the same rules as `generate` (greedy: the same answer).
"""
from dataclasses import dataclass, field

import torch

from config import DecodingSettings
from inference.decoding import logits_processors, resolved_seed
from inference.t5_steps import T5Steps


@dataclass
class Sequence:
    """One request being decoded."""

    prompt_ids: list[int]
    settings: DecodingSettings
    generated: list[int] = field(default_factory=list)
    # Its prompt's cross-attention (keys, values), each (decoder layers, heads, prompt length, d_kv); set by join.
    cross_attention: tuple[torch.Tensor, torch.Tensor] | None = None
    processors: object = None
    generator: torch.Generator | None = None

    def __post_init__(self):
        self.processors = logits_processors(self.settings)
        if self.settings.do_sample:
            self.generator = torch.Generator().manual_seed(resolved_seed(self.settings))


@dataclass
class DecodingCache:
    """The batch's key/value rows. Self-attention buffers (layers, rows, heads, columns, d_kv) are written one
    column per step; a row attends to the columns from its `start` on. Cross-attention buffers (layers, rows,
    heads, prompt width, d_kv) hold each row's prompt, `prompt_lengths` long. The masks are added to attention
    scores: 0 where a row attends, the dtype's minimum where it does not; kept up to date as rows are taken, so a
    step only slices them."""

    self_keys: torch.Tensor
    self_values: torch.Tensor
    cross_keys: torch.Tensor
    cross_values: torch.Tensor
    start: torch.Tensor  # (rows,) the first column of each row's request
    prompt_lengths: torch.Tensor  # (rows,)
    self_scores_mask: torch.Tensor = None  # (rows, columns)
    cross_scores_mask: torch.Tensor = None  # (rows, 1, 1, prompt width)

    def __post_init__(self):
        columns = torch.arange(self.self_keys.shape[3], device=self.start.device)
        self.self_scores_mask = scores_mask(columns[None, :] >= self.start[:, None])
        self.update_cross_mask()

    @property
    def columns(self) -> int:
        return self.self_keys.shape[3]

    @property
    def prompt_width(self) -> int:
        return self.cross_keys.shape[3]

    def update_cross_mask(self) -> None:
        prompt = torch.arange(self.prompt_width, device=self.start.device)[None, :] < self.prompt_lengths[:, None]
        self.cross_scores_mask = scores_mask(prompt)[:, None, None, :]

    def place(self, row: int, column: int, sequence: Sequence) -> None:
        """A request takes `row`: its tokens start at `column`, its prompt's keys and values fill the row (the
        cross mask is updated once for all the rows taken in a step)."""
        keys, values = sequence.cross_attention
        length = keys.shape[2]
        self.cross_keys[:, row, :, :length] = keys
        self.cross_values[:, row, :, :length] = values
        self.start[row], self.prompt_lengths[row] = column, length
        self.self_scores_mask[row, :column] = torch.finfo(self.self_scores_mask.dtype).min
        self.self_scores_mask[row, column:] = 0


def scores_mask(allowed: torch.Tensor) -> torch.Tensor:
    """0 where `allowed`, fp32's minimum elsewhere (not -inf: a row with nothing to attend to stays finite)."""
    zero = torch.zeros((), dtype=torch.float32, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(torch.float32).min)


class StepDecoder:
    def __init__(self, model, tokenizer, placement):
        self.model, self.tokenizer, self.placement = model.eval(), tokenizer, placement
        self.computation = T5Steps(model)
        self.start_id = model.config.decoder_start_token_id
        self.pad_id = tokenizer.pad_token_id
        self.rows: list[Sequence | None] = []  # the request of each cache row; None: a free row
        self.cache: DecodingCache | None = None
        self.column = 0  # where the next step writes

    def padded(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids and their mask, in three torch calls whatever the rows' number."""
        width = max(map(len, rows))
        device = self.placement.device
        ids = torch.tensor([row + [self.pad_id] * (width - len(row)) for row in rows], device=device)
        lengths = torch.tensor([len(row) for row in rows], device=device)
        return ids, torch.arange(width, device=device)[None, :] < lengths[:, None]

    @torch.inference_mode()
    def join(self, sequences: list[Sequence]) -> None:
        """Run the encoder, and each decoder layer's cross-attention projections, once for the newly arrived
        sequences (together)."""
        ids, mask = self.padded([sequence.prompt_ids for sequence in sequences])
        with self.placement.autocast():
            keys, values = self.computation.encode(ids, mask)
        for index, sequence in enumerate(sequences):
            length = len(sequence.prompt_ids)
            sequence.cross_attention = (keys[:, index, :, :length], values[:, index, :, :length])

    @torch.inference_mode()
    def step(self, sequences: list[Sequence]) -> list[int]:
        """The next token of every sequence (appended to its `generated`), from one decoder pass over all. A
        sequence not in the previous step's batch must be new (nothing generated): its row starts here."""
        rows = self.seat(sequences)
        ids = [self.pad_id] * len(self.rows)
        for row, sequence in zip(rows, sequences):
            ids[row] = sequence.generated[-1] if sequence.generated else self.start_id
        with self.placement.autocast():
            logits = self.computation.decode(torch.tensor(ids, device=self.placement.device), self.cache,
                                             self.column)
        self.column += 1
        scores = logits.float()
        best = scores.argmax(dim=-1).tolist()  # greedy rows need nothing more
        tokens = []
        for row, sequence in zip(rows, sequences):
            token = best[row]
            if sequence.processors or sequence.settings.do_sample:
                token = self.choose(sequence, scores[row:row + 1])
            sequence.generated.append(token)
            tokens.append(token)
        return tokens

    def seat(self, sequences: list[Sequence]) -> list[int]:
        """Each sequence's cache row: the same as last step, or for a newcomer a free row (rebuilt first when
        there are too few rows, the prompt is too long, or the columns run out)."""
        wanted = {id(sequence) for sequence in sequences}
        self.rows = [sequence if sequence is not None and id(sequence) in wanted else None for sequence in self.rows]
        seated = {id(sequence): row for row, sequence in enumerate(self.rows) if sequence is not None}
        arriving = [sequence for sequence in sequences if id(sequence) not in seated]
        free = len(self.rows) - len(seated)
        live = len(seated) + len(arriving)
        longest_prompt = max((len(sequence.prompt_ids) for sequence in arriving), default=0)
        if (self.cache is None or free < len(arriving) or free - len(arriving) > live
                or self.column >= self.cache.columns or longest_prompt > self.cache.prompt_width):
            self.rebuild(arriving)
        free_rows = iter([row for row, sequence in enumerate(self.rows) if sequence is None])
        for sequence in arriving:
            row = next(free_rows)
            self.rows[row] = sequence
            self.cache.place(row, self.column, sequence)
        if arriving:
            self.cache.update_cross_mask()
        seated = {id(sequence): row for row, sequence in enumerate(self.rows) if sequence is not None}
        return [seated[id(sequence)] for sequence in sequences]

    def rebuild(self, arriving: list[Sequence]) -> None:
        """New buffers: the live rows, gathered, then free rows (for the arriving sequences, and more up to a power
        of two, so that arrivals seldom need another rebuild); the columns before
        the earliest live request's start cut (the distances between the columns that stay do not change), room
        for twice the columns still needed; as wide as the longest live or arriving prompt."""
        live = [row for row, sequence in enumerate(self.rows) if sequence is not None]
        old = self.cache
        cut = int(old.start[live].min()) if live else self.column
        kept_columns = self.column - cut
        columns = max(64, 2 * (kept_columns + 1))
        kept_prompt = int(old.prompt_lengths[live].max()) if live else 0
        prompt_width = max([kept_prompt] + [len(sequence.prompt_ids) for sequence in arriving])
        if arriving:  # a prompt's keys: (layers, heads, length, d_kv)
            like = arriving[0].cross_attention[0]
            layers, heads, _, d_kv = like.shape
        else:
            like = old.self_keys
            layers, _, heads, _, d_kv = like.shape
        rows = 1 << (len(live) + len(arriving) - 1).bit_length()  # a power of two: room for a few more
        buffers = [like.new_zeros((layers, rows, heads, width, d_kv))
                   for width in (columns, columns, prompt_width, prompt_width)]
        start = torch.zeros(rows, dtype=torch.long, device=like.device)
        prompt_lengths = torch.zeros(rows, dtype=torch.long, device=like.device)
        if live:
            index = torch.tensor(live, device=like.device)
            for new, previous in zip(buffers[:2], (old.self_keys, old.self_values)):
                new[:, :len(live), :, :kept_columns] = previous[:, index, :, cut:self.column]
            for new, previous in zip(buffers[2:], (old.cross_keys, old.cross_values)):
                new[:, :len(live), :, :kept_prompt] = previous[:, index, :, :kept_prompt]
            start[:len(live)] = old.start[index] - cut
            prompt_lengths[:len(live)] = old.prompt_lengths[index]
        self.cache = DecodingCache(*buffers, start=start, prompt_lengths=prompt_lengths)
        self.rows = [self.rows[row] for row in live] + [None] * (rows - len(live))
        self.column = kept_columns

    def choose(self, sequence: Sequence, scores: torch.Tensor) -> int:
        input_ids = torch.tensor([[self.start_id] + sequence.generated], device=scores.device)
        scores = sequence.processors(input_ids, scores)
        if not sequence.settings.do_sample:
            return int(scores.argmax(dim=-1))
        probabilities = torch.softmax(scores, dim=-1).cpu()
        return int(torch.multinomial(probabilities, 1, generator=sequence.generator))
