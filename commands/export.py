"""`export`: a saved model as a CTranslate2 model (a faster inference engine), and greedy answers from one.

An exported directory holds CTranslate2's files (model.bin, config.json, the vocabulary) and our tokenizer, so it
is all a program needs to answer prompts. ctranslate2 is optional: only the functions here import it.
"""
import os
import shutil

from commands.saved_model import model_dir_problem
from config import ExportFlags, resolve_path
from utils.atomic import TMP_PREFIX, fsync_tree
from utils.errors import UserError, UserErrors

MODEL_FILE = "model.bin"  # what CTranslate2 writes and what makes a directory an exported model
TOKENIZER_FILE = "tokenizer.json"


def import_ctranslate2():
    try:
        import ctranslate2
    except ImportError:
        raise UserError("ctranslate2 is not installed (it is optional): pip install ctranslate2") from None
    return ctranslate2


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


def load_translator(model_dir: str, threads: int = 0, device: str = "auto"):
    """The CTranslate2 model and the tokenizer of a directory written by `export`, on the GPU when there is one
    (`device="auto"`). `threads`: CPU threads for one batch (0: CTranslate2's default, which follows
    OMP_NUM_THREADS)."""
    path = resolve_path(str(model_dir))
    missing = [name for name in (MODEL_FILE, TOKENIZER_FILE) if not os.path.isfile(os.path.join(path, name))]
    if missing:
        # A saved model given here is the likely mistake: then the command to run names it.
        source, target = ((model_dir, f"{str(model_dir).rstrip('/')}-ct2") if model_dir_problem(model_dir) is None
                          else ("SAVED_MODEL", model_dir))
        raise UserError(f"--model_dir={model_dir}: not a model written by export (no {' or '.join(missing)}); run "
                        f"`python train_low_mem.py export --model_dir={source} --output_dir={target}` first")
    ctranslate2 = import_ctranslate2()
    from model.tokenizer import load_tokenizer

    try:
        translator = ctranslate2.Translator(path, device=device, intra_threads=threads)
    except (RuntimeError, ValueError) as error:
        raise UserError(f"--model_dir={model_dir}: the CTranslate2 model does not load: {error}") from None
    return translator, load_tokenizer(path)


def greedy_ids(translator, tokenizer, prompts: list[str], max_new_tokens: int, min_new_tokens: int = 0
               ) -> list[list[int]]:
    """Greedy answers as token ids without [EOS], as transformers' `generate(do_sample=False, num_beams=1)` gives
    them. `min_new_tokens` forbids [EOS] before that many tokens (benchmarks: answers of a fixed length)."""
    # CTranslate2 takes tokens, not ids: the prompt's own tokens, [EOS] included, as the model was trained on.
    sources = [tokenizer.convert_ids_to_tokens(ids) for ids in tokenizer(list(prompts))["input_ids"]]
    # max_input_length=0: no cut of long prompts (CTranslate2 cuts at 1024 tokens by default, transformers never).
    # min_new_tokens=0 lets [EOS] come first, an empty answer, as in transformers: CTranslate2's default of 1
    # would answer something else instead.
    results = translator.translate_batch(sources, beam_size=1, max_decoding_length=max_new_tokens,
                                         min_decoding_length=min_new_tokens, max_input_length=0)
    return [tokenizer.convert_tokens_to_ids(result.hypotheses[0]) for result in results]


def ctranslate2_answers(model_dir: str, prompts: list[str], max_new_tokens: int) -> list[str]:
    """The greedy answers of an exported model to `prompts`, as text: `generate --engine=ctranslate2`."""
    translator, tokenizer = load_translator(model_dir)
    return tokenizer.batch_decode(greedy_ids(translator, tokenizer, prompts, max_new_tokens),
                                  skip_special_tokens=True)
