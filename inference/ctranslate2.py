"""Answers from a model written by `export` (CTranslate2, a faster inference engine on a CPU).

ctranslate2 is optional: only the functions here import it, and its absence is one `error:` line naming the pip
command. The decoding settings map to `translate_batch` through `inference.decoding.ctranslate2_kwargs`.
"""
import os

from config import DecodingSettings, resolve_path
from inference.decoding import ctranslate2_kwargs
from inference.saved_model import model_dir_problem
from utils.errors import UserError

MODEL_FILE = "model.bin"  # what CTranslate2 writes and what makes a directory an exported model
TOKENIZER_FILE = "tokenizer.json"


def import_ctranslate2():
    try:
        import ctranslate2
    except ImportError:
        raise UserError("ctranslate2 is not installed (it is optional): pip install ctranslate2") from None
    return ctranslate2


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


def answer_ids(translator, tokenizer, prompts: list[str], settings: DecodingSettings, min_new_tokens: int = 0
               ) -> list[list[int]]:
    """Answers as token ids without [EOS], as transformers' `generate` gives them for the same settings (greedy
    and beam search: the same ids; sampling: another random stream). `min_new_tokens` forbids [EOS] before that
    many tokens (benchmarks: answers of a fixed length). A seeded sample needs a translator made after
    `ctranslate2.set_random_seed` (inference.engines.CTranslate2Engine does that)."""
    # CTranslate2 takes tokens, not ids: the prompt's own tokens, [EOS] included, as the model was trained on.
    sources = [tokenizer.convert_ids_to_tokens(ids) for ids in tokenizer(list(prompts))["input_ids"]]
    kwargs = ctranslate2_kwargs(settings)
    kwargs["min_decoding_length"] = min_new_tokens
    results = translator.translate_batch(sources, **kwargs)
    return [tokenizer.convert_tokens_to_ids(result.hypotheses[0]) for result in results]


def greedy_ids(translator, tokenizer, prompts: list[str], max_new_tokens: int, min_new_tokens: int = 0
               ) -> list[list[int]]:
    """Greedy answers as token ids without [EOS], as transformers' `generate(do_sample=False, num_beams=1)` gives
    them."""
    return answer_ids(translator, tokenizer, prompts, DecodingSettings(max_new_tokens=max_new_tokens),
                      min_new_tokens)


def ctranslate2_answers(model_dir: str, prompts: list[str], max_new_tokens: int,
                        settings: DecodingSettings | None = None) -> list[str]:
    """The answers of an exported model to `prompts`, as text (greedy unless `settings` say otherwise)."""
    translator, tokenizer = load_translator(model_dir)
    settings = settings or DecodingSettings(max_new_tokens=max_new_tokens)
    return tokenizer.batch_decode(answer_ids(translator, tokenizer, prompts, settings), skip_special_tokens=True)
