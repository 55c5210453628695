"""Evaluation on the validation file, split across ranks: for seq2seq the loss and BLEU-4 of greedy generations
(gathered as strings), for span corruption the held-out denoising loss (BLEU means nothing there), for preference
pairs the DPO loss, reward accuracy and margins against the reference, and a few greedy answers."""
import contextlib
import logging
import sys
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from accelerate.utils import gather_object
from tqdm import tqdm

from model.loss import padded, token_loss_sum
from data_pipeline.packed_text import EVAL_STREAM, leading_chunks, mask_generator
from data_pipeline.parquet import first_usable_rows
from data_pipeline.span_corruption import corruption_of, sentinel_ids
from data_pipeline.batch import MicroBatch, Ragged
from data_pipeline.preference import PreferenceMicroBatch, columns_of, usable_pairs
from data_pipeline.tokenize import shared_encoder, tokenize
from model.preference import PREFERENCE_STATS, PreferenceLoss, answer_logps
from training.memory import release_memory
from utils.errors import RunAborted
from utils.metrics import bleu4

log = logging.getLogger("trainer")
EXAMPLES_LOGGED = 3


@dataclass
class EvalResult:
    bleu4: float | None  # None for span corruption and preference pairs
    eval_loss: float
    samples: int
    examples: list  # (prompt, reference, generation) triples
    preference: dict | None = None  # preference pairs: PREFERENCE_STATS, means over the pairs

    @property
    def reward_accuracy(self) -> float | None:
        return None if self.preference is None else self.preference["reward_accuracy"]


def build_evaluator(cfg, accelerator, tokenizer, reference=None):
    """`reference`: the run's `ReferenceLogps` (preference pairs)."""
    if cfg.objective == "span_corruption":
        return DenoisingEvaluator(accelerator, tokenizer, cfg)
    if cfg.objective == "dpo":
        return PreferenceEvaluator(accelerator, tokenizer, cfg, reference)
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


class HalvingBatches:
    """Evaluation's batches, halved when the GPU runs out of memory (generation's key/value cache grows with every
    token, so a batch that fit the first answers may not fit a long one): the batch that failed is scored in halves,
    and the smaller size is kept for the rest of the run."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size

    def blocks(self, items: list):
        """Consecutive blocks of `items`, each as long as the batch size when it is taken."""
        start = 0
        while start < len(items):
            block = items[start: start + self.batch_size]
            yield block
            start += len(block)  # (the size may have been halved while the block was scored)

    def run(self, rows: list, score) -> list:
        """[(rows, score(rows))] for `rows`, or for its halves (and theirs) where a part ran out of memory."""
        try:
            return [(rows, score(rows))]
        except torch.OutOfMemoryError:
            if len(rows) == 1:
                raise RunAborted("out of GPU memory evaluating a single row: lower --max_seq_len (evaluation "
                                 "generates up to that many tokens), or use --eval_max_samples=0") from None
        release_memory()
        half = len(rows) // 2
        if half < self.batch_size:
            log.warning("evaluation ran out of GPU memory with a batch of %d rows: going on with batches of %d",
                        len(rows), half)
            self.batch_size = half
        return self.run(rows[:half], score) + self.run(rows[half:], score)


class LossTotal:
    """Token cross-entropy summed over batches, with its number of target tokens; `mean()` over every rank."""

    def __init__(self, accelerator):
        self.accelerator, device = accelerator, accelerator.device
        self.loss, self.tokens = torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long)

    def add(self, loss: torch.Tensor, tokens: torch.Tensor) -> None:
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
        self.halving = HalvingBatches(batch_size)
        self.max_seq_len = max_seq_len
        prompts, responses = first_usable_rows(path, max_samples) if max_samples else ([], [])
        self.total = len(prompts)
        rank, world = accelerator.process_index, accelerator.num_processes
        self.prompts, self.references = prompts[rank::world], responses[rank::world]

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, truncation=True, max_length=self.max_seq_len)["input_ids"]

    @property
    def batch_count(self) -> int:
        return -(-len(self.prompts) // self.halving.batch_size)

    def score(self, model, rows: list, prompt_ids: list, response_ids: list) -> tuple:
        """Loss terms and greedy answers of some rows, or an out-of-memory error with nothing kept."""
        device, pad = self.accelerator.device, self.tokenizer.pad_token_id
        input_ids = padded([prompt_ids[i] for i in rows], pad).to(device)
        labels = padded([response_ids[i] for i in rows], -100).to(device)
        attention_mask = (input_ids != pad).long()
        loss, tokens = token_loss_sum(model, input_ids, attention_mask, labels)
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False, num_beams=1,
                                max_new_tokens=self.max_seq_len, use_cache=True)
        return loss, tokens, self.tokenizer.batch_decode(output, skip_special_tokens=True)

    def evaluate(self, model, progress: bool = False) -> EvalResult:
        """`progress`: a bar on an interactive terminal (the `evaluate` command; training logs lines instead)."""
        total, generations = LossTotal(self.accelerator), [""] * len(self.prompts)
        prompt_ids, response_ids = self.encode(self.prompts), self.encode(self.references)
        bar = tqdm(total=len(self.prompts), unit="row", desc="evaluating",
                   disable=not (progress and self.accelerator.is_main_process and sys.stderr.isatty()))
        with scoring(self.accelerator, model) as unwrapped, bar:
            # Rows of similar prompt length together: little padding, faster generation.
            for rows in self.halving.blocks(sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))):
                for part, (loss, tokens, texts) in self.halving.run(rows, lambda part: self.score(
                        unwrapped, part, prompt_ids, response_ids)):
                    total.add(loss, tokens)
                    for row, text in zip(part, texts):
                        generations[row] = text
                bar.update(len(rows))
        eval_loss = total.mean()
        triples = gather_object(list(zip(self.prompts, self.references, generations)))
        score = bleu4([t[2] for t in triples], [t[1] for t in triples])
        return EvalResult(score, eval_loss, len(triples), triples[:EXAMPLES_LOGGED])


class DenoisingEvaluator:
    """The denoising loss on the first `eval_max_samples` chunks of the validation file's documents, packed and
    corrupted as training does it, with masks of their own seeds: the same chunks and spans at every evaluation, so
    the losses of a run compare. Rank r scores chunks r, r+W, ...; the token-weighted mean is taken over all."""

    def __init__(self, accelerator, tokenizer, cfg):
        self.accelerator, self.pad_id = accelerator, tokenizer.pad_token_id
        self.halving = HalvingBatches(cfg.eval_batch_size)
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
        total = LossTotal(self.accelerator)
        with scoring(self.accelerator, model) as unwrapped:
            for indices in self.halving.blocks(list(range(len(self.pairs)))):
                for _, (loss, tokens) in self.halving.run(indices, lambda part: self.score(unwrapped, part)):
                    total.add(loss, tokens)
        return EvalResult(None, total.mean(), self.total, [])

    def score(self, model, indices: list) -> tuple:
        pairs = [self.pairs[i] for i in indices]
        batch = MicroBatch.padded(Ragged.from_lists([inputs for inputs, _ in pairs]),
                                  Ragged.from_lists([targets for _, targets in pairs]), self.pad_id)
        batch = batch.to(self.accelerator.device)
        return token_loss_sum(model, batch.input_ids, batch.attention_mask, batch.labels)


def pair_logps(accelerator, model, halving: HalvingBatches, texts, rows: np.ndarray, pad_id: int) -> torch.Tensor:
    """(len(rows), 2): the summed log-probabilities of the chosen and rejected answers of pairs `rows` of `texts`
    (the prompts', chosen and rejected answers' `Ragged`s) under `model`, in `halving`'s batches, in the order
    given; a prompt mask only where a batch's prompts are padded, as the training step passes it."""
    logps = torch.zeros(len(rows), 2, device=accelerator.device)

    def score(part: list) -> torch.Tensor:
        picked = rows[part]
        batch = PreferenceMicroBatch.of_pairs(*(text.take(picked) for text in texts), np.zeros((len(picked), 2)),
                                              pad_id).to(accelerator.device)
        mask = batch.attention_mask if batch.input_padding else None
        return answer_logps(unwrapped, batch.input_ids, mask, batch.labels).view(2, -1).T.float()

    with scoring(accelerator, model) as unwrapped:
        for block in halving.blocks(list(range(len(rows)))):
            for part, values in halving.run(block, score):
                logps[part] = values
    return logps


class PreferenceEvaluator:
    """The DPO loss and figures on the first `eval_max_samples` usable validation pairs; rank r scores pairs r, r+W,
    ... The reference pass computes the starting model's log-probabilities of them with `answer_logps`, batch for
    batch as an evaluation does: an evaluation of the starting model finds every reward exactly 0. The first
    prompts' greedy answers are logged beside their chosen answers."""

    def __init__(self, accelerator, tokenizer, cfg, reference):
        self.accelerator, self.tokenizer, self.reference = accelerator, tokenizer, reference
        self.loss, self.max_seq_len = PreferenceLoss.of(cfg), cfg.max_seq_len
        self.halving = HalvingBatches(cfg.eval_batch_size)
        columns = columns_of(cfg)
        self.pairs = first_usable_rows(cfg.validation_file, cfg.eval_max_samples, columns, usable_pairs) \
            if cfg.eval_max_samples else [[] for _ in columns]
        self.total = len(self.pairs[0])
        rank, world = accelerator.process_index, accelerator.num_processes
        self.indices = list(range(rank, self.total, world))
        # Tokenized as training tokenizes pairs.
        encoder = shared_encoder(tokenizer, cfg.max_seq_len)
        self.texts = [tokenize(encoder, pa.array([column[i] for i in self.indices], pa.string()))
                      for column in self.pairs]

    def answer_logps(self, model) -> torch.Tensor:
        """(this rank's pairs, 2): the summed log-probabilities of their chosen and rejected answers under `model`."""
        return pair_logps(self.accelerator, model, self.halving, self.texts, np.arange(len(self.indices)),
                          self.tokenizer.pad_token_id)

    def evaluate(self, model, progress: bool = False) -> EvalResult:
        policy = self.answer_logps(model)
        reference = torch.from_numpy(np.load(self.reference.path("valid"))[self.indices]).to(policy)
        chosen_tokens = torch.from_numpy(self.texts[1].lengths.astype(np.float32)).to(policy)
        losses, stats = self.loss.per_pair(policy, reference, chosen_tokens)
        sums = torch.cat([torch.stack([losses.sum(), torch.tensor(float(len(self.indices))).to(policy)]),
                          stats.sum(dim=0)])
        with scoring(self.accelerator, model) as unwrapped:
            examples = self.examples(unwrapped)
        totals = self.accelerator.reduce(sums, "sum").tolist()
        pairs = max(totals[1], 1)
        return EvalResult(None, totals[0] / pairs, int(totals[1]), examples,
                          dict(zip(PREFERENCE_STATS, (value / pairs for value in totals[2:]))))

    def examples(self, model) -> list:
        """Greedy answers to the first validation prompts (the main process's), beside their chosen answers."""
        prompts, chosen, _ = (column[:EXAMPLES_LOGGED] for column in self.pairs)
        if not self.accelerator.is_main_process or not prompts:
            return []
        inputs = self.tokenizer(prompts, truncation=True, max_length=self.max_seq_len, padding=True,
                                return_tensors="pt").to(self.accelerator.device)
        output = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=self.max_seq_len)
        return list(zip(prompts, chosen, self.tokenizer.batch_decode(output, skip_special_tokens=True)))


AnyEvaluator = Evaluator | DenoisingEvaluator | PreferenceEvaluator
