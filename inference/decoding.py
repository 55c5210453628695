"""The decoding settings (`config.DecodingSettings`, one dataclass for generate, chat and serve) as each engine
takes them: transformers' `generate` keyword arguments, CTranslate2's `translate_batch` ones, and the logits
processors of the step-by-step decoder `serve` batches with. Settings an engine cannot honour are refused here,
settings that would do nothing are named, so that no flag is silently ignored.
"""
import os
from dataclasses import fields

from config import DecodingSettings
from utils.errors import UserError

SAMPLING_ONLY = ("temperature", "top_k", "top_p")


def decoding_settings(flags) -> DecodingSettings:
    """The decoding fields of a command's flags (GenerateFlags, ChatFlags, ServeFlags inherit them)."""
    return DecodingSettings(**{f.name: getattr(flags, f.name) for f in fields(DecodingSettings)})


def ignored_settings(settings: DecodingSettings) -> list[str]:
    """Warnings for settings that change nothing as combined (temperature without sampling, ...)."""
    default = DecodingSettings()
    if settings.do_sample:
        return []
    return [f"--{name}={getattr(settings, name)} has no effect without --do_sample=True (greedy or beam search "
            "takes the likeliest tokens)" for name in SAMPLING_ONLY if getattr(settings, name) != getattr(default, name)]


def check_supported(settings: DecodingSettings, engine: str, streaming: bool = False) -> None:
    """UserError where `engine` (or a streamed answer: chat, serve) cannot decode with these settings."""
    if streaming and settings.num_beams > 1:
        raise UserError(f"--num_beams={settings.num_beams}: chat and serve stream one candidate as it is decoded; "
                        "beam search only with generate (--num_beams=1 here)")
    if engine == "ctranslate2" and settings.do_sample and settings.num_beams > 1:
        raise UserError(f"--num_beams={settings.num_beams} with --do_sample=True: CTranslate2 samples one candidate "
                        "only; use --num_beams=1, or --engine=transformers (beam sampling)")


def engine_differences(settings: DecodingSettings, engine: str) -> list[str]:
    """Warnings where `engine` decodes by other rules than transformers (measured: tests/test_decoding.py)."""
    notes = []
    if engine == "ctranslate2" and settings.num_beams > 1 and (settings.repetition_penalty != 1.0
                                                              or settings.no_repeat_ngram_size > 0):
        notes.append("CTranslate2 applies --repetition_penalty and --no_repeat_ngram_size to beam candidates "
                     "differently: some answers differ from --engine=transformers (greedy ones do not)")
    if engine == "ctranslate2" and settings.do_sample:
        notes.append("CTranslate2 samples from its own random stream: --seed reproduces its answers, not "
                     "transformers' ones")
    return notes


def resolved_seed(settings: DecodingSettings) -> int:
    """The seed to use: the given one, or a fresh one for -1."""
    return settings.seed if settings.seed >= 0 else int.from_bytes(os.urandom(4), "little")


def transformers_kwargs(settings: DecodingSettings) -> dict:
    """`model.generate` keyword arguments. The sampling knobs are passed only when sampling: transformers warns
    about them otherwise. top_k=0 is transformers' own "no limit", as it is ours."""
    kwargs = dict(max_new_tokens=settings.max_new_tokens, num_beams=settings.num_beams, do_sample=settings.do_sample,
                  repetition_penalty=settings.repetition_penalty, no_repeat_ngram_size=settings.no_repeat_ngram_size,
                  num_return_sequences=1)
    if settings.num_beams > 1:
        # Beam search ends once num_beams candidates have ended, as CTranslate2's does (its patience 1): the same
        # answers from both engines. transformers' default goes on while a longer candidate could still win.
        kwargs.update(early_stopping=True)
    if settings.do_sample:
        kwargs.update(temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p)
    else:
        # The saved generation config may hold sampling values (top_k=50 is transformers' default): neutral ones.
        kwargs.update(temperature=None, top_k=None, top_p=None)
    return kwargs


def ctranslate2_kwargs(settings: DecodingSettings) -> dict:
    """`Translator.translate_batch` keyword arguments giving transformers' answers for greedy and beam search.

    max_input_length=0: no cut of long prompts (CTranslate2 cuts at 1024 tokens by default, transformers never).
    min_decoding_length=0 lets [EOS] come first, an empty answer, as in transformers. sampling_topk=1 is
    CTranslate2's greedy; 0 samples from the whole vocabulary, as our top_k=0."""
    return dict(beam_size=settings.num_beams, max_decoding_length=settings.max_new_tokens, min_decoding_length=0,
                max_input_length=0, repetition_penalty=settings.repetition_penalty,
                no_repeat_ngram_size=settings.no_repeat_ngram_size,
                sampling_topk=settings.top_k if settings.do_sample else 1,
                sampling_topp=settings.top_p if settings.do_sample else 1.0,
                sampling_temperature=settings.temperature if settings.do_sample else 1.0)


def logits_processors(settings: DecodingSettings):
    """The processors transformers' `generate` applies for these settings, in its order (penalties, then
    temperature, top-k, top-p): the step decoder's answers follow the same rules as generate's."""
    from transformers.generation import (
        LogitsProcessorList,
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    processors = LogitsProcessorList()
    if settings.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
    if settings.no_repeat_ngram_size > 0:
        processors.append(NoRepeatNGramLogitsProcessor(settings.no_repeat_ngram_size))
    if settings.do_sample:
        if settings.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_k > 0:
            processors.append(TopKLogitsWarper(settings.top_k))
        if settings.top_p < 1.0:
            processors.append(TopPLogitsWarper(settings.top_p))
    return processors
