"""What a training step is made of: this rank's padded micro-batches (`MicroBatch`) of one optimizer step
(`StepBatch`), the token-id storage they are cut from (`Ragged`), and the arithmetic of global batches.

The global batch of a step is `batch_size x world_size x gradient_accumulation_steps` samples; every rank builds
all of it and takes its own slices, so how a step is split over ranks and micro-steps never changes which samples
it trains on.
"""
import itertools
import math
from dataclasses import dataclass, replace

import numpy as np
import torch

LABEL_PAD = -100  # the label of a padded position: the loss ignores it, as Hugging Face models do


def global_batch_size(batch_size: int, world_size: int, gradient_accumulation_steps: int) -> int:
    """Samples of one optimizer step over all ranks: the unit the data order and the schedule are made of."""
    return batch_size * world_size * gradient_accumulation_steps


def steps_per_epoch(num_samples: int, global_batch: int) -> int:
    return math.ceil(num_samples / global_batch)


@dataclass
class MicroBatch:
    """One rank's samples of one micro-step, padded: pad in `input_ids`, -100 in `labels`."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    real_tokens: int
    """Input and target tokens, padding not counted: known when the batch is built, so that a training step never
    reads it back from the device."""
    input_padding: bool
    """Whether an input row is padded. Without padding the model needs no attention mask (and T5 then adds its
    position bias without expanding it to every row)."""

    TENSORS = ("input_ids", "attention_mask", "labels")

    def to(self, device, non_blocking: bool = False) -> "MicroBatch":
        return replace(self, **{name: getattr(self, name).to(device, non_blocking=non_blocking)
                                for name in self.TENSORS})

    def pin_memory(self) -> "MicroBatch":  # DataLoader(pin_memory=True) calls this
        return replace(self, **{name: getattr(self, name).pin_memory() for name in self.TENSORS})

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.TENSORS}

    @classmethod
    def of(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> "MicroBatch":
        """A batch of tensors made elsewhere (benchmarks, tests); its real tokens counted from them."""
        return cls(input_ids, attention_mask, labels, int(attention_mask.sum()) + int((labels != LABEL_PAD).sum()),
                   not bool(attention_mask.all()))

    @classmethod
    def padded(cls, inputs: "Ragged", targets: "Ragged", pad_id: int, multiple: int = 1) -> "MicroBatch":
        """Rows of input and target ids, right-padded (each to a width that is a multiple of `multiple`)."""
        input_ids, attention = inputs.padded(pad_id, multiple)
        labels, _ = targets.padded(LABEL_PAD, multiple)
        return cls(torch.from_numpy(input_ids), torch.from_numpy(attention.astype(np.int64)), torch.from_numpy(labels),
                   int(inputs.lengths.sum() + targets.lengths.sum()), bool(not attention.all()))

    @classmethod
    def placeholder(cls, eos_id: int) -> "MicroBatch":
        """A row that trains no token: a tail step with fewer samples than micro-batches keeps ranks in step."""
        return cls(torch.tensor([[eos_id]]), torch.tensor([[1]]), torch.tensor([[LABEL_PAD]]), 1, False)


@dataclass
class StepBatch:
    """This rank's micro-batches of one optimizer step, and what the step means for the whole run."""

    micro_batches: list
    epoch: int
    end_sample: int
    """Global samples of the epoch consumed once this step is done: the position to resume from."""
    step_tokens: int
    """The loss's denominator for the whole global batch (all ranks): its target tokens (preference pairs: its
    pairs)."""
    skipped: int
    """Rows of the global batch dropped for an empty prompt or response."""

    def pin_memory(self) -> "StepBatch":
        return StepBatch([batch.pin_memory() for batch in self.micro_batches], self.epoch, self.end_sample,
                         self.step_tokens, self.skipped)


class Ragged:
    """Token id sequences of different lengths in one flat array: sequence i is flat[offsets[i]:offsets[i + 1]].

    Keeps a window's tokens as two numpy arrays instead of thousands of Python lists.
    """

    def __init__(self, flat: np.ndarray, offsets: np.ndarray):
        self.flat, self.offsets, self.lengths = flat, offsets, np.diff(offsets)

    @classmethod
    def from_encodings(cls, encodings) -> "Ragged":
        return cls.from_lists([encoding.ids for encoding in encodings])

    @classmethod
    def from_lists(cls, id_lists) -> "Ragged":
        lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
        flat = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=np.int32, count=int(lengths.sum()))
        return cls(flat, np.r_[0, np.cumsum(lengths)])

    def slice(self, lo: int, hi: int) -> "Ragged":
        return Ragged(self.flat[self.offsets[lo]:self.offsets[hi]], self.offsets[lo:hi + 1] - self.offsets[lo])

    def take(self, rows: np.ndarray) -> "Ragged":
        lengths = self.lengths[rows]
        offsets = np.r_[0, np.cumsum(lengths)]
        # Element j of the result, in row k, comes from old offset of row k + (j - new offset of row k).
        source = np.repeat(self.offsets[rows] - offsets[:-1], lengths) + np.arange(offsets[-1])
        return Ragged(self.flat[source], offsets)

    @staticmethod
    def concat(parts) -> "Ragged":
        starts = np.cumsum([0] + [part.offsets[-1] for part in parts[:-1]])
        offsets = np.concatenate([[0]] + [part.offsets[1:] + start for part, start in zip(parts, starts)])
        return Ragged(np.concatenate([part.flat for part in parts]), offsets)

    def padded(self, fill: int, multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """An int64 matrix right-padded with `fill` to a width that is a multiple of `multiple`, and the mask of its
        real tokens."""
        width = -(-int(self.lengths.max()) // multiple) * multiple
        real = np.arange(width) < self.lengths[:, None]
        matrix = np.full(real.shape, fill, dtype=np.int64)
        matrix[real] = self.flat
        return matrix, real
