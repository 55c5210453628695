"""`prepare`: raw corpora -> clean, deduplicated, shuffled train/valid parquet files (see preparation/).

This module decides what may happen to --output_dir before any work: a directory prepare finished with the same
flags and inputs is left as it is (nothing to do); one finished with other flags is replaced only with
--overwrite=True; an unfinished one resumes (or starts over, when its flags differ); any other non-empty directory
is refused, so that prepare never deletes files it did not write.
"""
import glob
import json
import os

from commands.options import PrepareFlags
from config import resolve_path, split_paths
from preparation import layout
from utils.errors import UserError, UserErrors


def input_paths(flags: PrepareFlags) -> list[str]:
    """The files of --input in a stable order; a pattern matching nothing, or a missing file, is an error."""
    paths, problems = [], []
    for pattern in split_paths(flags.input):
        resolved = resolve_path(pattern)
        matches = sorted(glob.glob(resolved)) if glob.has_magic(resolved) else [resolved]
        if not matches:
            problems.append(f"--input={flags.input}: no file matches {pattern}")
        for path in matches:
            if os.path.isdir(path):
                problems.append(f"--input: {path} is a directory; name its files, e.g. --input='{path}/*.jsonl'")
            elif not os.path.isfile(path):
                problems.append(f"--input: {path}: file not found")
            elif not os.access(path, os.R_OK):
                problems.append(f"--input: {path}: cannot read it (permission denied); fix its permissions or "
                                "leave it out of --input")
            elif path not in paths:
                paths.append(path)
    if not paths and not problems:
        problems.append("--input: no files given")
    if problems:
        raise UserErrors(problems)
    return paths


def finished_fingerprint(output_dir: str) -> str | None:
    try:
        with open(os.path.join(output_dir, layout.REPORT_FILE), encoding="utf-8") as handle:
            return json.load(handle)["fingerprint"]["id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_output_dir(flags: PrepareFlags, output_dir: str, expected_id: str) -> bool:
    """True when the work is already done; an error when the directory must not be touched."""
    flag = f"--output_dir={flags.output_dir}"
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f"{flag}: is a file, not a directory")
    if layout.is_prepared_dir(output_dir):
        if finished_fingerprint(output_dir) == expected_id:
            return True
        if not flags.overwrite:
            raise UserError(f"{flag}: holds data prepared from other flags or inputs (see its {layout.REPORT_FILE}); "
                            "pass --overwrite=True to replace it once the new run finishes, or choose another "
                            "--output_dir")
        return False
    if os.path.isdir(output_dir) and os.listdir(output_dir) \
            and not os.path.isdir(os.path.join(output_dir, layout.WORK_DIR)):
        raise UserError(f"{flag}: is not empty and was not written by prepare; choose a new or empty --output_dir "
                        "(nothing was deleted)")
    return False


def prepare_command(flags: PrepareFlags) -> None:
    from preparation.manifest import fingerprint
    from preparation.pipeline import Preparation

    if flags.valid_fraction > 0 and flags.valid_rows != PrepareFlags.valid_rows:
        raise UserError(f"--valid_rows={flags.valid_rows} and --valid_fraction={flags.valid_fraction}: give one of "
                        "them")
    if flags.max_chars < flags.min_chars:
        raise UserError(f"--max_chars={flags.max_chars}: below --min_chars={flags.min_chars}, every row would be "
                        "dropped; raise it")
    paths = input_paths(flags)
    output_dir = resolve_path(flags.output_dir)
    if check_output_dir(flags, output_dir, fingerprint(flags, paths)["id"]):
        print(f"{output_dir} is already prepared from these inputs with these flags: nothing to do "
              f"(see {os.path.join(output_dir, layout.REPORT_FILE)})")
        return
    os.makedirs(output_dir, exist_ok=True)
    Preparation(flags, paths, output_dir).run()
