"""What a run tells its user besides the log lines: metrics.jsonl, Accelerate's trackers and the progress bar,
and the training lines every `logging_steps` (`Reporter`)."""
import contextlib
import json
import logging
import os
import sys
import time

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from utils.atomic import write_text_atomically

log = logging.getLogger("trainer")


class MetricsLog:
    """`metrics.jsonl` (one JSON object per line, see the contract) plus Accelerate's trackers."""

    def __init__(self, output_dir: str, accelerator):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.accelerator = accelerator
        self.is_main = accelerator.is_main_process

    def forget_after(self, step: int) -> None:
        """Steps after `step` will be run (again): their old lines would be duplicates. A line a crash cut short
        goes too. The file is replaced atomically: a crash here loses nothing."""
        if not self.is_main or not os.path.exists(self.path):
            return
        kept = []
        with open(self.path, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("step", 0) <= step:
                    kept.append(line.rstrip("\n") + "\n")
        write_text_atomically(self.path, "".join(kept))

    def write(self, event: str, **values) -> None:
        if self.is_main:
            with open(self.path, "a", encoding="utf-8") as out:
                out.write(json.dumps({"event": event, **values}, ensure_ascii=False) + "\n")
        numbers = {f"{event}/{k}": v for k, v in values.items() if isinstance(v, (int, float)) and k != "step"}
        if self.accelerator.trackers:
            self.accelerator.log(numbers, step=values.get("step"))


class Progress:
    """A tqdm bar with ETA on an interactive main process; in a pipe or log, the log lines are the progress.

    While the bar is up, the `trainer` logger's console lines go through tqdm, which redraws the bar below them
    instead of writing over it."""

    def __init__(self, is_main: bool, total: int, initial: int):
        self.bar, self.redirect = None, None
        if is_main and sys.stderr.isatty():
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
            self.redirect = logging_redirect_tqdm(loggers=[log])
            self.redirect.__enter__()

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def show(self, **postfix) -> None:
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.redirect.__exit__(None, None, None)
            self.bar.close()


HEARTBEAT_SECONDS = 30.0  # without a terminal's bar, the longest a run stays silent between two console lines


class Reporter:
    """Training lines every `logging_steps`: averaged over the interval's tokens, ranks and accumulation; the
    throughput counts training only (`paused` leaves evaluations and saves out).

    Without a terminal (output piped or sent to a file), where no bar shows that the run is alive, the console also
    gets a line after the first step and one whenever HEARTBEAT_SECONDS passed without any (the interval so far;
    metrics.jsonl keeps its cadence)."""

    def __init__(self, run):
        self.run = run
        # Where this invocation stops: the bar and the log lines count towards the same step.
        schedule = run.state.schedule_total_steps
        self.last_step = min(run.cfg.max_steps, schedule) if run.cfg.max_steps else schedule
        self.progress = Progress(run.accelerator.is_main_process, self.last_step, run.state.global_step)
        self.heartbeat = run.accelerator.is_main_process and self.progress.bar is None
        self.first_step = run.state.global_step + 1
        self.reset()

    def reset(self) -> None:
        self.loss_tokens, self.loss_sum, self.tokens, self.samples_at = 0, 0.0, 0, self.run.state.samples_seen
        self.preference_sums = {}  # DPO: each figure summed over the interval's pairs
        self.started = self.last_line = time.time()
        self.paused_seconds = 0.0

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (an evaluation, a save) is not training time: samples/s and tokens/s leave it out."""
        started = time.time()
        try:
            yield
        finally:
            self.paused_seconds += time.time() - started
            self.last_line = time.time()  # (an evaluation logs lines of its own)

    def after_step(self, outcome) -> None:
        state, cfg = self.run.state, self.run.cfg
        if outcome.finite:
            self.loss_sum += outcome.loss * outcome.target_tokens
            self.loss_tokens += outcome.target_tokens
            for name, value in (outcome.preference or {}).items():
                self.preference_sums[name] = self.preference_sums.get(name, 0.0) + value * outcome.target_tokens
        self.tokens += outcome.tokens
        self.last_outcome = outcome
        self.progress.update()
        if state.global_step % cfg.logging_steps == 0:
            self.log_interval(outcome, write_metrics=True)
        elif self.heartbeat and (state.global_step == self.first_step
                                 or time.time() - self.last_line >= HEARTBEAT_SECONDS):
            self.log_interval(outcome, write_metrics=False, reset=False)

    def log_interval(self, outcome, write_metrics: bool, reset: bool = True) -> None:
        state = self.run.state
        elapsed = max(time.time() - self.started - self.paused_seconds, 1e-9)
        record = dict(step=state.global_step, epoch=state.epoch, samples=state.samples_seen,
                      loss=self.loss_sum / self.loss_tokens if self.loss_tokens else None, lr=outcome.lr,
                      grad_norm=outcome.grad_norm, tokens_per_s=round(self.tokens / elapsed, 1),
                      samples_per_s=round((state.samples_seen - self.samples_at) / elapsed, 2),
                      **{name: total / self.loss_tokens if self.loss_tokens else None
                         for name, total in self.preference_sums.items()})
        if write_metrics:
            self.run.metrics.write("train", **record)
        loss = "n/a" if record["loss"] is None else f"{record['loss']:.4f}"
        preference = "" if "reward_accuracy" not in record else " | reward acc n/a" if record["loss"] is None else (
            f" | reward acc {record['reward_accuracy']:.3f} | margin {record['reward_margin']:.3f}")
        log.info("step %d/%d epoch %d | loss %s%s | lr %.3e | grad norm %.3f | %.1f samples/s | %.0f tokens/s",
                 state.global_step, self.last_step, state.epoch, loss, preference, record["lr"],
                 record["grad_norm"], record["samples_per_s"], record["tokens_per_s"])
        self.progress.show(loss=loss, lr=f"{record['lr']:.2e}", samples_s=record["samples_per_s"])
        self.last_line = time.time()
        if reset:
            self.reset()

    def close(self) -> None:
        """The steps since the last log line get one (console and log file; metrics.jsonl keeps its cadence), so
        that a run shorter than `logging_steps` still shows its loss."""
        if self.loss_tokens or self.tokens:
            self.log_interval(self.last_outcome, write_metrics=False)
        self.progress.close()
