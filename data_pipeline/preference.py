"""Preference pairs (prompt, chosen answer, rejected answer) → padded DPO steps, through the same windowed stream,
length grouping, resume and rank slicing as prompt/response rows (`data_pipeline.pairs`).

A sample is one pair. Each pair carries the starting model's log-probabilities of its two answers, computed once
before training (`training.reference`) and looked up here by the pair's row number in the files, so training holds
one model. A pair is skipped (and counted) when its prompt or an answer is empty, or its two answers are the same.
"""
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from data_pipeline.batch import LABEL_PAD, MicroBatch, Ragged
from data_pipeline.pairs import PairDataset, Rows
from data_pipeline.parquet import non_empty

USABLE, EMPTY, SAME_ANSWERS = 0, 1, 2  # why a pair is (not) trained on


def columns_of(cfg) -> tuple[str, str, str]:
    return cfg.prompt_column, cfg.chosen_column, cfg.rejected_column


def pair_verdicts(rows: pa.Table, columns) -> np.ndarray:
    """USABLE, EMPTY or SAME_ANSWERS for each row of `rows`."""
    _, chosen, rejected = (pc.fill_null(rows[name], "") for name in columns)
    verdicts = np.full(rows.num_rows, USABLE, dtype=np.int8)
    verdicts[pc.equal(chosen, rejected).to_numpy(zero_copy_only=False)] = SAME_ANSWERS
    verdicts[~non_empty(rows, columns)] = EMPTY
    return verdicts


def usable_pairs(rows: pa.Table) -> np.ndarray:
    """Which rows of a table of (prompt, chosen, rejected) columns, in that order, are pairs to train on."""
    return pair_verdicts(rows, rows.column_names) == USABLE


@dataclass
class PreferenceMicroBatch(MicroBatch):
    """B pairs: the prompts in `input_ids`, the 2B answers in `labels` (the chosen ones, then the rejected ones),
    the reference log-probabilities (B, 2) of (chosen, rejected), the chosen answers' token counts and each pair's
    weight (0 for a stand-in that trains nothing)."""

    reference: torch.Tensor
    chosen_tokens: torch.Tensor
    weights: torch.Tensor

    TENSORS = ("input_ids", "attention_mask", "labels", "reference", "chosen_tokens", "weights")

    @classmethod
    def of_pairs(cls, prompts: Ragged, chosen: Ragged, rejected: Ragged, reference: np.ndarray, pad_id: int,
                 multiple: int = 1) -> "PreferenceMicroBatch":
        input_ids, attention = prompts.padded(pad_id, multiple)
        labels, _ = Ragged.concat([chosen, rejected]).padded(LABEL_PAD, multiple)
        return cls(torch.from_numpy(input_ids), torch.from_numpy(attention.astype(np.int64)),
                   torch.from_numpy(labels), int(prompts.lengths.sum() + chosen.lengths.sum() + rejected.lengths.sum()),
                   bool(not attention.all()), torch.from_numpy(np.asarray(reference, dtype=np.float32)),
                   torch.from_numpy(chosen.lengths.astype(np.float32)), torch.ones(len(prompts.lengths)))

    @classmethod
    def placeholder(cls, eos_id: int) -> "PreferenceMicroBatch":
        """A pair that trains nothing (weight 0): a tail step with fewer pairs than micro-batches keeps ranks in
        step."""
        one = Ragged.from_lists([[eos_id]])
        batch = cls.of_pairs(one, one, one, np.zeros((1, 2)), eos_id)
        batch.weights.zero_()
        return batch


class PreferenceDataset(PairDataset):
    """Yields one `StepBatch` of preference pairs per optimizer step. `reference_path`: the training pairs'
    reference log-probabilities, a (rows, 2) float32 .npy by row number in the files, opened when first read."""

    sample_name = "pairs"

    def __init__(self, spec, tokenizer, columns: tuple[str, str, str], reference_path: str):
        super().__init__(spec, tokenizer, columns)
        self.reference_path, self._reference = reference_path, None

    def describe(self) -> str:
        return f"{self.num_rows} pairs"

    def _usable(self, rows) -> np.ndarray:
        return usable_pairs(rows)

    def _per_row(self, epoch: int, window: int) -> np.ndarray:
        """Each pair's reference log-probabilities, looked up by its row number in the files."""
        if self._reference is None:
            self._reference = np.load(self.reference_path, mmap_mode="r")
        return np.asarray(self._reference[self._window_row_ids(epoch, window)])

    def _answer_lengths(self, rows: Rows) -> np.ndarray:
        """The decoder's tokens of a pair: its longer answer (both are padded to the longest of the batch)."""
        return np.maximum(rows.texts[1].lengths, rows.texts[2].lengths)

    def _loss_weight(self, kept: Rows) -> int:
        """A step's loss is the mean over its pairs."""
        return len(kept.usable)

    def _micro_batch(self, rows: Rows) -> PreferenceMicroBatch:
        if len(rows.usable) == 0:
            return PreferenceMicroBatch.placeholder(self._eos_id)
        return PreferenceMicroBatch.of_pairs(*rows.texts, rows.per_row, self._pad_id, self.spec.pad_to_multiple_of)

    def __getstate__(self):
        return {**super().__getstate__(), "_reference": None}
