"""A model saved by `train` (its final/ or a best/step-* directory), loaded for answering, on the GPU if there is
one."""
import os
from dataclasses import dataclass

from config import resolve_path
from utils.errors import UserError


def model_dir_problem(model_dir: str) -> str | None:
    path = resolve_path(str(model_dir))
    if os.path.isfile(os.path.join(path, "model.bin")):  # CTranslate2's weights: it writes a config.json too
        return (f"--model_dir={model_dir}: a CTranslate2 model written by export, not a saved model "
                "(generate reads it with --engine=ctranslate2)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        if os.path.isfile(os.path.join(path, "final", "config.json")):  # a run's output_dir: its models are inside
            best = os.path.join(str(model_dir), "best", "step-*")
            return (f"--model_dir={model_dir}: a run's directory, not a model: give --model_dir="
                    f"{os.path.join(str(model_dir), 'final')} (or one of its best models, {best})")
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


@dataclass(frozen=True)
class Placement:
    """Where a model answers: the GPU when there is one, in bf16 autocast where it has native bf16 (as training
    evaluates); the CPU in fp32 (emulated bf16 is slower there)."""

    device: str
    bf16: bool

    def autocast(self):
        import torch

        return torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.bf16)

    def describe(self) -> str:
        return f"{self.device}{' (bf16)' if self.bf16 else ''}"


def best_placement() -> Placement:
    import torch

    from training.runtime import native_bf16

    return Placement("cuda" if torch.cuda.is_available() else "cpu", native_bf16())


def load_for_answers(model_dir: str):
    """`load_saved_model`'s model moved to the best device, its tokenizer, and that placement."""
    model, tokenizer = load_saved_model(model_dir)
    placement = best_placement()
    return model.to(placement.device), tokenizer, placement
