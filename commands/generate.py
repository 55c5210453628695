"""`generate`: a saved (or exported) model's answer to one prompt (--prompt), or to every row of a parquet file
(--file, --output), with the decoding settings of `config.DecodingSettings`."""
import os
import sys

from commands.options import GenerateFlags
from config import resolve_path
from inference.decoding import check_supported, decoding_settings, engine_differences, ignored_settings
from utils.errors import UserError


def generate_command(flags: GenerateFlags) -> None:
    if bool(flags.prompt) == bool(flags.file):
        raise UserError("--prompt is required, or --file (exactly one of them: --prompt=TEXT answers one prompt, "
                        "--file=PARQUET --output=PARQUET every row of a file)")
    settings = decoding_settings(flags)
    check_supported(settings, flags.engine)
    for warning in ignored_settings(settings) + engine_differences(settings, flags.engine):
        print(f"warning: {warning}", file=sys.stderr)
    if flags.file:
        answer_file(flags, settings)
    else:
        answer_prompt(flags, settings)


def answer_prompt(flags: GenerateFlags, settings) -> None:
    from inference.engines import answer_texts, load_engine

    if flags.output:
        raise UserError("--output: only with --file (--prompt prints its answer)")
    answer = answer_texts(load_engine(flags.engine, flags.model_dir, settings), [flags.prompt], settings)[0]
    print(answer)
    if not answer.strip():
        # A blank line alone looks like a failure of the command rather than an answer of the model.
        print("(the answer is empty: the model's first token was [EOS], or only spaces; a model trained longer, "
              "or on this kind of prompt, answers)", file=sys.stderr)


def answer_file(flags: GenerateFlags, settings) -> None:
    from inference.batch_file import FileJob, check_file_job, run_file_job
    from inference.engines import load_engine

    if not flags.output:
        raise UserError("--output is required with --file: the parquet file the answers go to")
    job = FileJob(input=resolve_path(flags.file), output=resolve_path(flags.output), prompt_column=flags.prompt_column,
                  model_dir=resolve_path(flags.model_dir), engine=flags.engine, settings=settings,
                  batch_size=flags.batch_size, part_rows=flags.part_rows)
    try:
        state = check_file_job(job)
    except UserError as error:
        message = str(error)
        raise UserError(message if message.startswith("--") else f"--file: {message}") from None
    if state == "done":
        print(f"{flags.output} is complete already (same flags, model and input): nothing to do")
        return
    engine = load_engine(flags.engine, flags.model_dir, settings)
    os.makedirs(os.path.dirname(job.output) or ".", exist_ok=True)
    print(f"{'continuing' if state == 'resume' else 'answering'} {flags.file} into {flags.output} with "
          f"{engine.describe()}", file=sys.stderr, flush=True)
    rows = run_file_job(job, engine, state)
    print(f"wrote {flags.output}: {rows} rows answered now, the input's columns plus 'answer'")
