"""Every setting of a run (the train and model configs) and of decoding, one dataclass per concern. Each field is a
command-line flag of the same name; the other commands' own flags are in `commands.options`.

The string under each field is its help text (`train_low_mem.py COMMAND --help` prints it). Bounds live in the
field's metadata, declared once on the class that introduces the field, so that `commands.flags` can check them
and name the flag in the error. Relative paths are relative
to the repository root, so the defaults work from any working directory.
"""
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Literal, Union

from preparation.layout import prepared_file

PROJECT_ROOT = os.path.dirname(os.path.abspath(__file__))

# `auto` decides from the machine's RAM (under 15 GB: low-memory settings), once, on the main process.
AutoBool = Union[bool, Literal["auto"]]
AutoInt = Union[int, Literal["auto"]]
# Stands for the demo's --output_dir in the demo's fixed paths (see TrainConfigDemo).
OUTPUT_DIR = "<output_dir>"


def resolve_path(path: str) -> str:
    """A path as the user meant it: relative paths are relative to the repository root."""
    return path if os.path.isabs(path) else os.path.join(PROJECT_ROOT, path)


def split_paths(text: str) -> list[str]:
    """A flag's comma-separated paths (or globs) as a list."""
    return [part.strip() for part in str(text).split(",") if part.strip()]


def with_resolved_paths(cfg):
    """A copy of a train config whose file and directory fields are absolute (see `resolve_path`)."""
    paths = ("train_file", "validation_file", "tokenizer_dir", "init_from", "output_dir", "log_dir")
    resolved = replace(cfg, **{name: ",".join(map(resolve_path, split_paths(getattr(cfg, name)))) for name in paths})
    # A directory written by `prepare` is its valid.parquet here (as train_file, expand_paths takes its train.parquet).
    return replace(resolved, validation_file=prepared_file(resolved.validation_file, "valid"))


class GivenFlags(frozenset):
    """The names of the flags a user typed: a setting not among them may come from elsewhere (the saved run of a
    resume) instead of its default."""


def changed_fields(instance, default=None) -> dict:
    """The fields whose value differs from `default` (the class default): what the user changed."""
    default = default or type(instance)()
    return {name: value for name, value in asdict(instance).items() if getattr(default, name) != value}


def bounded(default, min=None, max=None):
    """A field whose value must lie in [min, max]; `commands.flags` reports the flag when it does not."""
    return field(default=default, metadata={"min": min, "max": max})


def required():
    """A field without a default: `commands.flags` reports the flag when the command line lacks it."""
    return field(default=None, metadata={"required": True})


@dataclass
class T5ModelConfig:
    """Shape of the T5 encoder-decoder. The vocabulary size and special ids come from the tokenizer."""

    d_model: int = bounded(768, min=8)
    """Width of every hidden state."""
    d_ff: int = bounded(3072, min=8)
    """Width of the feed-forward layers."""
    num_heads: int = bounded(12, min=1)
    """Attention heads per layer."""
    d_kv: int = bounded(64, min=4)
    """Width of each attention head."""
    num_layers: int = bounded(10, min=1)
    """Encoder layers."""
    num_decoder_layers: int = bounded(10, min=1)
    """Decoder layers."""
    dropout_rate: float = bounded(0.1, min=0.0, max=0.9)
    """Dropout probability during training."""
    relative_attention_num_buckets: int = bounded(32, min=2)
    """Buckets of T5's relative position bias."""


@dataclass
class TrainConfig:
    """A general pre-training run (the original project's defaults)."""

    # --- data ---
    train_file: str = "data/my_train_dataset.parquet"
    """Training parquet: a path, a glob or comma-separated paths, columns `prompt` and `response`."""
    validation_file: str = "data/my_valid_dataset.parquet"
    """Validation parquet for BLEU-4 and eval loss."""
    tokenizer_dir: str = "model_save/tokenizer"
    """Tokenizer directory; trained from `train_file` when it holds none."""
    vocab_size: int = bounded(32000, min=300)
    """Vocabulary size when a tokenizer has to be trained."""
    tokenizer_train_rows: int = bounded(40_000, min=0)
    """Rows sampled to train a tokenizer (0 = all rows); 40k keeps training under 1 GB of RAM."""
    max_seq_len: int = bounded(256, min=8)
    """Most tokens of a prompt and of a response, each including its [EOS]; longer texts are truncated
    (span_corruption: the encoder's input length; chunks are a little longer, targets about a quarter of it)."""
    dataloader_buffer_size: int = bounded(50000, min=1)
    """Shuffle window in rows; also bounds how many rows are held in memory."""
    ultra_low_mem: AutoBool = "auto"
    """Re-open the parquet file for every read and cache nothing (auto: on under 15 GB of RAM)."""
    num_workers: AutoInt = bounded("auto", min=0)
    """DataLoader worker processes per GPU process (auto: 0 under 15 GB of RAM or without a GPU, else 2)."""
    pin_memory: AutoBool = "auto"
    """Pin host memory for faster copies to the GPU (auto: off under 15 GB of RAM or without a GPU)."""

    # --- what the model learns ---
    objective: Literal["seq2seq", "span_corruption", "dpo"] = "seq2seq"
    """seq2seq: write each row's response from its prompt; span_corruption: T5's pre-training on raw documents
    (--text_column), packed into chunks, ~noise_density of their tokens cut out in spans the decoder restores;
    dpo: preference tuning of a trained model on (prompt, chosen, rejected) rows, with TrainConfigDPO's defaults
    (docs/AFTER_PRETRAINING.md)."""
    text_column: str = "text"
    """span_corruption: the column of documents in train_file and validation_file."""
    noise_density: float = bounded(0.15, min=0.01, max=0.5)
    """span_corruption: share of each chunk's tokens cut out."""
    mean_noise_span_length: float = bounded(3.0, min=1.0)
    """span_corruption: mean length of a cut span, in tokens."""
    prompt_column: str = "prompt"
    """dpo: the column of prompts in train_file and validation_file."""
    chosen_column: str = "chosen"
    """dpo: the column of preferred answers."""
    rejected_column: str = "rejected"
    """dpo: the column of answers to move away from (e.g. the fine-tuned model's own, from `generate --file`)."""
    dpo_beta: float = bounded(0.1, min=1e-4, max=100.0)
    """dpo: strength of the pull back to the starting (reference) model: a reward is beta x the change of an
    answer's log-probability since the start."""
    dpo_loss: Literal["sigmoid", "ipo"] = "sigmoid"
    """dpo: sigmoid = the DPO paper's loss, -log sigmoid(reward margin); ipo = IPO's squared loss, (margin / beta -
    1 / (2 beta))^2, which does not push margins without end."""
    dpo_label_smoothing: float = bounded(0.0, min=0.0, max=0.49)
    """dpo, sigmoid: the share of pairs assumed mislabelled (conservative DPO); 0 = trust every label."""
    dpo_sft_weight: float = bounded(0.0, min=0.0)
    """dpo: weight of an added cross-entropy on the chosen answer (per token, as in RPO); 0 = none."""

    # --- where the weights start ---
    init_from: str = ""
    """Start a new run (step 0, fresh optimizer and schedule) from a saved model's weights: a final/ or best/step-*
    directory of this tool, or a Hugging Face T5 directory of the same layout. Its tokenizer and shape come with it."""
    is_finetune: bool = False
    """Fine-tune (the original's flag): TrainConfigSFT's defaults unless --use_large_config, --init_from defaults to
    the best model of model_save/pretrain_large, and --freeze=auto freezes the shared embedding and the encoder.
    (--objective=dpo: the best model of model_save/sft instead, nothing frozen.)"""
    freeze: Literal["auto", "none", "embeddings", "encoder"] = "auto"
    """Parameters that do not train (no gradient, no optimizer state): embeddings = the shared embedding, which is
    also the output projection (tied); encoder = it and the whole encoder; auto = encoder when fine-tuning, else
    none."""

    # --- optimisation ---
    epochs: int = bounded(8, min=1)
    """Passes over the training data; sets the length of the learning-rate schedule."""
    batch_size_per_gpu: int = bounded(16, min=1)
    """Rows per micro-batch on each process."""
    gradient_accumulation_steps: int = bounded(8, min=1)
    """Micro-batches per optimizer step on each process."""
    optimizer: Literal["adafactor_t5", "adafactor", "adamw"] = "adafactor_t5"
    """adafactor_t5: relative steps at the rate measured best (default); adafactor: the original project's; adamw:
    one absolute rate for every tensor. learn_rate means the same for each (docs/TRAINING.md)."""
    learn_rate: float = bounded(1e-4, min=0.0)
    """Peak learning rate, reached at the end of warmup: 1e-4 is the usual rate for every --optimizer."""
    warmup_steps: int = bounded(1024, min=0)
    """Optimizer steps of linear warmup from 0 to `learn_rate`; cosine decay to 0.1x follows."""
    weight_decay: float = bounded(0.01, min=0.0)
    """Decoupled weight decay: weights shrink by lr x weight_decay per step, any optimizer (not biases, norms)."""
    max_grad_norm: float = bounded(1.0, min=0.0)
    """Clip the gradient norm to this (0 = no clipping); the pre-clip norm is logged."""
    mixed_precision: Literal["bf16", "fp16", "no"] = "bf16"
    """bf16, fp16 or no; bf16 falls back to fp32 (with a log line) where the device lacks it."""
    ddp_bf16_gradients: bool = False
    """All-reduce DDP gradients in bf16: half the traffic (GeForce cards without P2P pass it through host memory),
    rounded averages. Off: exact fp32."""
    compile: bool = False
    """torch.compile the training forward (inductor): faster GPU steps after a slow first one; batches are padded to a
    multiple of 8 tokens so that few shapes recompile (each recompile is logged)."""
    seed: int = bounded(23333, min=0, max=2**32 - 1)  # NumPy's seeds (through Accelerate's set_seed) stop there
    """Seed of the data order, initial weights and dropout."""
    max_bad_steps: int = bounded(20, min=1)
    """Stop after this many consecutive optimizer steps with a non-finite loss or gradient."""

    # --- checkpoints, evaluation, logging ---
    output_dir: str = "model_save/pretrain"
    """Where checkpoints, metrics.jsonl, best models and final/ go."""
    is_keep_training: bool = False
    """Resume from the newest complete state in `output_dir`."""
    save_steps: int = bounded(10000, min=1)
    """Evaluate and save a resumable state every this many optimizer steps."""
    keep_latest_n_ckp: int = bounded(5, min=0)
    """Best models (by BLEU-4; span_corruption: by eval loss; dpo: by eval reward accuracy, ties by eval loss) kept
    on disk; 0 keeps none."""
    eval_max_samples: int = bounded(1000, min=0)
    """Validation rows per evaluation (greedy generation is slow: docs/TRAINING.md); span_corruption: chunks; dpo:
    pairs."""
    eval_batch_size: int = bounded(32, min=1)
    """Rows per generation batch during evaluation."""
    max_steps: int = bounded(0, min=0)
    """Stop once the global optimizer step reaches this (0 = no cap); never changes the schedule."""
    logging_steps: int = bounded(50, min=1)
    """Log loss, lr and throughput every this many optimizer steps."""
    memory_cleanup_steps: int = bounded(50, min=0)
    """Run gc and empty the CUDA cache every this many optimizer steps (0 = never)."""
    memory_log_steps: int = bounded(200, min=0)
    """Log RSS, free RAM and GPU memory every this many optimizer steps (0 = never)."""
    log_dir: str = "logs"
    """Directory of the human log chat_trainer_low_mem_YYYYMMDD.log."""
    report_to: str = "none"
    """Experiment tracker through Accelerate: none, tensorboard, wandb, ... (comma-separated)."""


@dataclass
class TrainConfigPretrainLarge(TrainConfig):
    """10M rows on 3 GPUs of 20 GB and 12 GB of host RAM (the user's guide). Only defaults change here: help
    texts and bounds come from TrainConfig."""

    train_file: str = "data/pretrain_train_10m.parquet"
    validation_file: str = "data/pretrain_valid_100k.parquet"
    max_seq_len: int = 192
    dataloader_buffer_size: int = 5000
    epochs: int = 3
    batch_size_per_gpu: int = 32
    gradient_accumulation_steps: int = 2
    output_dir: str = "model_save/pretrain_large"
    save_steps: int = 5000
    logging_steps: int = 100
    eval_max_samples: int = 2000
    """Validation rows per evaluation: about 2% of the training time between saves (see the README)."""


@dataclass
class TrainConfigSFT(TrainConfig):
    """Supervised fine-tuning of a pre-trained model (--is_finetune=True): the original project's SFT values. Only
    defaults change here: help texts and bounds come from TrainConfig."""

    train_file: str = "data/sft_train_dataset.parquet"
    validation_file: str = "data/sft_valid_dataset.parquet"
    is_finetune: bool = True
    max_seq_len: int = 256
    dataloader_buffer_size: int = 10000
    epochs: int = 20
    batch_size_per_gpu: int = 20
    gradient_accumulation_steps: int = 6
    learn_rate: float = 5e-5
    output_dir: str = "model_save/sft"
    save_steps: int = 2000
    keep_latest_n_ckp: int = 8


@dataclass
class TrainConfigDPO(TrainConfig):
    """Preference tuning of the fine-tuned model (--objective=dpo): the original project's DPO values (beta 0.1,
    Adafactor, lr 1e-5, batch 4 x 8, warmup 1,000, 520 tokens). --init_from defaults to the best model of
    model_save/sft. Only defaults change here: help texts and bounds come from TrainConfig."""

    train_file: str = "data/dpo_train_dataset.parquet"
    validation_file: str = "data/dpo_valid_dataset.parquet"
    objective: Literal["seq2seq", "span_corruption", "dpo"] = "dpo"
    max_seq_len: int = 520
    dataloader_buffer_size: int = 10000
    epochs: int = 4
    batch_size_per_gpu: int = 4
    gradient_accumulation_steps: int = 8
    learn_rate: float = 1e-5
    warmup_steps: int = 1000
    output_dir: str = "model_save/dpo"
    save_steps: int = 2000
    keep_latest_n_ckp: int = 3
    eval_max_samples: int = 500
    eval_batch_size: int = 16


@dataclass
class TrainConfigDemo(TrainConfig):
    """`demo`'s run: small enough to finish in minutes on 2 CPU cores, large enough to learn the task well (BLEU-4
    > 0.8). Only defaults change here: help texts and bounds come from TrainConfig."""

    train_file: str = f"{OUTPUT_DIR}/data/train.parquet"
    """Not settable: the demo writes its generated rows inside its own --output_dir, never over your files."""
    validation_file: str = f"{OUTPUT_DIR}/data/valid.parquet"
    """Not settable, like --train_file."""
    tokenizer_dir: str = f"{OUTPUT_DIR}/tokenizer"
    """Not settable, like --train_file: the demo trains its own tokenizer there."""
    vocab_size: int = 400
    max_seq_len: int = 24
    dataloader_buffer_size: int = 4096
    epochs: int = 8
    batch_size_per_gpu: int = 32
    gradient_accumulation_steps: int = 1
    learn_rate: float = 1e-4
    warmup_steps: int = 100
    mixed_precision: Literal["bf16", "fp16", "no"] = "no"
    output_dir: str = "model_save/demo"
    """The demo's own directory (data, tokenizer, run), started over at every demo. Any other non-empty
    directory is refused: the demo only empties a directory that holds its marker file, .demo_output."""
    save_steps: int = 500
    keep_latest_n_ckp: int = 3
    eval_max_samples: int = 200
    eval_batch_size: int = 100
    logging_steps: int = 100
    memory_log_steps: int = 300
    log_dir: str = f"{OUTPUT_DIR}/logs"
    """The demo's human log stays inside its --output_dir too (give another directory to move it)."""


@dataclass
class T5ModelConfigDemo(T5ModelConfig):
    """`demo`'s model: a tiny T5, enough for the task. Only defaults change here."""

    d_model: int = 128
    d_ff: int = 256
    num_heads: int = 4
    d_kv: int = 32
    num_layers: int = 2
    num_decoder_layers: int = 2
    dropout_rate: float = 0.0


@dataclass
class ConfigChoice:
    """Which train config the other flags change."""

    use_large_config: bool = False
    """Start from TrainConfigPretrainLarge (the user's guide: 10M rows on 3 GPUs) instead of TrainConfig."""


@dataclass
class DecodingSettings:
    """How each token of an answer is chosen (generate, chat, serve; both engines; docs/SERVING.md)."""

    max_new_tokens: int = bounded(192, min=1, max=4096)
    """Most tokens of the answer."""
    num_beams: int = bounded(1, min=1, max=32)
    """Beam search over this many candidates (1: greedy, or sampling with --do_sample). generate only: chat and
    serve stream one candidate."""
    do_sample: bool = False
    """Sample each token from the model's distribution (shaped by temperature, top_k, top_p) instead of taking
    the likeliest (greedy, the default)."""
    temperature: float = bounded(1.0, min=0.01, max=10.0)
    """Sampling: divide the logits by this (below 1: safer, above 1: more varied)."""
    top_k: int = bounded(0, min=0)
    """Sampling: only the k likeliest tokens (0: no limit)."""
    top_p: float = bounded(1.0, min=0.01, max=1.0)
    """Sampling: only the likeliest tokens whose probabilities add up to top_p (1: no limit)."""
    repetition_penalty: float = bounded(1.0, min=0.1, max=10.0)
    """Lower the score of every token already in the answer by this factor (1: none; 1.2-1.5 stops a model that
    repeats itself)."""
    no_repeat_ngram_size: int = bounded(0, min=0)
    """Never repeat an n-gram of this many tokens within the answer (0: no rule)."""
    seed: int = bounded(-1, min=-1, max=2**32 - 1)
    """Seed of the sampling: the same seed and settings give the same answer (-1: a new seed every time)."""
