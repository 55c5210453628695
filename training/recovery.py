"""What the loop does when a step goes wrong: a non-finite loss or gradient, or the GPU running out of memory.

Both decisions are the same on every rank: the step's outcome comes from values all ranks reduced together.
"""
import logging

from training.memory import release_memory
from utils.errors import RankAborted, RunAborted

log = logging.getLogger("trainer")


def guard_against_divergence(state, outcome, max_bad_steps: int) -> None:
    """A non-finite loss or gradient skips the update on every rank (they share the reduced values)."""
    if outcome.finite:
        state.consecutive_bad_steps = 0
        return
    state.consecutive_bad_steps += 1
    state.bad_steps_total += 1
    what = "non-finite (DeepSpeed's engine applied or skipped it itself)" if outcome.engine_stepped else "skipped"
    log.warning("step %d %s: loss %s, gradient norm %s (%d in a row, %d in total)", state.global_step, what,
                outcome.loss, outcome.grad_norm, state.consecutive_bad_steps, state.bad_steps_total)
    if state.consecutive_bad_steps >= max_bad_steps:
        raise RunAborted(f"training diverged: {state.consecutive_bad_steps} consecutive steps with a non-finite "
                         f"loss or gradient (--max_bad_steps={max_bad_steps}); the last saved state and the best "
                         "models are kept. Lower --learn_rate or raise --warmup_steps, then resume with "
                         "--is_keep_training=True")


def shrink_micro_batch(run, outcome) -> None:
    """Out of GPU memory: a smaller micro-batch with more accumulation keeps the global batch and data order."""
    state = run.state
    size = state.batch_size_per_gpu
    smaller = next((d for d in range(size // 2, 0, -1) if size % d == 0), None)
    where = f"out of GPU memory at step {state.global_step + 1} with --batch_size_per_gpu={size}"
    advice = ("lower --max_seq_len (e.g. 128) or use a smaller model" if smaller is None else
              f"resume with --is_keep_training=True --batch_size_per_gpu={smaller} "
              f"--gradient_accumulation_steps={state.gradient_accumulation_steps * size // smaller}")
    if outcome.alone:
        raise RankAborted(f"{where}, {outcome.alone}, where the other ranks cannot be told to retry: {advice}")
    if smaller is None:
        raise RunAborted(f"{where}: {advice}")
    if run.stepper.engine_steps:
        raise RunAborted(f"{where}; DeepSpeed fixes the micro-batch when it starts: {advice}, and the same "
                         "gradient_accumulation_steps in the DeepSpeed config")
    state.gradient_accumulation_steps *= size // smaller
    state.batch_size_per_gpu = smaller
    run.accelerator.gradient_accumulation_steps = state.gradient_accumulation_steps
    release_memory()
    log.warning("out of GPU memory at step %d: retrying with batch_size_per_gpu=%d, gradient_accumulation_steps=%d "
                "(same global batch); a resume keeps these", state.global_step + 1, smaller,
                state.gradient_accumulation_steps)
