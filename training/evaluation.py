"""Evaluation: validation loss and BLEU-4 of greedy generations, split across ranks and gathered as strings."""
import logging
import sys
from dataclasses import dataclass

import torch
from accelerate.utils import gather_object
from tqdm import tqdm

from model.loss import padded, token_loss_sum
from model.parquet import first_usable_rows
from utils.metrics import bleu4

log = logging.getLogger("trainer")
EXAMPLES_LOGGED = 3


@dataclass
class EvalResult:
    bleu4: float
    eval_loss: float
    samples: int
    examples: list  # (prompt, reference, generation) triples


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

    @torch.no_grad()
    def evaluate(self, model, progress: bool = False) -> EvalResult:
        """`progress`: a bar on an interactive terminal (the `evaluate` command; training logs lines instead)."""
        unwrapped = self.accelerator.unwrap_model(model)
        was_training = unwrapped.training
        unwrapped.eval()
        device = self.accelerator.device
        loss_sum, tokens = torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long)
        generations = [""] * len(self.prompts)
        bar = tqdm(total=self.batch_count, unit="batch", desc="evaluating",
                   disable=not (progress and self.accelerator.is_main_process and sys.stderr.isatty()))
        with self.accelerator.autocast(), bar:
            for rows, input_ids, attention_mask, labels in self.batches():
                input_ids, attention_mask, labels = (t.to(device) for t in (input_ids, attention_mask, labels))
                batch_loss, batch_tokens = token_loss_sum(unwrapped, input_ids, attention_mask, labels)
                loss_sum += batch_loss
                tokens += batch_tokens
                output = unwrapped.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                            num_beams=1, max_new_tokens=self.max_seq_len, use_cache=True)
                for row, text in zip(rows, self.tokenizer.batch_decode(output, skip_special_tokens=True)):
                    generations[row] = text
                bar.update(1)
        unwrapped.train(was_training)
        totals = self.accelerator.reduce(torch.stack([loss_sum, tokens.float()]), "sum")
        triples = gather_object(list(zip(self.prompts, self.references, generations)))
        score = bleu4([t[2] for t in triples], [t[1] for t in triples])
        eval_loss = (totals[0] / totals[1].clamp(min=1)).item()
        return EvalResult(score, eval_loss, len(triples), triples[:EXAMPLES_LOGGED])
