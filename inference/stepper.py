"""Decoding many requests together, one token each per step, where requests come and go between steps: the
engine of `serve`'s continuous batching (serving/scheduler.py drives it).

T5 is an encoder-decoder: each request's prompt goes through the encoder once, when it joins; every step then runs
the decoder once for all active requests, their encoder states stacked (padded, masked) and their answers so far
right-padded (the decoder is causal: padding after a row's last token cannot change that token's logits). The
decoder recomputes each answer's prefix instead of keeping a key/value cache per request: caches of different
lengths would have to be padded, stacked and split at every join and leave, and for the short answers of the
models this tool trains the recomputation is the cheaper part (docs/BENCHMARKS.md, Serving: the measured
throughput). Tokens are chosen by transformers' own logits processors, in generate's order, so a request decodes
by the same rules as `generate` (greedy: the same answer).
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
    encoder_states: torch.Tensor | None = None  # (prompt length, d_model), set when the request joins
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
        """Run the encoder once for the newly arrived sequences (together)."""
        ids, mask = self.padded([sequence.prompt_ids for sequence in sequences])
        with self.placement.autocast():
            states = self.model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        for index, sequence in enumerate(sequences):
            sequence.encoder_states = states[index, :len(sequence.prompt_ids)]

    @torch.no_grad()
    def step(self, sequences: list[Sequence]) -> list[int]:
        """The next token of every sequence (appended to its `generated`), from one decoder pass over all."""
        from transformers.modeling_outputs import BaseModelOutput

        states = torch.nn.utils.rnn.pad_sequence([s.encoder_states for s in sequences], batch_first=True)
        lengths = torch.tensor([len(s.prompt_ids) for s in sequences], device=states.device)
        encoder_mask = (torch.arange(states.shape[1], device=states.device)[None, :] < lengths[:, None]).long()
        decoder_rows = [[self.start_id] + s.generated for s in sequences]
        decoder_ids, _ = self.padded(decoder_rows)
        with self.placement.autocast():
            logits = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=states), attention_mask=encoder_mask,
                                decoder_input_ids=decoder_ids, use_cache=False).logits
        last = torch.tensor([len(row) - 1 for row in decoder_rows], device=logits.device)
        scores = logits[torch.arange(len(sequences), device=logits.device), last].float()
        tokens = scores.argmax(dim=-1).tolist()  # greedy rows need nothing more
        for index, sequence in enumerate(sequences):
            if sequence.processors or sequence.settings.do_sample:
                tokens[index] = self.choose(sequence, decoder_rows[index], scores[index:index + 1])
            sequence.generated.append(tokens[index])
        return tokens

    def choose(self, sequence: Sequence, decoder_row: list[int], scores: torch.Tensor) -> int:
        input_ids = torch.tensor([decoder_row], device=scores.device)
        scores = sequence.processors(input_ids, scores)
        if not sequence.settings.do_sample:
            return int(scores.argmax(dim=-1))
        probabilities = torch.softmax(scores, dim=-1).cpu()
        return int(torch.multinomial(probabilities, 1, generator=sequence.generator))
