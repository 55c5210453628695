"""Pre-train a small Chinese T5 on modest hardware. `python train_low_mem.py COMMAND --help` for each command.

A command's parameters are typed by the dataclasses (config.py, commands/options.py) whose fields are its flags;
`command` checks every flag against them before the command runs. Heavy libraries are imported inside the commands so that a mistyped
flag is reported in a fraction of a second.
"""
from commands.cli import command, main
from commands.options import (
    ChatFlags,
    DemoFlags,
    EvaluateFlags,
    ExportFlags,
    GenerateFlags,
    PlanFlags,
    PlotFlags,
    PrepareFlags,
    ServeFlags,
    TokenizerFlags,
)
from config import GivenFlags, T5ModelConfig, T5ModelConfigDemo, TrainConfig, TrainConfigDemo


@command
def train(cfg: TrainConfig, model_cfg: T5ModelConfig, given: GivenFlags):
    """Train: from scratch, from a model (--init_from, --is_finetune, --objective=dpo), or resume (--is_keep_training).

    Every config field is a flag:"""
    from training.loop import run_training
    run_training(cfg, model_cfg, given)


@command
def train_tokenizer(flags: TokenizerFlags):
    """Train the byte-level BPE tokenizer on the prompt and response columns of train_file."""
    from commands.train_tokenizer import train_tokenizer_command
    train_tokenizer_command(flags)


@command
def demo(flags: DemoFlags, cfg: TrainConfigDemo, model_cfg: T5ModelConfigDemo):
    """Generate a small learnable Chinese task, train a tiny T5 on it end to end, print BLEU-4 and examples.

    Every train flag works, with the demo's defaults, except --train_file, --validation_file and --tokenizer_dir:
    the demo keeps its data and tokenizer inside its --output_dir."""
    from commands.demo import run_demo
    run_demo(flags, cfg, model_cfg)


@command
def evaluate(flags: EvaluateFlags):
    """Print BLEU-4 and the loss of a saved model on a parquet file."""
    from commands.saved_model import evaluate_command
    evaluate_command(flags)


@command
def generate(flags: GenerateFlags):
    """Print a saved model's answer to a prompt (--prompt), or answer every row of a parquet file (--file, --output).

    Greedy by default; beam search, sampling and repetition penalties by the decoding flags (docs/SERVING.md)."""
    from commands.generate import generate_command
    generate_command(flags)


@command
def export(flags: ExportFlags):
    """Write a saved model as a CTranslate2 model (faster answers on a CPU; `pip install ctranslate2`).

    `generate --engine=ctranslate2 --model_dir=OUTPUT_DIR` answers with it, as does ctranslate2.Translator."""
    from commands.export import export_command
    export_command(flags)


@command
def plan(flags: PlanFlags, cfg: TrainConfig, model_cfg: T5ModelConfig, given: GivenFlags):
    """Print what a run will do and need (steps, saves, memory, disk, hours) without training.

    Every train flag works, as in train:"""
    from commands.plan import run_plan
    run_plan(flags, cfg, model_cfg, given)


@command
def plot(flags: PlotFlags):
    """Draw PNG charts of loss, BLEU-4, lr and memory from output_dir/metrics.jsonl, next to it."""
    from commands.plot import run_plot
    run_plot(flags.output_dir)


@command
def chat(flags: ChatFlags):
    """Talk with a saved model in the terminal: each answer is printed as it is generated.

    Earlier turns go into the prompt by the chat template (docs/SERVING.md), the oldest left out to fit
    --max_seq_len. /reset forgets them, /exit (or Ctrl-D) leaves, Ctrl-C stops the answer being written."""
    from commands.chat import chat_command
    chat_command(flags)


@command
def serve(flags: ServeFlags):
    """Serve a saved model over HTTP: an OpenAI-compatible API and a chat page (docs/SERVING.md).

    /v1/chat/completions (streamed or whole), /v1/models, /health, and the page at /. Concurrent requests are
    decoded together; Ctrl-C or SIGTERM lets the requests in flight finish, then exits."""
    from commands.serve import serve_command
    serve_command(flags)


@command
def prepare(flags: PrepareFlags):
    """Turn raw files (parquet, jsonl, json, csv, tsv, txt; .gz/.zst) into clean, deduplicated train/valid parquet.

    Rows are mapped to prompt/response (or text), cleaned by the rules below (each counted), deduplicated exactly
    and by MinHash near-duplicate detection, shuffled with a seed and split after deduplication (no validation row
    duplicates a training row), and written in row groups of 5,000 with prepare_report.json and length histograms.
    Memory stays bounded (signatures and band keys are spilled to disk); an interrupted run resumes when re-run
    with the same flags. `train --train_file=DIR --validation_file=DIR`, `plan` and `train_tokenizer` accept the
    output directory. See docs/PREPARE.md."""
    from commands.prepare import prepare_command
    prepare_command(flags)


COMMANDS = {"train": train, "train_tokenizer": train_tokenizer, "demo": demo, "evaluate": evaluate,
            "generate": generate, "plan": plan, "plot": plot, "export": export, "chat": chat, "serve": serve,
            "prepare": prepare}

if __name__ == "__main__":
    main(COMMANDS)
