"""The flags of the commands besides a run's settings (`config`): one dataclass per command, each field a flag.

As in `config`, the string under each field is its help text and bounds live in the field's metadata. The decoding
settings that generate, chat and serve share are `config.DecodingSettings` (the inference code takes them too).
"""
from dataclasses import dataclass
from typing import Literal

from config import DecodingSettings, bounded, required


@dataclass
class PlanFlags:
    """`plan`'s own flags."""

    num_processes: int = bounded(1, min=1)
    """Processes (GPUs) of the planned run, over all machines."""
    device: Literal["gpu", "cpu"] = "gpu"
    """What trains: gpu (20 GB cards, the guide's box) or cpu (the model, its gradients and activations in host
    RAM, as with ACCELERATE_USE_CPU=true)."""
    num_samples: int = bounded(0, min=0)
    """Training rows to plan for (0: count the rows of train_file in its parquet footers)."""
    step_time: float = bounded(0.0, min=0.0)
    """Seconds per optimizer step, as your GPUs log it, for the hours (0: the guide's 0.5-0.8 s as an example)."""
    json: bool = False
    """Print the plan as JSON."""
    probe: bool = True
    """Measure the activations on fake tensors (about 2.5 s); False: a formula fitted to the probe."""


@dataclass
class DemoFlags:
    """`demo`'s own flags: how much of the task to generate."""

    train_rows: int = bounded(6000, min=1)
    """Generated training rows."""
    valid_rows: int = bounded(200, min=1)
    """Generated validation rows, on which BLEU-4 is measured."""


@dataclass
class TokenizerFlags:
    """`train_tokenizer`'s flags."""

    train_file: str = "data/my_train_dataset.parquet"
    """Parquet file with prompt and response columns (or comma-separated paths)."""
    tokenizer_dir: str = "model_save/tokenizer"
    """Where the tokenizer is saved."""
    text_column: str = ""
    """Train on this column of raw documents instead of prompt and response (for --objective=span_corruption): the
    tokenizer then also has T5's 100 sentinel tokens <extra_id_0> ... <extra_id_99>."""
    vocab_size: int = bounded(32000, min=300)
    """Vocabulary size, including the 4 special tokens and the 256 bytes."""
    max_rows: int = bounded(40_000, min=0)
    """Rows, spread evenly over the file, to train on (0 = all rows: several GB of RAM on 1M distinct rows)."""
    overwrite: bool = False
    """Replace what --tokenizer_dir holds (a tokenizer, or other files); models trained with an old tokenizer do
    not work with the new one."""


@dataclass
class SavedModelFlags:
    """Which saved model a command uses."""

    model_dir: str = required()
    """A model saved by train: its final/ or a best/step-* directory."""


@dataclass
class EvaluateFlags(SavedModelFlags):
    """`evaluate`'s flags."""

    file: str = required()
    """Parquet file with prompt and response columns."""
    max_samples: int = bounded(1000, min=1)
    """Rows to score: the first ones with a non-empty prompt and response."""
    batch_size: int = bounded(32, min=1)
    """Rows per generation batch."""
    max_seq_len: int = bounded(0, min=0)
    """Most tokens of a prompt and of a generated answer (0: the max_seq_len the model was trained with, as its
    config.json records it; 192 for a model that does not say)."""


@dataclass
class GenerateFlags(SavedModelFlags, DecodingSettings):
    """`generate`'s flags: one prompt (--prompt) or every row of a file (--file, --output)."""

    prompt: str = ""
    """The prompt (quote it when it holds spaces). Give --prompt or --file."""
    engine: Literal["transformers", "ctranslate2"] = "transformers"
    """transformers: --model_dir is a saved model (best/, final/); ctranslate2: a directory written by `export`
    (same greedy and beam answers, faster on a CPU)."""
    file: str = ""
    """A parquet file of prompts: every row is answered into --output (instead of --prompt)."""
    output: str = ""
    """With --file: the parquet written, the input's columns plus `answer`. Re-running the same command after an
    interruption continues where it stopped."""
    prompt_column: str = "prompt"
    """With --file: the column of prompts."""
    batch_size: int = bounded(32, min=1)
    """With --file: prompts answered together (rows of similar length are batched together)."""
    part_rows: int = bounded(1024, min=1)
    """With --file: rows per part written to disk as it goes; an interruption loses at most one part's work."""


@dataclass
class PlotFlags:
    """`plot`'s flags."""

    output_dir: str = "model_save/pretrain_large"
    """A run's output_dir: the charts are drawn from its metrics.jsonl and written next to it."""


@dataclass
class ExportFlags(SavedModelFlags):
    """`export`'s flags."""

    output_dir: str = required()
    """Where the CTranslate2 model goes (with the tokenizer): a new or empty directory."""
    quantization: Literal["none", "int8", "int8_float32", "float16", "bfloat16"] = "none"
    """Weight type: none keeps fp32 (the same answers as transformers); int8 = 4x smaller, faster on CPU, answers
    may differ slightly; int8_float32: int8 weights, fp32 for the rest; float16 / bfloat16: half the size, for a
    GPU (a CPU without them computes in fp32)."""


@dataclass
class ChatFlags(SavedModelFlags, DecodingSettings):
    """`chat`'s flags."""

    max_seq_len: int = bounded(256, min=8)
    """Most tokens of the prompt the model reads (earlier turns and the new message, by the chat template): the
    oldest turns are left out to fit."""


@dataclass
class ServeFlags(SavedModelFlags, DecodingSettings):
    """`serve`'s flags. The decoding flags are the defaults of a request that does not set its own."""

    host: str = "127.0.0.1"
    """Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface, then set --api_key)."""
    port: int = bounded(8000, min=1, max=65535)
    """Port to listen on."""
    api_key: str = ""
    """When set, every /v1 request needs `Authorization: Bearer KEY` (401 otherwise)."""
    max_seq_len: int = bounded(256, min=8)
    """Most tokens of a prompt (the conversation by the chat template): the oldest turns are left out to fit,
    400 when even the last message does not."""
    max_batch: int = bounded(8, min=1, max=256)
    """Requests decoded together, one token each per step; new requests join at the next step."""
    queue_size: int = bounded(32, min=0)
    """Requests waiting for a place in the batch; beyond them a request gets 429 with Retry-After."""
    max_body_kb: int = bounded(256, min=1)
    """Largest request body accepted, in KiB (413 beyond)."""
    drain_seconds: float = bounded(30.0, min=0.0)
    """On Ctrl-C or SIGTERM, how long requests in flight may take to finish before the server exits."""


@dataclass
class PrepareFlags:
    """`prepare`'s flags: raw files in, clean deduplicated shuffled train/valid parquet out (docs/PREPARE.md)."""

    input: str = required()
    """Raw files: comma-separated paths or globs (quote them): parquet, jsonl, json (an array of objects), csv,
    tsv, txt, each optionally .gz or .zst."""
    output_dir: str = "data/prepared"
    """Where train.parquet, valid.parquet, prepare_report.json and the length histograms go: a new or empty
    directory, or one prepare wrote (an unfinished run there resumes)."""
    objective: Literal["seq2seq", "span_corruption"] = "seq2seq"
    """seq2seq: rows of prompt and response; span_corruption: documents in a text column (as train reads them)."""
    format: Literal["auto", "parquet", "jsonl", "json", "csv", "tsv", "text"] = "auto"
    """auto: from each file's extension (after .gz/.zst); otherwise every input is read as this format."""
    text_blocks: bool = False
    """Plain text: a document is a block of lines between blank lines (False: one document per line)."""
    prompt_column: str = ""
    """The prompt's field ("" = the first of prompt, instruction (+ input), question, query, input, ...; or a
    ChatML messages / ShareGPT conversations list, whose last assistant turn is the response)."""
    response_column: str = ""
    """The response's field ("" = the first of response, output, answer, target, completion, ...)."""
    text_column: str = ""
    """span_corruption: the documents' field ("" = the first of text, content, document, passage, body)."""
    normalization: Literal["NFC", "NFKC", "none"] = "NFC"
    """Unicode normalisation. NFKC also folds compatibility forms, which rewrites full-width Chinese punctuation
    (，→ ,) and full-width letters: choose it only if you want that."""
    remove_invisible: bool = True
    """Remove control characters (except tab and newline) and invisible ones (zero-width spaces and joiners,
    direction marks, soft hyphens, BOM)."""
    collapse_whitespace: bool = True
    """Runs of spaces and tabs become one space, lines lose their edge spaces, 3+ newlines become one blank line."""
    traditional_to_simplified: bool = False
    """Convert Traditional to Simplified Chinese with OpenCC (t2s; pip install opencc)."""
    min_chars: int = bounded(2, min=0)
    """Drop rows with fewer characters than this (prompt and response together, after cleaning)."""
    max_chars: int = bounded(20_000, min=1)
    """Drop rows with more characters than this (prompt and response together, after cleaning)."""
    min_cjk_share: float = bounded(0.0, min=0.0, max=1.0)
    """Drop rows whose share of CJK characters (among non-space characters) is below this (0 = off)."""
    dedup: Literal["none", "exact", "near"] = "near"
    """exact: drop repeats of a row identical after cleaning; near: also rows whose character n-gram Jaccard
    similarity to an earlier row reaches --dedup_threshold (MinHash + LSH). The first row of a cluster stays."""
    dedup_threshold: float = bounded(0.8, min=0.3, max=1.0)
    """Jaccard similarity (of character n-gram sets) from which two rows are near duplicates."""
    dedup_ngram: int = bounded(5, min=1, max=32)
    """Characters per n-gram (shingle) for near deduplication."""
    num_perm: int = bounded(128, min=16, max=1024)
    """MinHash permutations: more estimate the Jaccard more precisely (std ~ sqrt(J(1-J)/num_perm)) and cost
    more time and disk (4 bytes a row each)."""
    valid_rows: int = bounded(1000, min=0)
    """Rows of valid.parquet, drawn by the shuffle after deduplication (0: no validation file)."""
    valid_fraction: float = bounded(0.0, min=0.0, max=0.5)
    """When above 0: this share of the kept rows goes to valid.parquet instead of --valid_rows."""
    seed: int = 0
    """Seed of the shuffle and of the MinHash permutations: the same seed, flags and inputs give byte-identical
    files."""
    examples: int = bounded(5, min=0, max=100)
    """Removed near duplicates shown in prepare_report.json, each with the row it duplicates."""
    overwrite: bool = False
    """Replace an --output_dir prepared earlier with other flags (its files are replaced only when the new run
    finishes)."""
