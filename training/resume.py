"""Where a run starts: from nothing, or from the newest complete state in `output_dir`, in one ordered place.

A resume continues at the next batch with the same data order, learning-rate step, best-k list and random
streams: on CPU in fp32 the resumed run ends bitwise equal to an uninterrupted one.
"""
import dataclasses
import json
import logging
import os

from config import TrainConfig, TrainConfigDemo, TrainConfigDPO, TrainConfigPretrainLarge, TrainConfigSFT
from model.tokenizer import has_tokenizer, tokenizer_fingerprint
from training.checkpoint import COMPLETE_MARKER, complete_states
from training.schedule import reaim
from utils.distributed import decided_by_main
from utils.errors import UserError, UserErrors

log = logging.getLogger("trainer")
# What cuts packed text into chunks: a data position (a chunk of the epoch) means nothing under other values.
CHUNK_SETTINGS = ("text_column", "noise_density", "mean_noise_span_length", "max_seq_len")
# What the reference log-probabilities of preference pairs were computed from: the starting model is gone by now.
REFERENCE_SETTINGS = ("prompt_column", "chosen_column", "rejected_column", "max_seq_len", "mixed_precision")
NOT_TAKEN_OVER = ("output_dir", "is_keep_training", "init_from")
CONFIG_CLASSES = (TrainConfig, TrainConfigPretrainLarge, TrainConfigSFT, TrainConfigDPO, TrainConfigDemo)


def describe_run(cfg, model_cfg, tokenizer, reference=None) -> dict:
    """What a resume takes over (every training setting, the config class), must match (model shape, tokenizer) or
    reports (settings given anew), and, for preference pairs, which reference log-probabilities (`reference`) the
    run trains against: the state's run.json."""
    return {"config": type(cfg).__name__, "model": dataclasses.asdict(model_cfg),
            "tokenizer": {"size": len(tokenizer), "sha256": tokenizer_fingerprint(cfg.tokenizer_dir)},
            "train": dataclasses.asdict(cfg), **({"reference_logps": reference.key} if reference else {})}


def newest_state(processes, output_dir: str) -> str:
    """The newest complete state as the main process sees it (a rank with a stale directory listing must not
    resume from another one)."""
    path = decided_by_main(processes, lambda: (complete_states(output_dir) or [None])[-1])
    if path is None:
        raise UserError(f"--is_keep_training=True: --output_dir={output_dir} holds no saved state to resume (is it "
                        "the run's directory?); to start a new run there, leave out --is_keep_training")
    return path


def read_run_description(state_dir: str) -> dict:
    with open(os.path.join(state_dir, "run.json"), encoding="utf-8") as saved_file:
        return json.load(saved_file)


def adopt_model_shape(model_cfg, shape: dict, given, source: str, failure: str):
    """`model_cfg` with the shape of `source` (a saved run, a saved model); a shape flag the user gave that
    differs from it is an error naming both values, after `failure`."""
    problems = [f"--{field.name}={getattr(model_cfg, field.name)!r} was given, but {source} has {shape[field.name]!r}"
                for field in dataclasses.fields(model_cfg)
                if field.name in given and field.name in shape and shape[field.name] != getattr(model_cfg, field.name)]
    if problems:
        raise UserErrors([f"{failure}: {problem}" for problem in problems])
    return dataclasses.replace(model_cfg, **{field.name: shape[field.name] for field in dataclasses.fields(model_cfg)
                                             if field.name in shape})


def settings_to_resume(cfg, model_cfg, given, processes) -> tuple:
    """--is_keep_training=True: every setting of the saved run, found before anything is built; a flag given on the
    command line changes that setting alone (logged by `check_resumable`).

    So `train --output_dir=D --is_keep_training=True` continues the run in D as it was started, and the guide's
    form (the whole command repeated) changes nothing. A model flag that differs from the saved shape, or another
    objective or chunking, is an error. The tokenizer comes from the saved run unless one is given (then it must be
    the same tokenizer).
    """
    state_dir = newest_state(processes, cfg.output_dir)
    saved = read_run_description(state_dir)
    model_cfg = adopt_model_shape(model_cfg, saved["model"], given, f"the saved run in {cfg.output_dir}",
                                  "cannot resume, the saved state is incompatible")
    cfg = adopt_training_settings(cfg, saved, given)
    if "tokenizer_dir" not in given and not has_tokenizer(cfg.tokenizer_dir):
        # (else a new tokenizer would be trained there, and refused)
        raise UserError(f"--is_keep_training=True: the saved run's tokenizer ({cfg.tokenizer_dir}) is gone; give "
                        f"--tokenizer_dir=<a copy of it>, e.g. {os.path.join(cfg.output_dir, 'final')}")
    # What the run learns goes on as saved, and for packed text how it is cut into chunks: another objective has
    # other samples (rows, chunks) at another position, and ranks its best models by another metric.
    saved_objective = saved["train"].get("objective", "seq2seq")
    bound = {"span_corruption": (CHUNK_SETTINGS, " (it cuts the documents into other chunks)"),
             "dpo": (REFERENCE_SETTINGS, " (the reference log-probabilities were computed with it)")}
    settings, why = bound.get(saved_objective, ((), ""))
    changed = [name for name in ("objective",) + settings
               if getattr(cfg, name) != saved["train"].get(name, getattr(cfg, name))]
    if changed:
        raise UserErrors([f"cannot resume, the saved state is incompatible: --{name}: the saved run has "
                          f"{saved['train'][name]!r}, this one {getattr(cfg, name)!r}"
                          + (why if name != "objective" else "") for name in changed])
    if "max_steps" not in given and 0 < cfg.max_steps <= saved_step(state_dir):
        raise UserError(f"--is_keep_training=True: the saved run stopped at its --max_steps={cfg.max_steps}; give "
                        "--max_steps=<a later step> to go on, or --max_steps=0 to train to the end of its epochs")
    return cfg, model_cfg


def adopt_training_settings(cfg, saved: dict, given):
    """The saved run's config (its class and values) with the flags given now on top. Not taken over: where the run
    is now (--output_dir, found there), whether it resumes, and --init_from (only a new run reads it; its model may
    be gone since)."""
    classes = {cls.__name__: cls for cls in CONFIG_CLASSES}
    cls = classes.get(saved.get("config"), type(cfg))
    values = dataclasses.asdict(cfg)
    values.update({name: value for name, value in saved["train"].items()
                   if name in values and name not in given and name not in NOT_TAKEN_OVER})
    return cls(**values)


def saved_step(state_dir: str) -> int:
    """The optimizer step a complete state was saved at (its marker holds it)."""
    with open(os.path.join(state_dir, COMPLETE_MARKER), encoding="utf-8") as marker:
        return int(marker.read())


def check_resumable(saved: dict, current: dict, output_dir: str) -> None:
    """An incompatible model or tokenizer is an error; changed training settings are reported and applied."""
    problems = [f"--{name}: the saved run has {saved['model'].get(name)!r}, this one {value!r}"
                for name, value in current["model"].items() if saved["model"].get(name) != value]
    if saved["tokenizer"] != current["tokenizer"]:
        problems.append(f"--tokenizer_dir: not the tokenizer the saved run used ({saved['tokenizer']}); the run "
                        f"keeps a copy with its models: --tokenizer_dir={os.path.join(output_dir, 'final')} (or a "
                        f"best/step-* directory there)")
    # Another optimizer has other state: the saved moments would not load (or would mean something else).
    # So has another set of trained tensors (--freeze).
    for name, default in (("optimizer", "adamw"), ("freeze", "none")):
        if saved["train"].get(name, default) != current["train"][name]:
            problems.append(f"--{name}: the saved run has {saved['train'].get(name, default)!r}, this one "
                            f"{current['train'][name]!r}")
    if problems:
        raise UserError("cannot resume, the saved state is incompatible: " + "; ".join(problems))
    for name, value in current["train"].items():
        # Only a new run reads --init_from: a resume takes the weights it trained since.
        if name not in ("is_keep_training", "init_from") and saved["train"].get(name) != value:
            log.warning("resume: --%s changed from %r to %r", name, saved["train"].get(name), value)


def start_fresh(run) -> None:
    """A new run: the schedule spans all its epochs, and no best model or metric line of an older run remains."""
    run.state.schedule_total_steps = run.feed.total_steps(run.state, run.cfg.epochs)
    run.state.epoch_samples = run.feed.num_samples
    run.best.restore(run.state)
    run.metrics.forget_after(0)


def resume(run) -> None:
    """Continue the run saved in `output_dir`, in this order:

    1. the newest complete state, as the main process sees it (`settings_to_resume` took its model shape and
       tokenizer before the model was built); its run.json must match this model and tokenizer;
    2. model, optimizer, every rank's random states and the TrainingState (data position, step, best-k, ...);
    3. the batch settings: flags that changed since the save win, else those out-of-memory recovery chose;
    4. another number of processes continues at the same global sample;
    5. the schedule, re-aimed if the run's length changed (more epochs, another global batch);
    6. best models missing on disk are forgotten, and the disk made to match the list;
    7. metric lines after the saved step are dropped: those steps run again.
    """
    cfg, state, accelerator = run.cfg, run.state, run.accelerator
    path = newest_state(accelerator, cfg.output_dir)
    saved = read_run_description(path)
    check_resumable(saved, run.checkpointer.run_description, cfg.output_dir)
    run.checkpointer.load(path)
    configured = (saved["train"]["batch_size_per_gpu"], saved["train"]["gradient_accumulation_steps"])
    requested = (cfg.batch_size_per_gpu, cfg.gradient_accumulation_steps)
    if configured != requested:
        state.batch_size_per_gpu, state.gradient_accumulation_steps = requested
    elif (state.batch_size_per_gpu, state.gradient_accumulation_steps) != configured:
        log.warning("resume: keeping batch_size_per_gpu=%d, gradient_accumulation_steps=%d set by out-of-memory "
                    "recovery", state.batch_size_per_gpu, state.gradient_accumulation_steps)
    accelerator.gradient_accumulation_steps = state.gradient_accumulation_steps
    if state.world_size != accelerator.num_processes:
        log.warning("resume: the saved run had %d processes, this one %d; continuing at the same global sample "
                    "(%d of epoch %d)", state.world_size, accelerator.num_processes, state.epoch_sample,
                    state.epoch)
        state.world_size = accelerator.num_processes
    if state.epoch_samples and state.epoch_samples != run.feed.num_samples:
        raise UserError(f"--train_file={cfg.train_file}: the saved run's epochs had {state.epoch_samples} "
                        f"{run.feed.sample_name}, these files give {run.feed.num_samples}; a resume needs the same "
                        "training data (to train on other data, start a new run with --init_from=<its final/>)")
    state.epoch_samples = run.feed.num_samples
    reaim(state, cfg.warmup_steps, run.feed.total_steps(state, cfg.epochs))
    run.best.restore(state)
    run.metrics.forget_after(state.global_step)
    log.info("resumed from %s: step %d, epoch %d, sample %d of the epoch", path, state.global_step, state.epoch,
             state.epoch_sample)
