"""Everything a training run is made of, built in order: logging, tokenizer, model, optimizer, data, state.

`build_run` returns a `Run` whose parts each own one concern; `training.loop` only drives them.
"""
import dataclasses
import json
import logging
import os
import secrets
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from transformers import PreTrainedTokenizerFast, T5ForConditionalGeneration

from config import TrainConfig, changed_fields, split_paths, with_resolved_paths
from model.t5 import FROZEN_MODULES, build_model, count_parameters, freeze, load_model
from model.tokenizer import has_tokenizer, load_tokenizer, train_tokenizer
from model.preference import PreferenceLoss
from training.best_models import RANKING, BestModels
from training.checkpoint import Checkpointer
from training.evaluation import AnyEvaluator, build_evaluator
from training.feed import DataFeed, token_counts_files
from training.init_from import resolved_freeze
from training.memory import MemoryHygiene
from training.optim import RECIPES, allocate_state, build_optimizer
from training.reference import ReferencePass, reference_for_run
from training.reporting import MetricsLog
from training.resume import describe_run, resume, start_fresh
from training.runtime import Runtime, tracker_names
from training.signals import StopSignals
from training.state import TrainingState
from training.step import StepRunner
from utils.atomic import write_json_atomically
from utils.distributed import decided_by_main, ranks_where
from utils.errors import RunAborted, UserError
from utils.log import log_file_path, setup_logging

log = logging.getLogger("trainer")


@dataclass
class Run:
    cfg: TrainConfig
    accelerator: Accelerator
    tokenizer: PreTrainedTokenizerFast
    model: T5ForConditionalGeneration
    state: TrainingState
    feed: DataFeed
    stepper: StepRunner
    checkpointer: Checkpointer
    best: BestModels
    evaluator: AnyEvaluator
    metrics: MetricsLog
    memory: MemoryHygiene
    signals: StopSignals
    reference: ReferencePass | None = None  # DPO: the starting model's log-probabilities, computed before step 1


def ensure_tokenizer(cfg, accelerator):
    """Train the tokenizer on the main process when `tokenizer_dir` holds none; every rank then loads it."""
    if accelerator.is_main_process and not has_tokenizer(cfg.tokenizer_dir):
        log.info("no tokenizer in %s: training a %d-token one on %s (up to %d rows)", cfg.tokenizer_dir,
                 cfg.vocab_size, cfg.train_file, cfg.tokenizer_train_rows)
        train_tokenizer(split_paths(cfg.train_file), cfg.tokenizer_dir, vocab_size=cfg.vocab_size,
                        max_rows=cfg.tokenizer_train_rows or None, seed=cfg.seed,
                        text_column=cfg.text_column if cfg.objective == "span_corruption" else None)
    accelerator.wait_for_everyone()
    return load_tokenizer(cfg.tokenizer_dir)


def check_output_dir_is_shared(accelerator, output_dir: str) -> None:
    """Every rank must see the main process's `output_dir`: each writes its random states into the saved state
    and a resume reads the state the main process chose. Machines with separate disks would resume apart."""
    if accelerator.num_processes == 1:
        return
    probe = os.path.join(output_dir, f".shared-{decided_by_main(accelerator, lambda: secrets.token_hex(8))}")
    if accelerator.is_main_process:
        open(probe, "w").close()
    accelerator.wait_for_everyone()
    blind = ranks_where(accelerator, not os.path.exists(probe))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.remove(probe)
    if blind:
        raise UserError(f"--output_dir={output_dir}: {blind} of {accelerator.num_processes} processes "
                        "do not see the main process's files there; on several machines it must be on a "
                        "filesystem they all mount (NFS or similar)")


def record_configuration(cfg, model_cfg, accelerator, runtime: Runtime) -> None:
    """The resolved configuration in the log and in train_config.json, with what differs from the defaults."""
    # `cfg`'s paths are absolute by now; compared with relative defaults they would all look changed.
    changes = {**changed_fields(cfg, with_resolved_paths(type(cfg)())), **changed_fields(model_cfg)}
    log.info("configuration (%s); changed from defaults: %s", type(cfg).__name__,
             json.dumps(changes, ensure_ascii=False))
    if accelerator.is_main_process:
        os.makedirs(cfg.output_dir, exist_ok=True)
        write_json_atomically(os.path.join(cfg.output_dir, "train_config.json"),
                              {"config": type(cfg).__name__, "train": dataclasses.asdict(cfg),
                               "model": dataclasses.asdict(model_cfg), "changed": changes,
                               "runtime": dataclasses.asdict(runtime)})


def check_optimizer_fits_the_engine(name: str, frozen: str, objective: str, accelerator) -> None:
    """DeepSpeed ZeRO and FSDP hand the optimizer flattened shards: an RMS per tensor or a factored moment would
    be computed over pieces of several tensors, a different (and untested) optimizer. FSDP also flattens frozen and
    trained tensors together, which it refuses or trains alike, and gathers its shards only inside the wrapped
    forward, while a preference pair calls the encoder on its own."""
    engine = accelerator.distributed_type.value
    if objective == "dpo" and (engine == "FSDP" or engine == "DEEPSPEED"
                               and accelerator.state.deepspeed_plugin.zero_stage == 3):
        raise UserError(f"--objective=dpo with {engine} sharding the weights: a pair's forward calls the encoder "
                        "outside the wrapped forward, where the shards are not gathered; use DDP (the model and its "
                        "optimizer fit a 20 GB card)")
    if engine in ("DEEPSPEED", "FSDP") and RECIPES[name].relative:
        raise UserError(f"--optimizer={name} scales each tensor by its own RMS, which {engine} "
                        "shards into flat pieces: use --optimizer=adamw with it")
    if engine == "FSDP" and frozen != "none":
        raise UserError(f"--freeze={frozen} with FSDP: FSDP flattens frozen and trained tensors together; use DDP "
                        "or DeepSpeed to fine-tune with frozen parts, or --freeze=none")


def make_optimizer_state(optimizer, accelerator, name: str) -> None:
    """The optimizer's state before the first step (`allocate_state`), where running out of GPU memory is one
    clear line instead of a failed first step. DeepSpeed's engine makes its own."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return
    try:
        allocate_state(optimizer)
    except torch.OutOfMemoryError:
        raise RunAborted(f"out of GPU memory making the optimizer's state (--optimizer={name}) before the first step: "
                         "the weights, their gradients and that state do not fit on the GPU (`plan` shows each); "
                         "--optimizer=adafactor_t5 keeps a few MB of state, or use a smaller model") from None


DISTRIBUTION = {"NO": "not distributed", "MULTI_GPU": "data parallel (DDP) over GPUs",
                "MULTI_CPU": "data parallel (DDP, gloo) over CPU processes", "DEEPSPEED": "DeepSpeed",
                "FSDP": "FSDP"}


def describe_processes(accelerator, runtime: Runtime) -> str:
    """e.g. "3 processes, data parallel (DDP) over GPUs, this one on cuda:0, bf16 mixed precision"."""
    count = accelerator.num_processes
    kind = accelerator.distributed_type.value
    precision = "fp32" if runtime.mixed_precision == "no" else f"{runtime.mixed_precision} mixed precision"
    return (f"{count} process{'es' * (count > 1)}, {DISTRIBUTION.get(kind, kind)}, "
            f"{'this one ' * (count > 1)}on {accelerator.device}, {precision}")


def build_run(cfg, model_cfg, accelerator: Accelerator, runtime: Runtime) -> Run:
    setup_logging(cfg.log_dir, accelerator.is_main_process, accelerator.process_index)
    log.info("log file: %s", log_file_path(cfg.log_dir))
    log.info("%s", describe_processes(accelerator, runtime))
    for note in runtime.notes:
        log.info(note)
    record_configuration(cfg, model_cfg, accelerator, runtime)
    check_output_dir_is_shared(accelerator, cfg.output_dir)
    tokenizer = ensure_tokenizer(cfg, accelerator)
    set_seed(cfg.seed)
    if cfg.init_from:
        model = load_model(model_cfg, tokenizer, cfg.init_from)
        log.info("weights from %s (a new run: step 0, fresh optimizer and schedule)", cfg.init_from)
    else:
        model = build_model(model_cfg, tokenizer)
    # Saved with every model (config.json): `evaluate` scores at the length the model learned.
    model.config.trained_max_seq_len = cfg.max_seq_len
    frozen = resolved_freeze(cfg)
    trainable = freeze(model, frozen)
    log.info("model: %.2fM parameters, vocabulary %d; %.2fM train%s", count_parameters(model) / 1e6, len(tokenizer),
             trainable / 1e6, f" (--freeze={frozen}: {' and '.join(FROZEN_MODULES[frozen])} frozen)"
             if frozen != "none" else "")
    state = TrainingState(batch_size_per_gpu=cfg.batch_size_per_gpu,
                          gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                          world_size=accelerator.num_processes)
    reference = reference_for_run(cfg, accelerator) if cfg.objective == "dpo" else None
    feed = DataFeed(cfg, tokenizer, runtime, accelerator.process_index, accelerator.num_processes,
                    decided_by_main(accelerator, lambda: token_counts_files(cfg, tokenizer)), reference)
    check_optimizer_fits_the_engine(cfg.optimizer, frozen, cfg.objective, accelerator)
    model.to(accelerator.device)  # first: a fused optimizer is built for the device its tensors live on
    model, optimizer = accelerator.prepare(model, build_optimizer(model, cfg.optimizer, cfg.weight_decay))
    if not cfg.is_keep_training:  # (a resume loads the saved state instead)
        make_optimizer_state(optimizer, accelerator, cfg.optimizer)
    accelerator.register_for_checkpointing(state)
    metrics = MetricsLog(cfg.output_dir, accelerator)
    preference = PreferenceLoss.of(cfg) if cfg.objective == "dpo" else None
    evaluator = build_evaluator(cfg, accelerator, tokenizer, reference)
    run = Run(cfg=cfg, accelerator=accelerator, tokenizer=tokenizer, model=model, state=state, feed=feed,
              stepper=StepRunner(accelerator, model, optimizer, cfg.max_grad_norm, cfg.compile, preference),
              checkpointer=Checkpointer(accelerator, cfg.output_dir, cfg.save_steps,
                                        describe_run(cfg, model_cfg, tokenizer, reference)),
              best=BestModels(accelerator, cfg.output_dir, cfg.keep_latest_n_ckp, tokenizer, *RANKING[cfg.objective]),
              evaluator=evaluator,
              metrics=metrics, memory=MemoryHygiene(cfg.memory_cleanup_steps, cfg.memory_log_steps, metrics),
              signals=StopSignals(),
              reference=ReferencePass(cfg, accelerator, tokenizer, reference, evaluator) if reference else None)
    if cfg.is_keep_training:
        resume(run)
    else:
        start_fresh(run)
    if tracker_names(cfg.report_to):
        accelerator.init_trackers("t5_pretrain",
                                  config={k: str(v) for k, v in run.checkpointer.run_description["train"].items()})
    log.info("data: %s, %d steps per epoch, %d steps in %d epochs, global batch %d", feed.description,
             feed.steps_per_epoch(state), state.schedule_total_steps, cfg.epochs, feed.global_batch_size(state))
    return run
