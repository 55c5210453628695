"""The small commands: train a tokenizer, score a saved model, answer a prompt."""
import os

from config import resolve_path
from utils.cli import flag_int
from utils.errors import UserError


def load_saved_model(model_dir: str):
    """A model and tokenizer saved by `train` (best/, final/): a clear error instead of a loader traceback."""
    from transformers import AutoModelForSeq2SeqLM

    from model.tokenizer import load_tokenizer

    path = resolve_path(str(model_dir))
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"--model_dir={model_dir}: no saved model there (expected a best/ or final/ directory)")
    tokenizer = load_tokenizer(path)
    try:
        model = AutoModelForSeq2SeqLM.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise UserError(f"--model_dir={model_dir}: the model does not load: {error}") from None
    return model.eval(), tokenizer


def train_tokenizer_command(train_file, tokenizer_dir, vocab_size, max_rows) -> None:
    from model.tokenizer import train_tokenizer

    vocab_size, max_rows = flag_int("vocab_size", vocab_size, 300), flag_int("max_rows", max_rows, 0)
    files = [resolve_path(p.strip()) for p in str(train_file).split(",")]
    tokenizer = train_tokenizer(files, resolve_path(str(tokenizer_dir)), vocab_size=vocab_size,
                                max_rows=max_rows or None)
    print(f"tokenizer with {len(tokenizer)} tokens saved to {resolve_path(str(tokenizer_dir))}")


def evaluate_command(model_dir, file, max_samples, batch_size, max_seq_len) -> None:
    from accelerate import Accelerator

    from utils.evaluation import Evaluator

    max_samples = flag_int("max_samples", max_samples, 1)
    batch_size, max_seq_len = flag_int("batch_size", batch_size, 1), flag_int("max_seq_len", max_seq_len, 8)
    path = resolve_path(str(file))
    if not os.path.isfile(path):
        raise UserError(f"--file={file}: no such file")
    model, tokenizer = load_saved_model(model_dir)
    accelerator = Accelerator()
    evaluator = Evaluator(accelerator, tokenizer, path, max_samples, batch_size, max_seq_len)
    if not evaluator.total:
        raise UserError(f"--file={file}: no row with a non-empty prompt and response")
    result = evaluator.evaluate(accelerator.prepare(model))
    if accelerator.is_main_process:
        print(f"bleu4 {result.bleu4:.4f}  eval_loss {result.eval_loss:.4f}  rows {result.samples}")
        for prompt, reference, generation in result.examples:
            print(f"- prompt: {prompt}\n  reference: {reference}\n  generated: {generation}")


def generate_command(model_dir, prompt, max_new_tokens) -> None:
    import torch

    max_new_tokens = flag_int("max_new_tokens", max_new_tokens, 1)
    model, tokenizer = load_saved_model(model_dir)
    inputs = tokenizer([str(prompt)], return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens)
    print(tokenizer.decode(output[0], skip_special_tokens=True))
