"""Pre-flight: every problem a user can fix, found at once before a model is built, one line each (exit 2).

It reads only parquet footers and small files, so it costs well under a second even for 10M rows, and runs on
every rank identically (no communication needed: the answers depend only on the shared files). It runs after the
process group starts (for the number of processes) and before anything is built or written.
"""
import logging
import os
import shutil

from config import split_paths
from data_pipeline.parquet import TEXT_COLUMNS, expand_paths, read_footer
from data_pipeline.preference import columns_of
from data_pipeline.span_corruption import SENTINEL_COUNT, corruption_of, sentinel_ids
from model.t5 import estimate_parameters
from training.checkpoint import complete_states
from training.optim import RECIPES
from training.runtime import tracker_names
from utils.errors import UserError, UserErrors

# fp32: a best model, final/ and the state's weights, plus AdamW's two moments in the state (the Adafactors' are
# a few MB: see training.optim.state_bytes).
SAVED_BYTES_PER_PARAMETER = {"relative": 4 * 3, "adamw": 4 * 3 + 8}
log = logging.getLogger("trainer")


def text_columns(cfg) -> tuple:
    """The columns the objective reads: prompt and response, the documents' column, or a pair's three."""
    return {"span_corruption": (cfg.text_column,), "dpo": columns_of(cfg)}.get(cfg.objective, TEXT_COLUMNS)


def file_rows(flag: str, files: str, problems: list, columns=TEXT_COLUMNS) -> int:
    """Rows in the files of one flag; each bad file adds a problem naming the flag and the file."""
    rows = 0
    try:
        paths = expand_paths(split_paths(files))
    except UserError as error:
        problems.append(f"--{flag}: {error}")
        return 0
    for path in paths:
        try:
            rows += read_footer(path, columns).num_rows
        except UserError as error:
            problems.append(f"--{flag}: {error}")
    return rows


def check_trackers(report_to: str, problems: list) -> None:
    """Trackers go through Accelerate; a name it does not know, or whose package is missing, is a problem."""
    import accelerate.utils
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    for name in tracker_names(report_to):
        installed = getattr(accelerate.utils, f"is_{name}_available", None)
        if name not in LOGGER_TYPE_TO_CLASS:
            problems.append(f"--report_to={report_to}: unknown tracker {name!r} "
                            f"(Accelerate knows: none, {', '.join(sorted(LOGGER_TYPE_TO_CLASS))})")
        elif installed is not None and not installed():
            problems.append(f"--report_to={report_to}: the {name} package is not installed (pip install {name})")


def check_tokenizer(cfg, problems: list) -> int | None:
    """The tokenizer's size when `tokenizer_dir` holds one; a directory with something else is a problem, and so
    is, for span corruption, a tokenizer without enough sentinel tokens (a new one gets 100)."""
    from model.tokenizer import has_tokenizer, load_tokenizer

    corruption = corruption_of(cfg)
    spans = corruption.spans(corruption.chunk_length(cfg.max_seq_len))
    if has_tokenizer(cfg.tokenizer_dir):
        try:
            tokenizer = load_tokenizer(cfg.tokenizer_dir)
            if cfg.objective == "span_corruption":
                sentinel_ids(tokenizer, spans, cfg.max_seq_len)
            return len(tokenizer)
        except UserError as error:
            problems.append(f"--tokenizer_dir: {error}")
    elif cfg.objective == "span_corruption" and spans > SENTINEL_COUNT:
        problems.append(f"--max_seq_len={cfg.max_seq_len}: a chunk would have {spans} noise spans, more than the "
                        f"{SENTINEL_COUNT} sentinel tokens a tokenizer gets: lower it or --noise_density, or raise "
                        "--mean_noise_span_length")
    elif os.path.exists(cfg.tokenizer_dir) and not os.path.isdir(cfg.tokenizer_dir):
        problems.append(f"--tokenizer_dir={cfg.tokenizer_dir}: is a file, not a directory")
    return None


def nearest_existing(path: str) -> str:
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_output_dir(cfg, needed_bytes: int, problems: list) -> None:
    existing = nearest_existing(cfg.output_dir)
    if not os.path.isdir(existing):
        problems.append(f"--output_dir={cfg.output_dir}: {existing} is a file, not a directory")
        return
    if not os.access(existing, os.W_OK | os.X_OK):
        problems.append(f"--output_dir={cfg.output_dir}: {existing} is not writable")
        return
    free = shutil.disk_usage(existing).free
    if free < needed_bytes:
        problems.append(f"--output_dir={cfg.output_dir}: {free / 1e9:.2f} GB free, a checkpoint and the resumable "
                        f"state need about {needed_bytes / 1e9:.2f} GB")
    if not cfg.is_keep_training and complete_states(cfg.output_dir):
        problems.append(f"--output_dir={cfg.output_dir}: holds a previous run's resumable state; resume it with "
                        "--is_keep_training=True, or choose another --output_dir (nothing was deleted)")


def check_before_training(cfg, model_cfg) -> None:
    """Raise UserErrors listing every problem."""
    problems = []
    file_rows("train_file", cfg.train_file, problems, text_columns(cfg))
    known_problems = len(problems)
    valid_rows = file_rows("validation_file", cfg.validation_file, problems, text_columns(cfg)) \
        if cfg.eval_max_samples else 0
    # (A span corruption evaluation packs its rows into chunks: any row with text is enough.)
    needed_eval_rows = 1 if cfg.objective == "span_corruption" else min(cfg.eval_max_samples, cfg.eval_batch_size)
    if cfg.eval_max_samples and len(problems) == known_problems and valid_rows < needed_eval_rows:
        problems.append(f"--validation_file={cfg.validation_file}: no rows to evaluate on"
                        if cfg.objective == "span_corruption" else
                        f"--validation_file={cfg.validation_file}: {valid_rows} rows, fewer than one evaluation "
                        f"batch ({needed_eval_rows} = min(--eval_max_samples, --eval_batch_size))")
    if cfg.eval_max_samples == 0 and cfg.keep_latest_n_ckp > 0:
        problems.append("--eval_max_samples=0 turns evaluation off, so no best model can be chosen: set "
                        "--keep_latest_n_ckp=0 as well, or evaluate at least one row")
    vocab = check_tokenizer(cfg, problems) or cfg.vocab_size
    saved = SAVED_BYTES_PER_PARAMETER["relative" if RECIPES[cfg.optimizer].relative else "adamw"]
    check_output_dir(cfg, estimate_parameters(model_cfg, vocab) * saved, problems)
    check_trackers(cfg.report_to, problems)
    if cfg.objective == "dpo" and cfg.compile:
        problems.append("--compile=True with --objective=dpo: a pair's forward runs the encoder once for two "
                        "answers, outside the compiled graph; train DPO without --compile")
    if model_cfg.d_kv * model_cfg.num_heads < 8:
        problems.append("--num_heads x --d_kv must be at least 8")
    if problems:
        raise UserErrors(problems)


def schedule_warnings(cfg, total_steps: int) -> list[str]:
    """Settings that work but look wrong, once the run's length is known (packed text: after its tokens are
    counted)."""
    warnings = []
    if cfg.warmup_steps >= total_steps:
        warnings.append(f"--warmup_steps={cfg.warmup_steps} is not below the run's {total_steps} steps: the "
                        "learning rate never reaches --learn_rate")
    if cfg.save_steps > total_steps:
        warnings.append(f"--save_steps={cfg.save_steps} exceeds the run's {total_steps} steps: states and "
                        "evaluations happen only at epoch ends")
    return warnings
