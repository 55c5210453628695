"""The real CLI with faults and probes patched in from outside, for tests that need what no real run does.

    python tests/patched_cli.py COMMAND --flags...        (alone or under torchrun, like train_low_mem.py)

Environment variables choose the patches:
- T5LM_TEST_OOM_FROM_ROWS=N: every micro-batch of at least N rows runs out of GPU memory in its forward pass;
- with T5LM_TEST_OOM_IN_BACKWARD_ON_RANK=R as well: instead in the last micro-batch's backward, on rank R only;
- T5LM_TEST_ECHO_FLAGS=1: `generate` prints the flags it received instead of loading a model;
- T5LM_TEST_SLOW_FORWARD=S: every micro-batch's forward pass takes S seconds longer (a step long enough to be
  interrupted in the middle);
- T5LM_TEST_UNREADABLE_ON_RANK=R:K: rank R cannot build its step K of the run (as if its data file broke there),
  while every other rank goes on;
- T5LM_TEST_COUNT_COLLECTIVES=1: every optimizer step prints to stderr how many torch.distributed collectives
  the Python side started during it (DDP's gradient all-reduce runs in C++ and is not counted).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import train_low_mem  # noqa: E402
from commands.cli import main  # noqa: E402

OOM_FROM_ROWS = "T5LM_TEST_OOM_FROM_ROWS"
OOM_IN_BACKWARD_ON_RANK = "T5LM_TEST_OOM_IN_BACKWARD_ON_RANK"
ECHO_FLAGS = "T5LM_TEST_ECHO_FLAGS"
SLOW_FORWARD = "T5LM_TEST_SLOW_FORWARD"
COUNT_COLLECTIVES = "T5LM_TEST_COUNT_COLLECTIVES"
UNREADABLE_ON_RANK = "T5LM_TEST_UNREADABLE_ON_RANK"


def patch_out_of_memory(rows_limit: int, backward_rank: str | None) -> None:
    import training.step as step

    real_loss, real_backward = step.token_loss_sum, step.StepRunner.backward
    last_rows = [0]

    def loss_that_runs_out_of_memory(model, input_ids, *args, **kwargs):
        last_rows[0] = input_ids.shape[0]
        if backward_rank is None and last_rows[0] >= rows_limit:
            raise torch.OutOfMemoryError(f"test: forward of {last_rows[0]} rows")
        return real_loss(model, input_ids, *args, **kwargs)

    def backward_that_runs_out_of_memory(self, loss):
        if (last_rows[0] >= rows_limit and self.accelerator.sync_gradients
                and self.accelerator.process_index == int(backward_rank)):
            raise torch.OutOfMemoryError(f"test: backward of {last_rows[0]} rows")
        return real_backward(self, loss)

    step.token_loss_sum = loss_that_runs_out_of_memory
    if backward_rank is not None:
        step.StepRunner.backward = backward_that_runs_out_of_memory


def patch_slow_forward(seconds: float) -> None:
    import time

    import training.step as step

    real_forward = step.StepRunner.forward

    def slow_forward(self, batch):
        time.sleep(seconds)
        return real_forward(self, batch)

    step.StepRunner.forward = slow_forward


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
    import commands.saved_model as saved_model

    saved_model.generate_command = lambda flags: print(repr(flags))


if __name__ == "__main__":
    if int(os.environ.get(OOM_FROM_ROWS, "0")):
        patch_out_of_memory(int(os.environ[OOM_FROM_ROWS]), os.environ.get(OOM_IN_BACKWARD_ON_RANK))
    if os.environ.get(ECHO_FLAGS):
        patch_echo_flags()
    if float(os.environ.get(SLOW_FORWARD, "0")):
        patch_slow_forward(float(os.environ[SLOW_FORWARD]))
    if os.environ.get(COUNT_COLLECTIVES):
        patch_count_collectives()
    if os.environ.get(UNREADABLE_ON_RANK):
        patch_unreadable_step(*map(int, os.environ[UNREADABLE_ON_RANK].split(":")))
    main(train_low_mem.COMMANDS)
