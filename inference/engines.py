"""The two engines behind `generate`: a saved model through transformers, or an exported one through CTranslate2.
Both take a batch of prompts and one `DecodingSettings` and give each answer's token ids (without [EOS]), so that
one prompt and a whole file are answered by the same code."""
from dataclasses import dataclass

from config import DecodingSettings
from inference.decoding import check_supported, resolved_seed, transformers_kwargs


def strip_answer(row: list[int], eos_id: int) -> list[int]:
    """An answer's ids from `generate`'s output row: column 0 is the decoder's start; the answer ends before its
    first [EOS] (padding follows it in a batch). A [PAD] before it is a token the model chose, and stays."""
    row = row[1:]
    return row[:row.index(eos_id)] if eos_id in row else row


@dataclass
class TransformersEngine:
    model: object
    tokenizer: object
    placement: object

    @classmethod
    def load(cls, model_dir: str) -> "TransformersEngine":
        from inference.saved_model import load_for_answers

        return cls(*load_for_answers(model_dir))

    def describe(self) -> str:
        return f"transformers on {self.placement.describe()}"

    def answer_ids(self, prompts: list[str], settings: DecodingSettings) -> list[list[int]]:
        import torch

        inputs = self.tokenizer(list(prompts), return_tensors="pt", padding=True).to(self.placement.device)
        if settings.do_sample:
            torch.manual_seed(resolved_seed(settings))  # the CPU's and every GPU's generator
        with torch.no_grad(), self.placement.autocast():
            output = self.model.generate(**inputs, **transformers_kwargs(settings))
        return [strip_answer(row, self.tokenizer.eos_token_id) for row in output.tolist()]


@dataclass
class CTranslate2Engine:
    translator: object
    tokenizer: object
    model_dir: str
    seed: int | None = None  # the seed its sampling streams started from (None: not chosen)

    @classmethod
    def load(cls, model_dir: str, seed: int | None = None) -> "CTranslate2Engine":
        from inference.ctranslate2 import import_ctranslate2, load_translator

        if seed is not None:
            # CTranslate2 seeds the random generator of each of its worker threads when they start, that is when
            # a Translator is made: ctranslate2.set_random_seed changes nothing for one already made.
            import_ctranslate2().set_random_seed(seed)
        return cls(*load_translator(model_dir), model_dir=model_dir, seed=seed)

    def describe(self) -> str:
        return f"ctranslate2 on {self.translator.device}"

    def answer_ids(self, prompts: list[str], settings: DecodingSettings) -> list[list[int]]:
        from inference.ctranslate2 import answer_ids

        if settings.do_sample:
            seed = resolved_seed(settings)
            if seed != self.seed:  # a sample reproducible by its seed needs a translator made under that seed
                self.translator = type(self).load(self.model_dir, seed).translator
            self.seed = None  # its random streams move on with this call: the next one starts them again
        return answer_ids(self.translator, self.tokenizer, prompts, settings)


def load_engine(engine: str, model_dir: str, settings: DecodingSettings):
    """The engine named by --engine, after checking that it supports `settings` (before the model loads)."""
    check_supported(settings, engine)
    if engine == "ctranslate2":
        return CTranslate2Engine.load(model_dir, settings.seed if settings.do_sample and settings.seed >= 0 else None)
    return TransformersEngine.load(model_dir)


def answer_texts(engine, prompts: list[str], settings: DecodingSettings) -> list[str]:
    return engine.tokenizer.batch_decode(engine.answer_ids(prompts, settings), skip_special_tokens=True)
