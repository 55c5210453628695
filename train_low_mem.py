"""Pre-train a small Chinese T5 on modest hardware. `python train_low_mem.py COMMAND --help` for each command.

A command's parameters are typed by the dataclasses of config.py whose fields are its flags; `command` checks every
flag against them before the command runs. Heavy libraries are imported inside the commands so that a mistyped
flag is reported in a fraction of a second.
"""
from commands.cli import command, main
from config import (
    DemoFlags,
    EvaluateFlags,
    ExportFlags,
    GenerateFlags,
    GivenFlags,
    PlanFlags,
    PlotFlags,
    T5ModelConfig,
    T5ModelConfigDemo,
    TokenizerFlags,
    TrainConfig,
    TrainConfigDemo,
)


@command
def train(cfg: TrainConfig, model_cfg: T5ModelConfig, given: GivenFlags):
    """Train on train_file: from scratch, from a model (--init_from, --is_finetune) or resuming (--is_keep_training).

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
    """Print a saved model's answer to a prompt."""
    from commands.saved_model import generate_command
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


COMMANDS = {"train": train, "train_tokenizer": train_tokenizer, "demo": demo, "evaluate": evaluate,
            "generate": generate, "plan": plan, "plot": plot, "export": export}

if __name__ == "__main__":
    main(COMMANDS)
