"""The `trainer` logger: the console and the day's human log file on the main process; on the other ranks only
what that rank alone knows (a signal it received) and errors, on stderr.

Every decision is agreed on by all ranks, so other ranks would only repeat the main process's lines.
"""
import logging
import os
import sys
import time

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
