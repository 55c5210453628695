"""`evaluate`: score a model saved by `train` (its final/ or a best/step-* directory) on a file. Loading it lives in
`inference.saved_model` (re-exported here for the scripts that import it from this module); `generate` is
commands/generate.py."""
import json
import os
import sys

from commands.options import EvaluateFlags
from config import resolve_path
from inference.saved_model import load_saved_model, model_dir_problem  # noqa: F401  (re-exported)
from utils.errors import UserError, UserErrors


def evaluate_command(flags: EvaluateFlags) -> None:
    from accelerate import Accelerator

    from training.evaluation import Evaluator
    from training.runtime import native_bf16

    from data_pipeline.parquet import read_footer

    # Both arguments are checked before the model loads, the file as train checks its files (footer only).
    path, problems = resolve_path(flags.file), [model_dir_problem(flags.model_dir)]
    try:
        read_footer(path)
    except UserError as error:
        problems.append(f"--file: {error}" + raw_text_hint(error))
    if any(problems):
        raise UserErrors([problem for problem in problems if problem])
    model, tokenizer = load_saved_model(flags.model_dir)
    max_seq_len = flags.max_seq_len or trained_max_seq_len(flags.model_dir)
    # On a GPU, in bf16 autocast as training evaluates (fp32 where the GPU lacks native bf16, and on a CPU).
    accelerator = Accelerator(mixed_precision="bf16" if native_bf16() else "no")
    evaluator = Evaluator(accelerator, tokenizer, path, flags.max_samples, flags.batch_size, max_seq_len)
    if not evaluator.total:
        raise UserError(f"--file={flags.file}: no row with a non-empty prompt and response")
    if accelerator.is_main_process:  # generation takes a while: say what is happening (stderr: stdout is the result)
        print(f"scoring {evaluator.total} rows of {flags.file}: {evaluator.batch_count} batches of {flags.batch_size}, "
              f"greedy answers of up to {max_seq_len} tokens, on {accelerator.device}", file=sys.stderr,
              flush=True)
    result = evaluator.evaluate(accelerator.prepare(model), progress=True)
    if accelerator.is_main_process:
        print(f"bleu4 {result.bleu4:.4f}  eval_loss {result.eval_loss:.4f}  rows {result.samples}")
        for prompt, reference, generation in result.examples:
            print(f"- prompt: {prompt}\n  reference: {reference}\n  generated: {generation}")


def trained_max_seq_len(model_dir: str, unknown: int = 192) -> int:
    """The max_seq_len the model was trained with (recorded in its config.json since training records it)."""
    with open(os.path.join(resolve_path(model_dir), "config.json"), encoding="utf-8") as config:
        return int(json.load(config).get("trained_max_seq_len", unknown))


def raw_text_hint(error: UserError) -> str:
    """What to add when the file is readable but holds other columns, e.g. raw documents."""
    if "missing column" not in str(error):
        return ""
    return ("; evaluate scores prompt/response files (BLEU-4 and loss); a span-corruption model's denoising loss on "
            "raw text is in its run's eval lines (metrics.jsonl)")
