"""The real CLI with faults and probes patched in from outside, for tests that need what no real run does.

    python tests/patched_cli.py COMMAND --flags...        (alone or under torchrun, like train_low_mem.py)

Environment variables choose the patches:
- T5LM_TEST_OOM_FROM_ROWS=N: every micro-batch of at least N rows runs out of GPU memory in its forward pass;
- with T5LM_TEST_OOM_IN_BACKWARD_ON_RANK=R as well: instead in the last micro-batch's backward, on rank R only;
- with T5LM_TEST_OOM_IN_FORWARD_ON_RANK=R as well: in the forward pass as above, on rank R only;
- T5LM_TEST_OOM_IN_CLIPPING_AT_STEP=K: clipping the gradients of optimizer step K (the first attempt) runs out of
  GPU memory;
- T5LM_TEST_EVAL_OOM_FROM_ROWS=N: evaluation runs out of GPU memory on every batch of at least N rows;
- T5LM_TEST_ECHO_FLAGS=1: `generate` prints the flags it received instead of loading a model;
- T5LM_TEST_SLOW_FORWARD=S: every micro-batch's forward pass takes S seconds longer (a step long enough to be
  interrupted in the middle);
- T5LM_TEST_SLOW_EVALUATION=S: every evaluation takes S seconds longer;
- T5LM_TEST_SLOW_REFERENCE=S: every part of DPO's reference pass takes S seconds longer;
- T5LM_TEST_REFERENCE_PART_PAIRS=N: the reference pass cuts the training pairs into parts of N pairs;
- T5LM_TEST_UNREADABLE_ON_RANK=R:K: rank R cannot build its step K of the run (as if its data file broke there),
  while every other rank goes on;
- T5LM_TEST_COUNT_COLLECTIVES=1: every optimizer step prints to stderr how many torch.distributed collectives
  the Python side started during it (DDP's gradient all-reduce runs in C++ and is not counted);
- T5LM_TEST_COUNT_READS=1: every optimizer step after the first prints to stderr how many times the main thread read
  a tensor's value into Python (item, float, int, bool, tolist, numpy, cpu) since the step before began: on a GPU
  each read of a device tensor is a transfer that makes the host wait for the device.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import train_low_mem  # noqa: E402
from commands.cli import main  # noqa: E402

OOM_FROM_ROWS = "T5LM_TEST_OOM_FROM_ROWS"
OOM_IN_BACKWARD_ON_RANK = "T5LM_TEST_OOM_IN_BACKWARD_ON_RANK"
OOM_IN_FORWARD_ON_RANK = "T5LM_TEST_OOM_IN_FORWARD_ON_RANK"
OOM_IN_CLIPPING_AT_STEP = "T5LM_TEST_OOM_IN_CLIPPING_AT_STEP"
EVAL_OOM_FROM_ROWS = "T5LM_TEST_EVAL_OOM_FROM_ROWS"
ECHO_FLAGS = "T5LM_TEST_ECHO_FLAGS"
SLOW_FORWARD = "T5LM_TEST_SLOW_FORWARD"
SLOW_EVALUATION = "T5LM_TEST_SLOW_EVALUATION"
SLOW_REFERENCE = "T5LM_TEST_SLOW_REFERENCE"
REFERENCE_PART_PAIRS = "T5LM_TEST_REFERENCE_PART_PAIRS"
COUNT_COLLECTIVES = "T5LM_TEST_COUNT_COLLECTIVES"
COUNT_READS = "T5LM_TEST_COUNT_READS"
UNREADABLE_ON_RANK = "T5LM_TEST_UNREADABLE_ON_RANK"


def patch_out_of_memory(rows_limit: int, backward_rank: str | None, forward_rank: str | None) -> None:
    import training.step as step

    real_loss, real_pair_loss, real_backward = step.token_loss_sum, step.preference_loss_sum, step.StepRunner.backward
    last_rows = [0]
    in_forward = backward_rank is None and forward_rank in (None, os.environ.get("RANK", "0"))

    def check(rows: int) -> None:
        last_rows[0] = rows
        if in_forward and rows >= rows_limit:
            raise torch.OutOfMemoryError(f"test: forward of {rows} rows")

    def loss_that_runs_out_of_memory(model, input_ids, *args, **kwargs):
        check(input_ids.shape[0])
        return real_loss(model, input_ids, *args, **kwargs)

    def pair_loss_that_runs_out_of_memory(model, batch, *args, **kwargs):
        check(batch.input_ids.shape[0])
        return real_pair_loss(model, batch, *args, **kwargs)

    def backward_that_runs_out_of_memory(self, loss):
        if (last_rows[0] >= rows_limit and self.accelerator.sync_gradients
                and self.accelerator.process_index == int(backward_rank)):
            raise torch.OutOfMemoryError(f"test: backward of {last_rows[0]} rows")
        return real_backward(self, loss)

    step.token_loss_sum = loss_that_runs_out_of_memory
    step.preference_loss_sum = pair_loss_that_runs_out_of_memory
    if backward_rank is not None:
        step.StepRunner.backward = backward_that_runs_out_of_memory


def patch_out_of_memory_in_clipping(at_step: int) -> None:
    import training.step as step

    real_run, steps = step.StepRunner.run, [0]

    def run_whose_clipping_runs_out_of_memory(self, *args, **kwargs):
        steps[0] += 1
        if steps[0] != at_step:
            return real_run(self, *args, **kwargs)
        real_clip = self.accelerator.clip_grad_norm_

        def clip(*clip_args, **clip_kwargs):
            raise torch.OutOfMemoryError("test: clipping")

        self.accelerator.clip_grad_norm_ = clip
        try:
            return real_run(self, *args, **kwargs)
        finally:
            self.accelerator.clip_grad_norm_ = real_clip

    step.StepRunner.run = run_whose_clipping_runs_out_of_memory


def patch_evaluation_out_of_memory(rows_limit: int) -> None:
    import training.evaluation as evaluation

    real_score = evaluation.Evaluator.score

    def score_that_runs_out_of_memory(self, model, rows, *args):
        if len(rows) >= rows_limit:
            raise torch.OutOfMemoryError(f"test: evaluating {len(rows)} rows")
        return real_score(self, model, rows, *args)

    evaluation.Evaluator.score = score_that_runs_out_of_memory


def patch_slow_forward(seconds: float) -> None:
    import time

    import training.step as step

    real_forward = step.StepRunner.forward

    def slow_forward(self, batch):
        time.sleep(seconds)
        return real_forward(self, batch)

    step.StepRunner.forward = slow_forward


def patch_slow_evaluation(seconds: float) -> None:
    import time

    import training.evaluation as evaluation

    real_evaluate = evaluation.Evaluator.evaluate

    def slow_evaluate(self, *args, **kwargs):
        time.sleep(seconds)
        return real_evaluate(self, *args, **kwargs)

    evaluation.Evaluator.evaluate = slow_evaluate


def patch_reference_pass(seconds: float, part_pairs: int) -> None:
    import time

    import training.reference as reference

    if part_pairs:
        reference.PART_PAIRS = part_pairs
    real_part = reference.ReferencePass.part_logps

    def slow_part(self, *args, **kwargs):
        time.sleep(seconds)
        return real_part(self, *args, **kwargs)

    reference.ReferencePass.part_logps = slow_part


def patch_count_collectives() -> None:
    import torch.distributed as dist

    import training.step as step

    started = [0]
    for name in ("all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list", "barrier",
                 "reduce", "gather", "scatter"):
        real = getattr(dist, name)

        def counted(*args, _real=real, **kwargs):
            started[0] += 1
            return _real(*args, **kwargs)

        setattr(dist, name, counted)
    real_run = step.StepRunner.run

    def counting_run(self, *args, **kwargs):
        before = started[0]
        outcome = real_run(self, *args, **kwargs)
        print(f"collectives in step: {started[0] - before}", file=sys.stderr, flush=True)
        return outcome

    step.StepRunner.run = counting_run


def patch_count_reads() -> None:
    from torch.utils._python_dispatch import TorchDispatchMode

    import training.step as step

    reads = [0]

    class CountingReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:  # item(), float(), int(), bool()
                reads[0] += 1
            return func(*args, **(kwargs or {}))

    for name in ("tolist", "numpy", "cpu"):  # these read without an operator the mode would see
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, **kwargs):
            reads[0] += 1
            return _real(self, *args, **kwargs)

        setattr(torch.Tensor, name, counted)
    real_run, steps = step.StepRunner.run, [0]

    def counting_run(self, *args, **kwargs):
        if steps[0]:
            print(f"reads since the step before: {reads[0]}", file=sys.stderr, flush=True)
        steps[0] += 1
        reads[0] = 0
        return real_run(self, *args, **kwargs)

    step.StepRunner.run = counting_run
    CountingReads().__enter__()  # for the rest of the process, in the main thread (the data feed's thread is not)


def patch_unreadable_step(rank: int, broken_step: int) -> None:
    import training.feed as feed
    from utils.errors import UnreadableData

    real_epoch_steps = feed.DataFeed.epoch_steps

    def epoch_steps_that_break(self, state):
        for built, step in enumerate(real_epoch_steps(self, state), start=state.global_step + 1):
            if self.rank == rank and built == broken_step:
                raise UnreadableData(f"test: rank {rank} cannot read the rows of step {broken_step}")
            yield step

    feed.DataFeed.epoch_steps = epoch_steps_that_break


def patch_echo_flags() -> None:
    import commands.generate as generate

    generate.generate_command = lambda flags: print(repr(flags))


if __name__ == "__main__":
    if int(os.environ.get(OOM_FROM_ROWS, "0")):
        patch_out_of_memory(int(os.environ[OOM_FROM_ROWS]), os.environ.get(OOM_IN_BACKWARD_ON_RANK),
                            os.environ.get(OOM_IN_FORWARD_ON_RANK))
    if int(os.environ.get(OOM_IN_CLIPPING_AT_STEP, "0")):
        patch_out_of_memory_in_clipping(int(os.environ[OOM_IN_CLIPPING_AT_STEP]))
    if int(os.environ.get(EVAL_OOM_FROM_ROWS, "0")):
        patch_evaluation_out_of_memory(int(os.environ[EVAL_OOM_FROM_ROWS]))
    if os.environ.get(ECHO_FLAGS):
        patch_echo_flags()
    if float(os.environ.get(SLOW_FORWARD, "0")):
        patch_slow_forward(float(os.environ[SLOW_FORWARD]))
    if float(os.environ.get(SLOW_EVALUATION, "0")):
        patch_slow_evaluation(float(os.environ[SLOW_EVALUATION]))
    if os.environ.get(SLOW_REFERENCE) or os.environ.get(REFERENCE_PART_PAIRS):
        patch_reference_pass(float(os.environ.get(SLOW_REFERENCE, "0")), int(os.environ.get(REFERENCE_PART_PAIRS, "0")))
    if os.environ.get(COUNT_COLLECTIVES):
        patch_count_collectives()
    if os.environ.get(COUNT_READS):
        patch_count_reads()
    if os.environ.get(UNREADABLE_ON_RANK):
        patch_unreadable_step(*map(int, os.environ[UNREADABLE_ON_RANK].split(":")))
    main(train_low_mem.COMMANDS)
