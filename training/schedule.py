"""The learning-rate schedule: a pure function of the training state, set on the optimizer before every step.

Linear warmup from 0 to `learn_rate` over `warmup_steps`, then a cosine to 0.1 x `learn_rate` at the run's last
step (the contract). A resume that changes the run's length (more epochs, another global batch) re-aims the
decay: it goes on from where it was over the steps that are left (`reaim`), so the rate neither jumps nor misses
0.1x at the real last step.
"""
import math

FINAL_LR_FRACTION = 0.1


def decay_progress(step: int, warmup_steps: int, total_steps: int, anchor: tuple | None = None) -> float:
    """How far the cosine decay is (0..1) for the step that runs after `step` steps.

    It runs from the end of the warmup to the run's last step (`step == total_steps - 1`). `anchor` (step,
    progress) is where a re-aimed schedule goes on from instead.
    """
    start, done = anchor or (warmup_steps, 0.0)
    return min(1.0, done + (1 - done) * (step - start) / max(1, total_steps - 1 - start))


def lr_factor(step: int, warmup_steps: int, total_steps: int, anchor: tuple | None = None) -> float:
    """Multiplier of `learn_rate` for the optimizer step that runs after `step` steps (logged as step + 1).

    0 -> 1 linearly over `warmup_steps`, then cosine from 1 down to exactly 0.1 at the run's last step.
    """
    if step < warmup_steps:
        return step / warmup_steps
    progress = decay_progress(step, warmup_steps, total_steps, anchor)
    return FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))


def learning_rate(state, learn_rate: float, warmup_steps: int) -> float:
    """The rate of the step `state` is about to take, in `learn_rate`'s units."""
    anchor = tuple(state.decay_anchor) or None
    return learn_rate * lr_factor(state.global_step, warmup_steps, state.schedule_total_steps, anchor)


def reaim(state, warmup_steps: int, total_steps: int) -> None:
    """Point the schedule of `state` at a run of `total_steps` steps.

    An unchanged length keeps the exact formula, so a resumed run equals the uninterrupted one. A changed length
    past the warmup anchors the decay at the current step and progress.
    """
    planned = state.schedule_total_steps
    if planned and planned != total_steps and state.global_step > warmup_steps:
        anchor = tuple(state.decay_anchor) or None
        state.decay_anchor = [state.global_step, decay_progress(state.global_step, warmup_steps, planned, anchor)]
    state.schedule_total_steps = total_steps
