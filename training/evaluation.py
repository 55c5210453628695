"""Evaluation on the validation file, split across ranks: for seq2seq the loss and BLEU-4 of greedy generations
(gathered as strings), for span corruption the held-out denoising loss (BLEU means nothing there)."""
import contextlib
import logging
import sys
from dataclasses import dataclass

import torch
from accelerate.utils import gather_object
from tqdm import tqdm

from model.loss import padded, token_loss_sum
from model.packed_text import EVAL_STREAM, leading_chunks, mask_generator
from model.parquet import first_usable_rows
from model.span_corruption import corruption_of, sentinel_ids
from model.windows import MicroBatch, Ragged
from utils.metrics import bleu4

log = logging.getLogger("trainer")
EXAMPLES_LOGGED = 3


@dataclass
class EvalResult:
    bleu4: float | None  # None for span corruption
    eval_loss: float
    samples: int
    examples: list  # (prompt, reference, generation) triples


def build_evaluator(cfg, accelerator, tokenizer):
    if cfg.objective == "span_corruption":
        return DenoisingEvaluator(accelerator, tokenizer, cfg)
    return Evaluator(accelerator, tokenizer, cfg.validation_file, cfg.eval_max_samples, cfg.eval_batch_size,
                     cfg.max_seq_len)


@contextlib.contextmanager
def scoring(accelerator, model):
    """The bare model in eval mode, without gradients, under the run's autocast; back in its mode afterwards."""
    unwrapped = accelerator.unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()
    try:
        with torch.no_grad(), accelerator.autocast():
            yield unwrapped
    finally:
        unwrapped.train(was_training)


class LossTotal:
    """Token cross-entropy summed over batches, with its number of target tokens; `mean()` over every rank."""

    def __init__(self, accelerator):
        self.accelerator, device = accelerator, accelerator.device
        self.loss, self.tokens = torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long)

    def add(self, model, input_ids, attention_mask, labels) -> None:
        loss, tokens = token_loss_sum(model, input_ids, attention_mask, labels)
        self.loss += loss
        self.tokens += tokens

    def mean(self) -> float:
        totals = self.accelerator.reduce(torch.stack([self.loss, self.tokens.float()]), "sum")
        return (totals[0] / totals[1].clamp(min=1)).item()


class Evaluator:
    """Scores a model on the first `max_samples` usable rows of a parquet file; rank r takes rows r, r+W, ..."""

    def __init__(self, accelerator, tokenizer, path: str, max_samples: int, batch_size: int, max_seq_len: int):
        self.accelerator = accelerator
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        prompts, responses = first_usable_rows(path, max_samples) if max_samples else ([], [])
        self.total = len(prompts)
        rank, world = accelerator.process_index, accelerator.num_processes
        self.prompts, self.references = prompts[rank::world], responses[rank::world]

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, truncation=True, max_length=self.max_seq_len)["input_ids"]

    def batches(self):
        """Batches of similar prompt length (little padding, faster generation), in a fixed order."""
        prompt_ids, response_ids = self.encode(self.prompts), self.encode(self.references)
        order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
        for start in range(0, len(order), self.batch_size):
            rows = order[start: start + self.batch_size]
            input_ids = padded([prompt_ids[i] for i in rows], self.tokenizer.pad_token_id)
            labels = padded([response_ids[i] for i in rows], -100)
            yield rows, input_ids, (input_ids != self.tokenizer.pad_token_id).long(), labels

    @property
    def batch_count(self) -> int:
        return -(-len(self.prompts) // self.batch_size)

    def evaluate(self, model, progress: bool = False) -> EvalResult:
        """`progress`: a bar on an interactive terminal (the `evaluate` command; training logs lines instead)."""
        device, total = self.accelerator.device, LossTotal(self.accelerator)
        generations = [""] * len(self.prompts)
        bar = tqdm(total=self.batch_count, unit="batch", desc="evaluating",
                   disable=not (progress and self.accelerator.is_main_process and sys.stderr.isatty()))
        with scoring(self.accelerator, model) as unwrapped, bar:
            for rows, input_ids, attention_mask, labels in self.batches():
                input_ids, attention_mask, labels = (t.to(device) for t in (input_ids, attention_mask, labels))
                total.add(unwrapped, input_ids, attention_mask, labels)
                output = unwrapped.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                            num_beams=1, max_new_tokens=self.max_seq_len, use_cache=True)
                for row, text in zip(rows, self.tokenizer.batch_decode(output, skip_special_tokens=True)):
                    generations[row] = text
                bar.update(1)
        eval_loss = total.mean()
        triples = gather_object(list(zip(self.prompts, self.references, generations)))
        score = bleu4([t[2] for t in triples], [t[1] for t in triples])
        return EvalResult(score, eval_loss, len(triples), triples[:EXAMPLES_LOGGED])


class DenoisingEvaluator:
    """The denoising loss on the first `eval_max_samples` chunks of the validation file's documents, packed and
    corrupted as training does it, with masks of their own seeds: the same chunks and spans at every evaluation, so
    the losses of a run compare. Rank r scores chunks r, r+W, ...; the token-weighted mean is taken over all."""

    def __init__(self, accelerator, tokenizer, cfg):
        self.accelerator, self.batch_size, self.pad_id = accelerator, cfg.eval_batch_size, tokenizer.pad_token_id
        corruption = corruption_of(cfg)
        length = corruption.chunk_length(cfg.max_seq_len)
        chunks = leading_chunks(cfg.validation_file, cfg.text_column, tokenizer, length, cfg.eval_max_samples) \
            if cfg.eval_max_samples else []
        self.total = len(chunks)
        sentinels = sentinel_ids(tokenizer, corruption.spans(length), cfg.max_seq_len) if chunks else None
        rank, world = accelerator.process_index, accelerator.num_processes
        self.pairs = [corruption.corrupt(chunks[i], mask_generator(cfg.seed, EVAL_STREAM, i), sentinels,
                                         tokenizer.eos_token_id) for i in range(rank, len(chunks), world)]

    def evaluate(self, model, progress: bool = False) -> EvalResult:
        device, total = self.accelerator.device, LossTotal(self.accelerator)
        with scoring(self.accelerator, model) as unwrapped:
            for start in range(0, len(self.pairs), self.batch_size):
                pairs = self.pairs[start:start + self.batch_size]
                batch = MicroBatch.padded(Ragged.from_lists([inputs for inputs, _ in pairs]),
                                          Ragged.from_lists([targets for _, targets in pairs]), self.pad_id).to(device)
                total.add(unwrapped, batch.input_ids, batch.attention_mask, batch.labels)
        return EvalResult(None, total.mean(), self.total, [])


AnyEvaluator = Evaluator | DenoisingEvaluator
