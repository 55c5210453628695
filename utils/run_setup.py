"""Everything a training run is made of, built in order: processes, logging, tokenizer, model, data, state.

`prepare_run` returns a `Run` whose parts each own one concern; `utils.trainer` only drives them.
"""
import dataclasses
import hashlib
import json
import logging
import os
import secrets
from dataclasses import dataclass

from accelerate.utils import set_seed

from config import with_resolved_paths
from model.t5 import build_model, count_parameters
from model.tokenizer import has_tokenizer, load_tokenizer, train_tokenizer
from utils.checkpoint import BestModels, Checkpointer, write_json_atomically
from utils.data_feed import DataFeed
from utils.errors import UserError
from utils.evaluation import Evaluator
from utils.flags import changed_fields
from utils.memory import MemoryHygiene
from utils.optim import aim_schedule, build_optimizer, build_scheduler
from utils.run_log import MetricsLog, log_file_path, setup_logging
from utils.runtime import decided_by_main, ranks_where, start, tracker_names
from utils.signals import StopSignals
from utils.state import TrainingState
from utils.step import StepRunner

log = logging.getLogger("trainer")


@dataclass
class Run:
    cfg: object
    accelerator: object
    tokenizer: object
    model: object
    optimizer: object
    scheduler: object
    state: TrainingState
    feed: DataFeed
    stepper: StepRunner
    checkpointer: Checkpointer
    best: BestModels
    evaluator: Evaluator
    metrics: MetricsLog
    memory: MemoryHygiene
    signals: StopSignals
    total_steps: int


def ensure_tokenizer(cfg, accelerator):
    """Train the tokenizer on the main process when `tokenizer_dir` holds none; every rank then loads it."""
    if accelerator.is_main_process and not has_tokenizer(cfg.tokenizer_dir):
        log.info("no tokenizer in %s: training a %d-token one on %s (up to %d rows)", cfg.tokenizer_dir,
                 cfg.vocab_size, cfg.train_file, cfg.tokenizer_train_rows)
        train_tokenizer(cfg.train_file.split(","), cfg.tokenizer_dir, vocab_size=cfg.vocab_size,
                        max_rows=cfg.tokenizer_train_rows or None, seed=cfg.seed)
    accelerator.wait_for_everyone()
    return load_tokenizer(cfg.tokenizer_dir)


def describe_run(cfg, model_cfg, tokenizer) -> dict:
    """What a resume must match (model shape, tokenizer) or report (training settings)."""
    with open(os.path.join(cfg.tokenizer_dir, "tokenizer.json"), "rb") as vocabulary:
        fingerprint = hashlib.sha256(vocabulary.read()).hexdigest()[:16]
    return {"model": dataclasses.asdict(model_cfg), "tokenizer": {"size": len(tokenizer), "sha256": fingerprint},
            "train": dataclasses.asdict(cfg)}


def check_resumable(saved: dict, current: dict) -> None:
    """An incompatible model or tokenizer is an error; changed training settings are reported and applied."""
    problems = [f"--{name}: the saved run has {saved['model'].get(name)!r}, this one {value!r}"
                for name, value in current["model"].items() if saved["model"].get(name) != value]
    if saved["tokenizer"] != current["tokenizer"]:
        problems.append(f"--tokenizer_dir: not the tokenizer the saved run used ({saved['tokenizer']})")
    if problems:
        raise UserError("cannot resume, the saved state is incompatible: " + "; ".join(problems))
    for name, value in current["train"].items():
        if name != "is_keep_training" and saved["train"].get(name) != value:
            log.warning("resume: --%s changed from %r to %r", name, saved["train"].get(name), value)


def resume(cfg, accelerator, checkpointer, state, description) -> None:
    path = checkpointer.latest()
    if path is None:
        log.warning("--is_keep_training=True but %s holds no complete state: starting from scratch", cfg.output_dir)
        return
    with open(os.path.join(path, "run.json"), encoding="utf-8") as saved_file:
        saved = json.load(saved_file)
    check_resumable(saved, description)
    checkpointer.load(path)
    configured = (saved["train"]["batch_size_per_gpu"], saved["train"]["gradient_accumulation_steps"])
    requested = (cfg.batch_size_per_gpu, cfg.gradient_accumulation_steps)
    if configured != requested:
        state.batch_size_per_gpu, state.gradient_accumulation_steps = requested
    elif (state.batch_size_per_gpu, state.gradient_accumulation_steps) != configured:
        log.warning("resume: keeping batch_size_per_gpu=%d, gradient_accumulation_steps=%d set by out-of-memory "
                    "recovery", state.batch_size_per_gpu, state.gradient_accumulation_steps)
    if state.world_size != accelerator.num_processes:
        log.warning("resume: the saved run had %d processes, this one %d; continuing at the same global sample "
                    "(%d of epoch %d)", state.world_size, accelerator.num_processes, state.epoch_sample,
                    state.epoch)
        state.world_size = accelerator.num_processes
    log.info("resumed from %s: step %d, epoch %d, sample %d of the epoch", path, state.global_step, state.epoch,
             state.epoch_sample)


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


def prepare_run(cfg, model_cfg) -> Run:
    accelerator, runtime = start(cfg, cfg.gradient_accumulation_steps)
    setup_logging(cfg.log_dir, accelerator.is_main_process, accelerator.process_index)
    log.info("log file: %s", log_file_path(cfg.log_dir))
    log.info("%d process(es), %s, device %s, precision %s", accelerator.num_processes,
             accelerator.distributed_type.value, accelerator.device, runtime.mixed_precision)
    for note in runtime.notes:
        log.info(note)
    # `cfg`'s paths are absolute by now; compared with relative defaults they would all look changed.
    changes = {**changed_fields(cfg, with_resolved_paths(type(cfg)())), **changed_fields(model_cfg)}
    log.info("configuration (%s); changed from defaults: %s", type(cfg).__name__, json.dumps(changes, ensure_ascii=False))
    if accelerator.is_main_process:
        os.makedirs(cfg.output_dir, exist_ok=True)
        write_json_atomically(os.path.join(cfg.output_dir, "train_config.json"),
                              {"config": type(cfg).__name__, "train": dataclasses.asdict(cfg),
                               "model": dataclasses.asdict(model_cfg), "changed": changes,
                               "runtime": dataclasses.asdict(runtime)})
    check_output_dir_is_shared(accelerator, cfg.output_dir)
    tokenizer = ensure_tokenizer(cfg, accelerator)
    set_seed(cfg.seed)
    model = build_model(model_cfg, tokenizer)
    log.info("model: %.1fM parameters, vocabulary %d", count_parameters(model) / 1e6, len(tokenizer))
    state = TrainingState(batch_size_per_gpu=cfg.batch_size_per_gpu,
                          gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                          world_size=accelerator.num_processes)
    feed = DataFeed(cfg, tokenizer, runtime, accelerator)
    optimizer = build_optimizer(model, cfg.learn_rate, cfg.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.warmup_steps, 1)  # aimed below, once a resume is known
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    accelerator.register_for_checkpointing(state)
    description = describe_run(cfg, model_cfg, tokenizer)
    checkpointer = Checkpointer(accelerator, cfg.output_dir, cfg.save_steps, description)
    if cfg.is_keep_training:
        resume(cfg, accelerator, checkpointer, state, description)
    # The schedule follows this invocation's flags: a changed learn_rate or epochs applies from the next step.
    total_steps = feed.total_steps(state, cfg.epochs)
    aim_schedule(scheduler, cfg.learn_rate, cfg.warmup_steps, total_steps, state)
    accelerator.gradient_accumulation_steps = state.gradient_accumulation_steps
    best = BestModels(accelerator, cfg.output_dir, cfg.keep_latest_n_ckp, tokenizer)
    best.restore(state)
    metrics = MetricsLog(cfg.output_dir, accelerator, state.global_step if cfg.is_keep_training else 0)
    if tracker_names(cfg.report_to):
        accelerator.init_trackers("t5_pretrain", config={k: str(v) for k, v in description["train"].items()})
    log.info("data: %d rows, %d steps per epoch, %d steps in %d epochs, global batch %d", feed.num_rows,
             feed.steps_per_epoch(state), total_steps, cfg.epochs,
             feed.global_batch_size(state))
    return Run(cfg, accelerator, tokenizer, model, optimizer, scheduler, state, feed,
               StepRunner(accelerator, model, optimizer, scheduler, cfg.max_grad_norm),
               checkpointer, best,
               Evaluator(accelerator, tokenizer, cfg.validation_file, cfg.eval_max_samples, cfg.eval_batch_size,
                         cfg.max_seq_len),
               metrics, MemoryHygiene(cfg.memory_cleanup_steps, cfg.memory_log_steps, metrics), StopSignals(),
               total_steps)
