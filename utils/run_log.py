"""What a run tells its user: the console, the human log file, metrics.jsonl, trackers and the progress bar.

Only the main process writes files and the console. Every decision is agreed on by all ranks, so other ranks would
only repeat the main process's lines; they print to stderr just what they alone know (a signal they received) and
errors.
"""
import json
import logging
import os
import sys
import time

from tqdm import tqdm

LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"
# `log.warning(..., extra=THIS_RANK_ONLY)`: something only this rank knows, so every rank prints it.
THIS_RANK_ONLY = {"this_rank_only": True}


def only_this_ranks_news(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR or getattr(record, "this_rank_only", False)


def log_file_path(log_dir: str) -> str:
    return os.path.join(log_dir, time.strftime("chat_trainer_low_mem_%Y%m%d.log"))


def quiet_libraries() -> None:
    """Library chatter (per-save progress bars, notes on tied weights) would bury the training lines."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    for name in ("accelerate", "accelerate.checkpointing", "accelerate.accelerator", "accelerate.utils.other"):
        logging.getLogger(name).setLevel(logging.ERROR)


def setup_logging(log_dir: str, is_main: bool, rank: int) -> logging.Logger:
    """The `trainer` logger: console and the day's log file on the main process; elsewhere only news of that rank."""
    quiet_libraries()
    logger = logging.getLogger("trainer")
    logger.handlers.clear()
    logger.propagate = False
    console = logging.StreamHandler(sys.stdout if is_main else sys.stderr)
    console.setFormatter(logging.Formatter(LOG_FORMAT if is_main else f"[rank {rank}] %(levelname)s %(message)s"))
    console.setLevel(logging.INFO)
    if not is_main:
        console.addFilter(only_this_ranks_news)
    logger.addHandler(console)
    if is_main:
        os.makedirs(log_dir, exist_ok=True)
        file_handler = logging.FileHandler(log_file_path(log_dir), encoding="utf-8")
        file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logger.addHandler(file_handler)
    logger.setLevel(logging.INFO)
    return logger


class MetricsLog:
    """`metrics.jsonl` (one JSON object per line, see the contract) plus Accelerate's trackers."""

    def __init__(self, output_dir: str, accelerator, resume_step: int | None):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.accelerator = accelerator
        self.is_main = accelerator.is_main_process
        if self.is_main and resume_step is not None:
            self._forget_after(resume_step)

    def _forget_after(self, step: int) -> None:
        """Steps after the resumed state will be run again; their old lines would be duplicates. A line a crash
        cut short goes too. The file is rewritten under another name and renamed: a crash here loses nothing."""
        if not os.path.exists(self.path):
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
        with open(self.path + ".tmp", "w", encoding="utf-8") as out:
            out.writelines(kept)
            out.flush()
            os.fsync(out.fileno())
        os.replace(self.path + ".tmp", self.path)

    def write(self, event: str, **values) -> None:
        if self.is_main:
            with open(self.path, "a", encoding="utf-8") as out:
                out.write(json.dumps({"event": event, **values}, ensure_ascii=False) + "\n")
        numbers = {f"{event}/{k}": v for k, v in values.items() if isinstance(v, (int, float)) and k != "step"}
        if self.accelerator.trackers:
            self.accelerator.log(numbers, step=values.get("step"))


class Progress:
    """A tqdm bar with ETA on an interactive main process; in a pipe or log, the log lines are the progress."""

    def __init__(self, is_main: bool, total: int, initial: int):
        self.bar = None
        if is_main and sys.stderr.isatty():
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def show(self, **postfix) -> None:
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
