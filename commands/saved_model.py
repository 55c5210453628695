"""Using a model saved by `train` (its final/ or a best/step-* directory): score it on a file, answer a prompt."""
import os
import sys

from config import EvaluateFlags, GenerateFlags, resolve_path
from utils.errors import UserError, UserErrors


def model_dir_problem(model_dir: str) -> str | None:
    path = resolve_path(str(model_dir))
    if os.path.isfile(os.path.join(path, "model.bin")):  # CTranslate2's weights: it writes a config.json too
        return (f"--model_dir={model_dir}: a CTranslate2 model written by export, not a saved model "
                "(generate reads it with --engine=ctranslate2)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        return f"--model_dir={model_dir}: no saved model there (expected a best/ or final/ directory)"
    return None


def load_saved_model(model_dir: str):
    """A model and tokenizer saved by `train` (best/, final/): a clear error instead of a loader traceback."""
    from transformers import AutoModelForSeq2SeqLM

    from model.tokenizer import load_tokenizer
    from utils.log import quiet_libraries

    quiet_libraries()  # transformers' "Loading weights" progress bar would precede every answer
    path = resolve_path(str(model_dir))
    problem = model_dir_problem(model_dir)
    if problem:
        raise UserError(problem)
    tokenizer = load_tokenizer(path)
    try:
        model = AutoModelForSeq2SeqLM.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise UserError(f"--model_dir={model_dir}: the model does not load: {error}") from None
    return model.eval(), tokenizer


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
        problems.append(f"--file: {error}")
    if any(problems):
        raise UserErrors([problem for problem in problems if problem])
    model, tokenizer = load_saved_model(flags.model_dir)
    # On a GPU, in bf16 autocast as training evaluates (fp32 where the GPU lacks native bf16, and on a CPU).
    accelerator = Accelerator(mixed_precision="bf16" if native_bf16() else "no")
    evaluator = Evaluator(accelerator, tokenizer, path, flags.max_samples, flags.batch_size, flags.max_seq_len)
    if not evaluator.total:
        raise UserError(f"--file={flags.file}: no row with a non-empty prompt and response")
    if accelerator.is_main_process:  # generation takes a while: say what is happening (stderr: stdout is the result)
        print(f"scoring {evaluator.total} rows of {flags.file}: {evaluator.batch_count} batches of {flags.batch_size}, "
              f"greedy answers of up to {flags.max_seq_len} tokens, on {accelerator.device}", file=sys.stderr,
              flush=True)
    result = evaluator.evaluate(accelerator.prepare(model), progress=True)
    if accelerator.is_main_process:
        print(f"bleu4 {result.bleu4:.4f}  eval_loss {result.eval_loss:.4f}  rows {result.samples}")
        for prompt, reference, generation in result.examples:
            print(f"- prompt: {prompt}\n  reference: {reference}\n  generated: {generation}")


def generate_command(flags: GenerateFlags) -> None:
    if flags.engine == "ctranslate2":
        from commands.export import ctranslate2_answers

        answer = ctranslate2_answers(flags.model_dir, [flags.prompt], flags.max_new_tokens)[0]
    else:
        answer = transformers_answer(flags)
    print(answer)
    if not answer.strip():
        # A blank line alone looks like a failure of the command rather than an answer of the model.
        print("(the answer is empty: the model's first token was [EOS], or only spaces; a model trained longer, "
              "or on this kind of prompt, answers)", file=sys.stderr)


def transformers_answer(flags: GenerateFlags) -> str:
    import torch

    from training.runtime import native_bf16

    model, tokenizer = load_saved_model(flags.model_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = tokenizer([flags.prompt], return_tensors="pt").to(device)
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=native_bf16()):
        output = model.to(device).generate(**inputs, do_sample=False, num_beams=1,
                                           max_new_tokens=flags.max_new_tokens)
    return tokenizer.decode(output[0], skip_special_tokens=True)
