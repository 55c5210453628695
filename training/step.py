"""One optimizer step: accumulation over the step's micro-batches, token-normalised loss, clipping, the guards.

The loss of a step is the sum of token cross-entropies over every micro-batch of every rank divided by the step's
number of target tokens, which the data pipeline counts for the whole global batch (every rank builds the same
global batch, so no communication is needed); for preference pairs, the sum of the pairs' losses divided by the
global batch's pairs. Each micro-batch contributes `sum * W * A / T` because DDP averages
gradients over the W ranks and Accelerate's `backward` divides by the A accumulation steps; the result is the
exact gradient of the step's mean token loss, so accumulation and data parallelism are re-groupings of one sum.
"""
import math
from dataclasses import dataclass

import torch
from accelerate.utils import DistributedType

from data_pipeline.batch import MicroBatch, StepBatch
from data_pipeline.preference import PreferenceMicroBatch
from model.loss import token_loss_sum
from model.preference import PREFERENCE_STATS, PreferenceLoss, preference_loss_sum
from training.compile import DynamicShapes
from training.optim import set_learning_rate


@dataclass
class StepOutcome:
    loss: float = math.nan
    grad_norm: float = math.nan
    finite: bool = True
    out_of_memory: bool = False
    alone: str = ""  # where this rank ran out of memory if the others cannot be told to retry (then: stop)
    stop_requested: bool = False
    target_tokens: int = 0  # response tokens of the whole global batch: the loss's weight
    tokens: int = 0  # prompt + response tokens of the whole global batch, for throughput
    preference: dict | None = None  # DPO: PREFERENCE_STATS, means over the global batch's pairs
    lr: float = 0.0  # the learning rate this step used
    engine_stepped: bool = False  # non-finite, but DeepSpeed's engine applied (or skipped) the update itself


@dataclass
class StepTotals:
    """What each rank adds to the step's one all-reduce (summed over the ranks), as the host reads it back."""

    loss_sum: float
    stop_requested: float
    out_of_memory: float
    tokens: float
    preference: tuple = ()  # DPO: the sums of PREFERENCE_STATS over the global batch's pairs

    @staticmethod
    def all_reduced(accelerator, like: torch.Tensor, *values, preference: torch.Tensor) -> torch.Tensor:
        """The ranks' values summed, left on the device: the host reads them with the gradient norm, later."""
        vector = torch.stack([value.reshape(()).to(like) if isinstance(value, torch.Tensor)
                              else torch.tensor(float(value)).to(like) for value in values])
        return accelerator.reduce(torch.cat([vector, preference.to(like)]), "sum")

    @classmethod
    def read(cls, reduced: torch.Tensor, grad_norm) -> tuple["StepTotals", float]:
        """The totals and the gradient norm in the step's one device-to-host transfer. The norm needs no reduction:
        after the gradient all-reduce every rank holds the same gradients. (DeepSpeed may give it as a number, or
        none at all.)"""
        norm = grad_norm if isinstance(grad_norm, torch.Tensor) else torch.tensor(
            math.nan if grad_norm is None else float(grad_norm))
        values = torch.cat([reduced, norm.reshape(1).to(reduced)]).tolist()
        return cls(*values[:4], tuple(values[4:-1])), values[-1]


def rng_snapshot() -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def restore_rng(snapshot: tuple) -> None:
    """A retried step must draw the same dropout masks as if it had run once."""
    torch.set_rng_state(snapshot[0])
    if snapshot[1] is not None:
        torch.cuda.set_rng_state_all(snapshot[1])


class StepRunner:
    def __init__(self, accelerator, model, optimizer, max_grad_norm: float, compile: bool = False,
                 preference: PreferenceLoss | None = None):
        self.accelerator = accelerator
        self.model = model
        # Only the training forward is compiled: evaluation's generation would recompile for every new length, and
        # the wrapper shares the model's parameters, so saving and loading see the plain module.
        self.compiling = compile
        self.forward_model = DynamicShapes(model) if compile else model
        self.optimizer = optimizer
        self.preference = preference  # DPO's loss, for batches of pairs
        self.max_norm = max_grad_norm if max_grad_norm > 0 else math.inf
        # `prepare_decoder_input_ids_from_labels` lives on the bare model, not on the DDP wrapper.
        self.bare_model = accelerator.unwrap_model(model)
        self.eos_id = self.bare_model.config.eos_token_id  # a stand-in micro-batch's one token
        # DeepSpeed's engine clips, steps (skipping only fp16 overflows) and zeroes inside the last backward: a
        # non-finite step cannot be skipped here, and the engine fixes its micro-batch size when it is built.
        self.engine_steps = accelerator.distributed_type == DistributedType.DEEPSPEED

    def forward(self, batch: MicroBatch) -> tuple[torch.Tensor | None, torch.Tensor, bool]:
        """Summed loss of one micro-batch and its summed PREFERENCE_STATS (none but for pairs); (None, _, True)
        when it ran out of memory."""
        stats = self.no_stats
        try:
            batch = batch.to(self.accelerator.device, non_blocking=True)
            # Without padding no mask is needed, but a compiled graph would take a mask that is sometimes absent for
            # a second graph.
            mask = batch.attention_mask if batch.input_padding or self.compiling else None
            if isinstance(batch, PreferenceMicroBatch):
                loss, stats = preference_loss_sum(self.forward_model, batch, mask, self.preference, self.bare_model)
            else:
                loss, _ = token_loss_sum(self.forward_model, batch.input_ids, mask, batch.labels,
                                         bare_model=self.bare_model)
            return loss, stats, False
        except torch.OutOfMemoryError:
            return None, stats, True

    @property
    def no_stats(self) -> torch.Tensor:
        return torch.zeros(len(PREFERENCE_STATS) if self.preference else 0, device=self.accelerator.device)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def run(self, step: StepBatch, learning_rate: float, stop_requested=lambda: False) -> StepOutcome:
        """One optimizer step at `learning_rate` (learn_rate's units), with one agreement between the ranks and one
        device-to-host transfer.

        The agreement comes just before the last micro-batch's backward, the only one that communicates (it
        all-reduces the gradients): the step's loss and tokens, whether a rank ran out of memory, and
        `stop_requested()`, so that a stop asked for during the step ends the run after it. The host reads the
        result only after clipping, together with the gradient norm, and then decides: drop an attempt a rank ran
        out of memory in (that rank joined the gradient all-reduce with a stand-in, so nobody waited), skip a
        non-finite step, or take it. Reading earlier would make the GPU wait for the host in the middle of every
        step.
        """
        micro_batches = step.micro_batches
        scale = self.accelerator.num_processes * len(micro_batches) / max(step.step_tokens, 1)
        loss_sum, stat_sums = torch.zeros((), device=self.accelerator.device), self.no_stats
        local_tokens = sum(batch.real_tokens for batch in micro_batches)
        # Set first: DeepSpeed's engine takes its optimizer step inside the last backward.
        set_learning_rate(self.optimizer, learning_rate)
        rng = rng_snapshot()
        failed = False  # this rank ran out of memory: the attempt is void, the others learn it at the agreement
        self.accelerator.step = 0  # our step batches always hold exactly one accumulation cycle
        last = len(micro_batches) - 1
        for index, batch in enumerate(micro_batches):
            with self.accelerator.accumulate(self.model):
                loss, stats, oom = (None, stat_sums, True) if failed else self.forward(batch)
                failed = failed or oom
                if index == last:
                    reduced = StepTotals.all_reduced(
                        self.accelerator, loss_sum, loss_sum if failed else loss_sum + loss.detach(), stop_requested(),
                        failed, local_tokens, preference=stat_sums if failed else stat_sums + stats)
                    if failed and self.accelerator.num_processes == 1:
                        return self.abandon(rng)
                    if failed:
                        loss, stats, oom = self.forward(type(batch).placeholder(self.eos_id))
                        if oom:
                            return StepOutcome(out_of_memory=True, alone="joining the others' gradient all-reduce")
                        loss = loss * 0.0
                elif failed:
                    continue  # the backwards before the last do not communicate: nobody waits for this rank
                try:
                    self.backward(loss * scale)
                    loss_sum += loss.detach()
                    stat_sums += stats
                except torch.OutOfMemoryError:
                    if index < last:
                        failed = True
                    elif self.accelerator.num_processes > 1:
                        return StepOutcome(out_of_memory=True, alone="inside the last micro-batch's gradient all-reduce")
                    else:
                        return self.abandon(rng)
        try:
            # Under DeepSpeed this is the engine's norm of the step it has taken (None if it kept none).
            norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.max_norm)
            totals, grad_norm = StepTotals.read(reduced, norm)
        except torch.OutOfMemoryError:  # (the norms' temporaries) known to this rank only, after the agreement
            if self.accelerator.num_processes > 1:
                return StepOutcome(out_of_memory=True, alone="while clipping the gradients")
            return self.abandon(rng)
        if totals.out_of_memory > 0:
            return self.abandon(rng)
        mean_loss = totals.loss_sum / max(step.step_tokens, 1)
        finite = math.isfinite(mean_loss) and math.isfinite(grad_norm) if norm is not None else math.isfinite(mean_loss)
        # fp16's GradScaler must see every step: it skips non-finite ones itself and lowers its scale; without its
        # update the next step's unscale fails. Other precisions skip here.
        if finite or self.accelerator.scaler is not None:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        preference = dict(zip(PREFERENCE_STATS, (value / max(step.step_tokens, 1) for value in totals.preference))) \
            if self.preference else None
        return StepOutcome(loss=mean_loss, grad_norm=grad_norm, finite=finite,
                           stop_requested=totals.stop_requested > 0, target_tokens=step.step_tokens,
                           tokens=int(totals.tokens), lr=learning_rate, preference=preference,
                           engine_stepped=self.engine_steps and not finite)

    def abandon(self, rng) -> StepOutcome:
        """Out of memory somewhere: drop this attempt's gradients and randomness so the retry starts clean."""
        # Not `optimizer.zero_grad()`: Accelerate's wrapper ignores it on micro-steps before the last one. The bare
        # model's: a DeepSpeed engine's own `zero_grad` takes no arguments.
        self.bare_model.zero_grad(set_to_none=True)
        restore_rng(rng)
        return StepOutcome(out_of_memory=True)
