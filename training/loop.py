"""The training loop. It drives the parts `training.run` builds; each part decides its own timing."""
import logging
import os
import time

from config import with_resolved_paths
from training.checkpoint import FINAL_DIR, save_hf_model
from training.init_from import starting_settings
from training.memory import freeze_startup_objects
from training.preflight import check_before_training, schedule_warnings
from training.recovery import guard_against_divergence, shrink_micro_batch
from training.reporting import Reporter
from training.run import Run, build_run
from training.runtime import build_accelerator, start_processes
from training.schedule import learning_rate
from utils.distributed import lost_contact
from utils.errors import RankAborted, RunAborted

log = logging.getLogger("trainer")


def run_training(cfg, model_cfg, given=frozenset()) -> None:
    cfg = with_resolved_paths(cfg)
    processes, runtime = start_processes(cfg)
    cfg, model_cfg = starting_settings(cfg, model_cfg, given, processes)
    # Every user mistake, before anything is built or written.
    check_before_training(cfg, model_cfg)
    run = build_run(cfg, model_cfg, build_accelerator(cfg, runtime), runtime)
    for warning in schedule_warnings(cfg, run.state.schedule_total_steps):
        log.warning(warning)
    agreed_ending = False
    try:
        fit(run)
        agreed_ending = True
    except RunAborted as abort:
        agreed_ending = abort.every_rank
        raise
    except RuntimeError as error:
        if not lost_contact(error):
            raise
        # Its own traceback would only bury the other process's report, the one that says what went wrong.
        raise RankAborted("another process stopped (its error says why) while this one waited for it in "
                          "a collective") from None
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


def fit(run: Run) -> None:
    state, cfg = run.state, run.cfg
    if run.reference and not run.reference.run(run.model, run.signals.is_requested):
        return  # stopped during the reference pass, before any step: nothing to save
    if state.global_step == 0 and cfg.init_from:
        evaluate(run)  # the starting model's score: what this run has to improve on (and a best-k candidate)
    reporter = Reporter(run)  # after it: the first throughput figure counts training only
    freeze_startup_objects()
    while state.epoch < cfg.epochs and not reached_max_steps(run):
        for step in run.feed.epoch_steps(state):
            rate = learning_rate(state, cfg.learn_rate, cfg.warmup_steps)
            outcome = run.stepper.run(step, rate, run.signals.is_requested)
            if outcome.out_of_memory:
                shrink_micro_batch(run, outcome)
                break  # re-enter the epoch at the same position, split into smaller micro-batches
            state.samples_seen += step.end_sample - state.epoch_sample
            state.epoch_sample = step.end_sample
            state.skipped_rows += step.skipped
            state.global_step += 1
            reporter.after_step(outcome)
            run.memory.after_step(state.global_step)
            guard_against_divergence(state, outcome, cfg.max_bad_steps)
            # A save that falls on a non-finite step waits for the next good one: the kept state stays good.
            state.milestone_due = state.milestone_due or run.checkpointer.due(state.global_step)
            if state.milestone_due and outcome.finite:
                with reporter.paused():
                    evaluate(run)
                    if state.epoch_sample < run.feed.num_samples:  # at an epoch's last step, the epoch's end saves
                        save_state(run)
            if outcome.stop_requested:
                return finish(run, reporter, "stopped by a signal", "; resume with --is_keep_training=True")
            if reached_max_steps(run) and state.epoch_sample < run.feed.num_samples:
                break  # (at the epoch's last step the loop runs out by itself, and the epoch's end still happens)
        else:
            with reporter.paused():
                end_of_epoch(run)
    finish(run, reporter, "max_steps reached" if reached_max_steps(run) else "all epochs done")


def reached_max_steps(run: Run) -> bool:
    return 0 < run.cfg.max_steps <= run.state.global_step


def evaluate(run: Run) -> None:
    """Evaluate: the model becomes a best-k candidate. A save of the resumable state follows."""
    state = run.state
    state.milestone_due, state.milestone_step = False, state.global_step
    if run.evaluator.total:
        started = time.time()
        result = run.evaluator.evaluate(run.model)
        bleu = {} if result.bleu4 is None else {"bleu4": result.bleu4}  # span corruption, pairs: no BLEU
        preference = result.preference or {}
        run.metrics.write("eval", step=state.global_step, epoch=state.epoch, **bleu, eval_loss=result.eval_loss,
                          samples=state.samples_seen, **preference)
        figures = "".join(f"{name} {value:.4f}, " for name, value in bleu.items()) + "".join(
            f"{name.replace('_', ' ')} {preference[name]:.4f}, " for name in ("reward_accuracy", "reward_margin")
            if name in preference)
        log.info("eval at step %d (epoch %d): %seval loss %.4f on %d %s in %.1fs", state.global_step, state.epoch,
                 figures, result.eval_loss, result.samples, run.feed.sample_name, time.time() - started)
        for prompt, reference, generation in result.examples:
            log.info("example | prompt: %s | reference: %s | generated: %s", prompt[:80], reference[:80],
                     generation[:80])
        score = getattr(result, run.best.metric)  # the EvalResult field the best models are ranked by
        tie_score = getattr(result, run.best.tie_break) if run.best.tie_break else None
        if run.best.keep and run.best.consider(run.model, state, score, tie_score):
            log.info("step %d entered the best %d (%s %.4f)", state.global_step, run.best.keep, run.best.metric,
                     score)


def end_of_epoch(run: Run) -> None:
    state = run.state
    # (Packing skips empty documents: they hold no token.)
    skipped = {"seq2seq": f" ({state.skipped_rows} rows with an empty prompt or response skipped so far)",
               "dpo": f" ({state.skipped_rows} pairs with an empty prompt or answer, or the same two answers, "
                      "skipped so far)"}.get(run.cfg.objective, "")
    log.info("epoch %d done at step %d%s", state.epoch, state.global_step, skipped)
    if state.milestone_step != state.global_step:
        evaluate(run)
    state.epoch += 1
    state.epoch_sample = 0
    save_state(run)  # once: the position after the epoch's last step is the start of the next


def save_state(run: Run) -> None:
    """Save the resumable state; only once one is written that no longer lists them may the best models that
    fell out of the top k go (a position saved already keeps its state, and with it their entries)."""
    if run.checkpointer.save(run.state):
        run.best.sync_disk(run.state.best)


def finish(run: Run, reporter: Reporter, reason: str, advice: str = "") -> None:
    reporter.close()  # first: its last line's throughput is the training's, without the saves below
    save_state(run)
    final = os.path.join(run.cfg.output_dir, FINAL_DIR)
    save_hf_model(run.accelerator, run.model, run.tokenizer, final)
    log.info("%s at step %d: model in %s%s", reason, run.state.global_step, final, advice)
