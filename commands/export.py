"""`export`: a saved model as a CTranslate2 model (a faster inference engine).

An exported directory holds CTranslate2's files (model.bin, config.json, the vocabulary) and our tokenizer, so it
is all a program needs to answer prompts (`inference.ctranslate2` answers with it). ctranslate2 is optional: it is
imported only when a model is converted.
"""
import os
import shutil

from commands.options import ExportFlags
from config import resolve_path
from inference.ctranslate2 import import_ctranslate2
from inference.saved_model import model_dir_problem
from utils.atomic import TMP_PREFIX, fsync_tree
from utils.errors import UserError, UserErrors


def output_dir_problem(output_dir: str) -> str | None:
    path = resolve_path(str(output_dir))
    if os.path.islink(path) or (os.path.exists(path) and not os.path.isdir(path)):
        return f"--output_dir={output_dir}: {path} is a file or a link, not a directory"
    if os.path.isdir(path) and os.listdir(path):
        return (f"--output_dir={output_dir}: {path} is not empty; export deletes nothing, so give a new or empty "
                "directory")
    return None


def export_command(flags: ExportFlags) -> None:
    problems = [problem for problem in (model_dir_problem(flags.model_dir), output_dir_problem(flags.output_dir))
                if problem]
    if problems:
        raise UserErrors(problems)
    output_dir = resolve_path(flags.output_dir)
    export_model(resolve_path(flags.model_dir), output_dir, flags.quantization)
    size_mb = sum(entry.stat().st_size for entry in os.scandir(output_dir) if entry.is_file()) / 2**20
    weights = "fp32" if flags.quantization == "none" else flags.quantization
    print(f"exported {flags.model_dir} to {output_dir} (CTranslate2, {weights} weights, {size_mb:.1f} MB, with "
          f"the tokenizer)\n"
          f"answer a prompt: python train_low_mem.py generate --engine=ctranslate2 --model_dir={output_dir} "
          f"--prompt=\"...\"\n"
          f"from Python: ctranslate2.Translator(\"{output_dir}\") and the tokenizer in the same directory "
          f"(README: Export for fast inference)")


def export_model(model_dir: str, output_dir: str, quantization: str = "none") -> None:
    """Convert the saved model in `model_dir` into `output_dir` (absent or empty), with its tokenizer.

    The model is written into a temporary sibling first and renamed into place complete, so that a crash or a
    failed conversion never leaves a half-written model where `generate` would read it."""
    ctranslate2 = import_ctranslate2()
    from safetensors import SafetensorError

    from model.tokenizer import load_tokenizer
    from utils.log import quiet_libraries

    quiet_libraries()  # the converter loads the model through transformers, whose progress bar would show
    tokenizer = load_tokenizer(model_dir)
    parent = os.path.dirname(os.path.abspath(output_dir))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as error:
        raise UserError(f"--output_dir={output_dir}: cannot create {parent}: {error}") from None
    # The converter makes this directory itself; a leftover of the same name is an earlier export's, crashed.
    tmp = os.path.join(parent, f"{TMP_PREFIX}{os.path.basename(output_dir)}-{os.getpid()}")
    try:
        converter = ctranslate2.converters.TransformersConverter(model_dir)
        try:
            converter.convert(tmp, quantization=None if quantization == "none" else quantization, force=True)
        except (OSError, ValueError, KeyError, NotImplementedError, SafetensorError) as error:
            # A damaged or foreign directory: what the loader says, without its traceback.
            raise UserError(f"--model_dir={model_dir}: the model does not convert: {error}") from None
        tokenizer.save_pretrained(tmp)
        fsync_tree(tmp)
        try:
            os.replace(tmp, output_dir)  # an empty directory is replaced, a non-empty one refused
        except OSError as error:
            raise UserError(f"--output_dir={output_dir}: cannot move the model into place: {error}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
