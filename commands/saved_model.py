"""Using a model saved by `train` (its final/ or a best/step-* directory): score it on a file, answer a prompt."""
import os

from config import EvaluateFlags, GenerateFlags, resolve_path
from utils.errors import UserError


def load_saved_model(model_dir: str):
    """A model and tokenizer saved by `train` (best/, final/): a clear error instead of a loader traceback."""
    from transformers import AutoModelForSeq2SeqLM

    from model.tokenizer import load_tokenizer
    from utils.log import quiet_libraries

    quiet_libraries()  # transformers' "Loading weights" progress bar would precede every answer
    path = resolve_path(str(model_dir))
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"--model_dir={model_dir}: no saved model there (expected a best/ or final/ directory)")
    tokenizer = load_tokenizer(path)
    try:
        model = AutoModelForSeq2SeqLM.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise UserError(f"--model_dir={model_dir}: the model does not load: {error}") from None
    return model.eval(), tokenizer


def evaluate_command(flags: EvaluateFlags) -> None:
    from accelerate import Accelerator

    from training.evaluation import Evaluator

    path = resolve_path(flags.file)
    if not os.path.isfile(path):
        raise UserError(f"--file={flags.file}: no such file")
    model, tokenizer = load_saved_model(flags.model_dir)
    accelerator = Accelerator()
    evaluator = Evaluator(accelerator, tokenizer, path, flags.max_samples, flags.batch_size, flags.max_seq_len)
    if not evaluator.total:
        raise UserError(f"--file={flags.file}: no row with a non-empty prompt and response")
    result = evaluator.evaluate(accelerator.prepare(model))
    if accelerator.is_main_process:
        print(f"bleu4 {result.bleu4:.4f}  eval_loss {result.eval_loss:.4f}  rows {result.samples}")
        for prompt, reference, generation in result.examples:
            print(f"- prompt: {prompt}\n  reference: {reference}\n  generated: {generation}")


def generate_command(flags: GenerateFlags) -> None:
    import torch

    model, tokenizer = load_saved_model(flags.model_dir)
    inputs = tokenizer([flags.prompt], return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=flags.max_new_tokens)
    print(tokenizer.decode(output[0], skip_special_tokens=True))
