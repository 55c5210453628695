"""Decoding many requests together, one token each per step, where requests come and go between steps: the
engine of `serve`'s continuous batching (serving/scheduler.py drives it).

T5 is an encoder-decoder: each request's prompt goes through the encoder once, when it joins, and so do the
cross-attention keys and values of every decoder layer (they depend on the prompt only). Every step then runs the
decoder once for all active requests, on one new token per request, against a key/value cache: a step costs the
same whatever the answers' lengths so far, bar attention over the cache.

The batch's cache holds one row per request. Self-attention rows are left-padded to the batch's longest answer so
far, masked by the decoder attention mask; each row's tokens end at the last column, next to the token being
decoded, so T5's relative position bias (key position minus query position, from the cache's width) sees every
row's own distances, whatever the padding in front. Cross-attention rows are right-padded to the longest prompt,
masked by the encoder mask. When a request joins or leaves, the rows are gathered anew (`regroup`): padding no
row needs any more is cut, a newcomer's row starts empty. Tokens are chosen by transformers' own logits
processors, in generate's order, so a request decodes by the same rules as `generate` (greedy: the same answer).
"""
from dataclasses import dataclass, field

import torch

from config import DecodingSettings
from inference.decoding import logits_processors, resolved_seed


@dataclass
class Sequence:
    """One request being decoded."""

    prompt_ids: list[int]
    settings: DecodingSettings
    generated: list[int] = field(default_factory=list)
    # Per decoder layer: the cross-attention (keys, values), each (heads, prompt length, d_kv); set when it joins.
    cross_attention: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    processors: object = None
    generator: torch.Generator | None = None

    def __post_init__(self):
        self.processors = logits_processors(self.settings)
        if self.settings.do_sample:
            self.generator = torch.Generator().manual_seed(resolved_seed(self.settings))


class StepDecoder:
    def __init__(self, model, tokenizer, placement):
        self.model, self.tokenizer, self.placement = model.eval(), tokenizer, placement
        self.start_id = model.config.decoder_start_token_id
        self.pad_id = tokenizer.pad_token_id
        self.cross_attentions = [block.layer[1].EncDecAttention for block in model.decoder.block]
        self.batch: list[Sequence] = []  # the requests whose rows `cache` holds, in its row order
        self.cache = None  # transformers' EncoderDecoderCache of those rows
        self.self_mask = None  # (rows, cached tokens): 0 over each row's left padding
        self.encoder_mask = None  # (rows, longest prompt): 0 over each row's right padding

    def padded(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):
            ids[index, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[index, :len(row)] = 1
        return ids.to(self.placement.device), mask.to(self.placement.device)

    @torch.no_grad()
    def join(self, sequences: list[Sequence]) -> None:
        """Run the encoder, and each decoder layer's cross-attention projections, once for the newly arrived
        sequences (together)."""
        ids, mask = self.padded([sequence.prompt_ids for sequence in sequences])
        with self.placement.autocast():
            states = self.model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
            projected = [(self.by_head(attention, attention.k(states)), self.by_head(attention, attention.v(states)))
                         for attention in self.cross_attentions]
        for index, sequence in enumerate(sequences):
            length = len(sequence.prompt_ids)
            sequence.cross_attention = [(keys[index, :, :length], values[index, :, :length])
                                        for keys, values in projected]

    @staticmethod
    def by_head(attention, projection: torch.Tensor) -> torch.Tensor:
        """(batch, length, heads × d_kv) → (batch, heads, length, d_kv): the layout of T5's attention cache."""
        batch, length, _ = projection.shape
        return projection.view(batch, length, attention.n_heads, attention.key_value_proj_dim).transpose(1, 2)

    @torch.no_grad()
    def step(self, sequences: list[Sequence]) -> list[int]:
        """The next token of every sequence (appended to its `generated`), from one decoder pass over all. A
        sequence not in the previous step's batch must be new (nothing generated): its cache starts here."""
        from transformers.modeling_outputs import BaseModelOutput

        if len(sequences) != len(self.batch) or any(a is not b for a, b in zip(sequences, self.batch)):
            self.regroup(sequences)
        device = self.placement.device
        last_ids = [s.generated[-1] if s.generated else self.start_id for s in sequences]
        decoder_ids = torch.tensor(last_ids, dtype=torch.long, device=device)[:, None]
        decoder_mask = torch.cat([self.self_mask, self.self_mask.new_ones((len(sequences), 1))], dim=1)
        # The decoder takes cross-attention keys and values from the cache; of the encoder states it reads only
        # their shape (to expand the encoder mask), so a zero-strided stand-in spares stacking them every step.
        states_shape = (*self.encoder_mask.shape, self.model.config.d_model)
        stand_in = torch.zeros((), device=device).expand(states_shape)
        with self.placement.autocast():
            logits = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=stand_in),
                                attention_mask=self.encoder_mask, decoder_input_ids=decoder_ids,
                                decoder_attention_mask=decoder_mask, cache=self.cache, use_cache=True).logits
        self.self_mask = decoder_mask  # the cache grew by the token just decoded, in place
        scores = logits[:, -1].float()
        tokens = scores.argmax(dim=-1).tolist()  # greedy rows need nothing more
        for index, sequence in enumerate(sequences):
            if sequence.processors or sequence.settings.do_sample:
                tokens[index] = self.choose(sequence, scores[index:index + 1])
            sequence.generated.append(tokens[index])
        return tokens

    def regroup(self, sequences: list[Sequence]) -> None:
        """Build the cache's rows for a new set of sequences: the rows of those that stay, gathered from the old
        cache, and for a newcomer an empty self-attention row and its own cross-attention keys and values."""
        from transformers import EncoderDecoderCache

        device = self.placement.device
        previous_row = {id(sequence): row for row, sequence in enumerate(self.batch)}
        staying = [(row, previous_row[id(s)]) for row, s in enumerate(sequences) if id(s) in previous_row]
        arriving = [(row, s) for row, s in enumerate(sequences) if id(s) not in previous_row]
        new_rows = torch.tensor([row for row, _ in staying], dtype=torch.long, device=device)
        old_rows = torch.tensor([row for _, row in staying], dtype=torch.long, device=device)
        if not arriving:
            self.keep_rows(old_rows, sequences)
            return
        # A row holds as many self-attention tokens as its sequence generated (all but the one decoded next), so
        # the longest answer sets the width; staying rows lose the left padding that no row needs any more.
        width = max(len(sequence.generated) for sequence in sequences)
        cut = self.self_mask.shape[1] - width if staying else 0
        prompt_width = max(len(sequence.prompt_ids) for sequence in sequences)
        kept_prompt = min(prompt_width, self.encoder_mask.shape[1]) if staying else 0  # staying prompts fit both
        layers = []
        for layer in range(len(self.cross_attentions)):
            like = sequences[0].cross_attention[layer][0]  # (heads, prompt length, d_kv), in the cache's dtype
            self_rows = [like.new_zeros((len(sequences), like.shape[0], width, like.shape[2])) for _ in range(2)]
            cross_rows = [like.new_zeros((len(sequences), like.shape[0], prompt_width, like.shape[2]))
                          for _ in range(2)]
            if staying:
                old_self = self.cache.self_attention_cache.layers[layer]
                old_cross = self.cache.cross_attention_cache.layers[layer]
                for rows, old in zip(self_rows, (old_self.keys, old_self.values)):
                    rows[new_rows] = old[old_rows, :, cut:]
                for rows, old in zip(cross_rows, (old_cross.keys, old_cross.values)):
                    rows[new_rows, :, :kept_prompt] = old[old_rows, :, :kept_prompt]
            for row, sequence in arriving:
                for rows, own in zip(cross_rows, sequence.cross_attention[layer]):
                    rows[row, :, :len(sequence.prompt_ids)] = own
            layers.append((*self_rows, *cross_rows))
        self_mask = torch.zeros((len(sequences), width), dtype=torch.long, device=device)
        if staying:
            self_mask[new_rows] = self.self_mask[old_rows, cut:]
        lengths = torch.tensor([len(sequence.prompt_ids) for sequence in sequences], device=device)
        self.cache = EncoderDecoderCache(layers)
        self.self_mask = self_mask
        self.encoder_mask = (torch.arange(prompt_width, device=device)[None, :] < lengths[:, None]).long()
        self.batch = list(sequences)

    def keep_rows(self, rows: torch.Tensor, sequences: list[Sequence]) -> None:
        """Only some sequences left: the others' cache rows, as they are. Their padding on the left (self-attention)
        and the right (prompts) stays masked; the next arrival's regroup trims it."""
        from transformers import EncoderDecoderCache

        self.cache = EncoderDecoderCache([
            (own.keys[rows], own.values[rows], cross.keys[rows], cross.values[rows]) for own, cross in
            zip(self.cache.self_attention_cache.layers, self.cache.cross_attention_cache.layers)])
        self.self_mask, self.encoder_mask = self.self_mask[rows], self.encoder_mask[rows]
        self.batch = list(sequences)

    def choose(self, sequence: Sequence, scores: torch.Tensor) -> int:
        input_ids = torch.tensor([[self.start_id] + sequence.generated], device=scores.device)
        scores = sequence.processors(input_ids, scores)
        if not sequence.settings.do_sample:
            return int(scores.argmax(dim=-1))
        probabilities = torch.softmax(scores, dim=-1).cpu()
        return int(torch.multinomial(probabilities, 1, generator=sequence.generator))
