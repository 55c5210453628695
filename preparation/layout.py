"""Where `prepare` puts things, and the rule by which other commands find the files of a prepared directory.

Kept free of heavy imports: `data_pipeline.parquet.expand_paths` and `config` consult it on every command line.
"""
import os

TRAIN_FILE = "train.parquet"
VALID_FILE = "valid.parquet"
REPORT_FILE = "prepare_report.json"
"""Written last: a directory holding it is a finished prepared directory (it also names the flags used)."""
WORK_DIR = ".prepare_work"
"""The phases' intermediate files and their manifest, removed once the outputs are in place."""
SPLIT_FILES = {"train": TRAIN_FILE, "valid": VALID_FILE}
HISTOGRAM_FILES = {"train": "lengths_train.png", "valid": "lengths_valid.png"}


def is_prepared_dir(path) -> bool:
    """A directory `prepare` finished writing (its report exists, and so do the files it names)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, REPORT_FILE))


def prepared_file(path, split: str = "train"):
    """The rule: a prepared directory given where a parquet file is expected stands for its `train.parquet`
    (train_file, train_tokenizer, plan) or, given as a validation file, its `valid.parquet`. Any other path is
    returned unchanged."""
    return os.path.join(path, SPLIT_FILES[split]) if is_prepared_dir(path) else path
