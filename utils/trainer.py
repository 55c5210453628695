"""The training loop. It only drives the parts built by `utils.run_setup`; each part decides its own timing."""
import logging
import os
import time

from config import with_resolved_paths
from utils.checkpoint import FINAL_DIR, save_hf_model
from utils.errors import RankAborted, RunAborted
from utils.memory import freeze_startup_objects, release_memory
from utils.preflight import check_before_training
from utils.run_log import Progress
from utils.run_setup import prepare_run

log = logging.getLogger("trainer")


def run_training(cfg, model_cfg) -> None:
    cfg = with_resolved_paths(cfg)
    warnings = check_before_training(cfg, model_cfg)  # every user mistake, before anything is built
    run = prepare_run(cfg, model_cfg)
    for warning in warnings:
        log.warning(warning)
    agreed_ending = False
    try:
        train_loop(run)
        agreed_ending = True
    except RunAborted as abort:
        agreed_ending = abort.every_rank
        raise
    finally:
        run.signals.restore()
        close_run(run.accelerator, agreed_ending)


def close_run(accelerator, agreed_ending: bool) -> None:
    """Finish the trackers, then leave together. A launcher (torchrun, accelerate launch) kills the other ranks as
    soon as one exits with an error, so after an agreed abort every rank waits until all have finished writing.
    After an unexpected error on one rank the others may be stuck in a collective: no waiting then."""
    for tracker in accelerator.trackers:
        tracker.finish()
    if agreed_ending:
        accelerator.wait_for_everyone()
    accelerator.state.destroy_process_group()


def train_loop(run) -> None:
    state, cfg = run.state, run.cfg
    reporter = Reporter(run)
    freeze_startup_objects()
    while state.epoch < cfg.epochs and not reached_max_steps(run):
        for bundle in run.feed.epoch_steps(state):
            outcome = run.stepper.run(bundle, run.signals.requested)
            if outcome.out_of_memory:
                shrink_micro_batch(run, outcome)
                break  # re-enter the epoch at the same position, split into smaller micro-batches
            state.samples_seen += bundle["end_sample"] - state.epoch_sample
            state.epoch_sample = bundle["end_sample"]
            state.skipped_rows += bundle["skipped"]
            state.global_step += 1
            reporter.after_step(outcome)
            run.memory.after_step(state.global_step)
            guard_against_divergence(state, outcome, cfg.max_bad_steps)
            # A save that falls on a non-finite step waits for the next good one: the kept state stays good.
            state.milestone_due = state.milestone_due or run.checkpointer.due(state.global_step)
            if state.milestone_due and outcome.finite:
                milestone(run)
            if outcome.stop_requested:
                return finish(run, reporter, "stopped by a signal; resume with --is_keep_training=True")
            if reached_max_steps(run) and state.epoch_sample < run.feed.num_rows:
                break  # (at the epoch's last step the loop runs out by itself, and the epoch's end still happens)
        else:
            end_of_epoch(run)
    finish(run, reporter, "max_steps reached" if reached_max_steps(run) else "all epochs done")


def reached_max_steps(run) -> bool:
    return 0 < run.cfg.max_steps <= run.state.global_step


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
    if outcome.in_all_reduce:
        raise RankAborted(f"{where}, inside the last micro-batch's gradient all-reduce, where the other ranks cannot "
                          f"be told to retry: {advice}")
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


def milestone(run) -> None:
    """Evaluate (the model becomes a best-k candidate), then save the resumable state."""
    state = run.state
    state.milestone_due, state.milestone_step = False, state.global_step
    if run.evaluator.total:
        started = time.time()
        result = run.evaluator.evaluate(run.model)
        run.metrics.write("eval", step=state.global_step, epoch=state.epoch, bleu4=result.bleu4,
                          eval_loss=result.eval_loss, samples=state.samples_seen)
        log.info("eval at step %d (epoch %d): bleu4 %.4f, eval loss %.4f on %d rows in %.1fs", state.global_step,
                 state.epoch, result.bleu4, result.eval_loss, result.samples, time.time() - started)
        for prompt, reference, generation in result.examples:
            log.info("example | prompt: %s | reference: %s | generated: %s", prompt[:80], reference[:80],
                     generation[:80])
        if run.best.keep and run.best.consider(run.model, state, result.bleu4):
            log.info("step %d entered the best %d (bleu4 %.4f)", state.global_step, run.best.keep, result.bleu4)
    save_state(run)


def end_of_epoch(run) -> None:
    state = run.state
    log.info("epoch %d done at step %d (%d rows with an empty prompt or response skipped so far)", state.epoch,
             state.global_step, state.skipped_rows)
    if state.milestone_step != state.global_step:
        milestone(run)
    state.epoch += 1
    state.epoch_sample = 0
    save_state(run)


def save_state(run) -> None:
    """Save the resumable state; only once one is written that no longer lists them may the best models that
    fell out of the top k go (a position saved already keeps its state, and with it their entries)."""
    if run.checkpointer.save(run.state):
        run.best.sync_disk(run.state.best)


def finish(run, reporter, reason: str) -> None:
    save_state(run)
    save_hf_model(run.accelerator, run.model, run.tokenizer, os.path.join(run.cfg.output_dir, FINAL_DIR))
    reporter.close()
    log.info("%s at step %d: model in %s", reason, run.state.global_step, os.path.join(run.cfg.output_dir, FINAL_DIR))


class Reporter:
    """Training lines every `logging_steps`: averaged over the interval's tokens, ranks and accumulation."""

    def __init__(self, run):
        self.run = run
        total = run.cfg.max_steps or run.total_steps
        self.progress = Progress(run.accelerator.is_main_process, total, run.state.global_step)
        self.reset()

    def reset(self) -> None:
        self.loss_tokens, self.loss_sum, self.tokens, self.samples_at = 0, 0.0, 0, self.run.state.samples_seen
        self.started = time.time()

    def after_step(self, outcome) -> None:
        state, cfg = self.run.state, self.run.cfg
        if outcome.finite:
            self.loss_sum += outcome.loss * outcome.target_tokens
            self.loss_tokens += outcome.target_tokens
        self.tokens += outcome.tokens
        self.progress.update()
        if state.global_step % cfg.logging_steps:
            return
        elapsed = max(time.time() - self.started, 1e-9)
        record = dict(step=state.global_step, epoch=state.epoch, samples=state.samples_seen,
                      loss=self.loss_sum / self.loss_tokens if self.loss_tokens else None, lr=outcome.lr,
                      grad_norm=outcome.grad_norm, tokens_per_s=round(self.tokens / elapsed, 1),
                      samples_per_s=round((state.samples_seen - self.samples_at) / elapsed, 2))
        self.run.metrics.write("train", **record)
        loss = "n/a" if record["loss"] is None else f"{record['loss']:.4f}"
        log.info("step %d/%d epoch %d | loss %s | lr %.3e | grad norm %.3f | %.1f samples/s | %.0f tokens/s",
                 state.global_step, self.run.total_steps, state.epoch, loss, record["lr"],
                 record["grad_norm"], record["samples_per_s"], record["tokens_per_s"])
        self.progress.show(loss=loss, lr=f"{record['lr']:.2e}", samples_s=record["samples_per_s"])
        self.reset()

    def close(self) -> None:
        self.progress.close()
