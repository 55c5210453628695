"""The real CLI with faults and probes patched in from outside, for tests that need what no real run does.

    python tests/patched_cli.py COMMAND --flags...        (alone or under torchrun, like train_low_mem.py)

Environment variables choose the patches:
- T5LM_TEST_OOM_FROM_ROWS=N: every micro-batch of at least N rows runs out of GPU memory in its forward pass;
- with T5LM_TEST_OOM_IN_BACKWARD_ON_RANK=R as well: instead in the last micro-batch's backward, on rank R only;
- T5LM_TEST_ECHO_FLAGS=1: `generate` prints the flags it received instead of loading a model.
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


def patch_echo_flags() -> None:
    import commands.saved_model as saved_model

    saved_model.generate_command = lambda flags: print(repr(flags))


if __name__ == "__main__":
    if int(os.environ.get(OOM_FROM_ROWS, "0")):
        patch_out_of_memory(int(os.environ[OOM_FROM_ROWS]), os.environ.get(OOM_IN_BACKWARD_ON_RANK))
    if os.environ.get(ECHO_FLAGS):
        patch_echo_flags()
    main(train_low_mem.COMMANDS)
