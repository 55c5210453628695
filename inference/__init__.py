"""Answering prompts with a trained model: loading it (transformers or CTranslate2), the decoding settings, the
chat template, batch generation over a parquet file and the step-by-step batched decoder that `serve` uses.

Nothing here parses flags or prints for a command: `commands/` does that and calls in here.
"""
