"""Pre-train a small Chinese T5 on modest hardware. `python train_low_mem.py COMMAND --help` for each command.

Heavy libraries are imported inside the commands so that a mistyped flag is reported in a fraction of a second.
"""
import fire

from utils.cli import command, flag_bool, train_configs, train_help


@command
def train(use_large_config=False, **flags):
    """Train (or with --is_keep_training=True resume) on train_file. Every config field is a flag:"""
    cfg, model_cfg = train_configs(use_large_config, flags)
    from utils.trainer import run_training
    run_training(cfg, model_cfg)


@command
def train_tokenizer(train_file="data/my_train_dataset.parquet", tokenizer_dir="model_save/tokenizer",
                    vocab_size=32000, max_rows=40_000):
    """Train the byte-level BPE tokenizer on the prompt and response columns of train_file."""
    from utils.commands import train_tokenizer_command
    train_tokenizer_command(train_file, tokenizer_dir, vocab_size, max_rows)


@command
def demo(output_dir="model_save/demo", **flags):
    """Generate a small learnable Chinese task, train a tiny T5 on it end to end, print BLEU-4 and examples."""
    from utils.demo import run_demo
    run_demo(output_dir, flags)


@command
def evaluate(model_dir, file, max_samples=1000, batch_size=32, max_seq_len=192):
    """Print BLEU-4 and the loss of a saved model on a parquet file."""
    from utils.commands import evaluate_command
    evaluate_command(model_dir, file, max_samples, batch_size, max_seq_len)


@command
def generate(model_dir, prompt, max_new_tokens=192):
    """Print a saved model's answer to a prompt."""
    from utils.commands import generate_command
    generate_command(model_dir, prompt, max_new_tokens)


@command
def plan(use_large_config=False, num_processes=1, num_samples=0, step_time=0.0, json=False, probe=True,
         **flags):
    """Print what a run will do and need (steps, saves, memory, disk, hours) without training."""
    from utils.plan import run_plan
    run_plan(use_large_config, flags, num_processes, num_samples, step_time, flag_bool("json", json),
             flag_bool("probe", probe))


@command
def plot(output_dir="model_save/pretrain_large"):
    """Draw PNG charts of loss, BLEU-4, lr and memory from output_dir/metrics.jsonl, next to it."""
    from utils.plot import run_plot
    run_plot(output_dir)


train.__doc__ += "\n\n" + train_help()

if __name__ == "__main__":
    fire.Fire({"train": train, "train_tokenizer": train_tokenizer, "demo": demo, "evaluate": evaluate,
               "generate": generate, "plan": plan, "plot": plot})
