"""A new run from a trained model (--init_from, --is_finetune): which model, with which tokenizer and shape, and
what of it trains (--freeze). Decided from small files before anything is built, identically on every rank.

Unlike --is_keep_training, which continues a run (same step, optimizer and schedule), a run started from a model
begins at step 0 with a fresh optimizer and schedule in its own --output_dir, and never writes to the model's
directory. Its weights load into the architecture this tool builds, so it saves and resumes like any other run.
"""
import dataclasses
import json
import os

from config import TrainConfigPretrainLarge, TrainConfigSFT, resolve_path
from model.tokenizer import has_tokenizer, load_tokenizer, tokenize_alike
from training.resume import adopt_model_shape, settings_to_resume
from utils.distributed import decided_by_main
from utils.errors import UserError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def resolved_freeze(cfg) -> str:
    """--freeze=auto: what the original froze when fine-tuning (the shared embedding and the encoder), else nothing."""
    if cfg.freeze != "auto":
        return cfg.freeze
    return "encoder" if cfg.is_finetune else "none"


def starting_settings(cfg, model_cfg, given, processes) -> tuple:
    """The settings that depend on where the run starts: a saved state (--is_keep_training), a model (--init_from,
    by default the pre-training's best model when fine-tuning) or nothing."""
    if cfg.is_keep_training:
        if cfg.init_from:
            raise UserError(f"--init_from={cfg.init_from} starts a new run, --is_keep_training=True continues the "
                            f"one in --output_dir={cfg.output_dir}: give one of them")
        return settings_to_resume(dataclasses.replace(cfg, freeze=resolved_freeze(cfg)), model_cfg, given, processes)
    cfg = dataclasses.replace(cfg, freeze=resolved_freeze(cfg))
    # Where a run that tunes a trained model starts by default: the best model of the stage before it.
    source = (("--objective=dpo", "fine-tuning", TrainConfigSFT) if cfg.objective == "dpo" else
              ("--is_finetune=True", "pre-training", TrainConfigPretrainLarge) if cfg.is_finetune else None)
    if source and not cfg.init_from:
        flag, stage, config_class = source
        # One choice for every rank: a run still training may rewrite its list between two ranks' reads.
        best = decided_by_main(processes, lambda: best_model_of(resolve_path(config_class().output_dir)))
        if best is None:
            raise UserError(f"{flag} starts from --init_from, by default the best model of the {stage} run in "
                            f"{config_class().output_dir}, which lists none (no checkpoints.json there): give "
                            "--init_from=<a final/ or best/step-* directory>")
        cfg = dataclasses.replace(cfg, init_from=best)
    cfg, model_cfg = settings_from_model(cfg, model_cfg, given) if cfg.init_from else (cfg, model_cfg)
    if cfg.objective == "dpo" and "dropout_rate" not in given:
        # Without dropout the policy's log-probabilities start equal to the reference's (computed in eval mode), as
        # TRL's DPO (disable_dropout) does: a random mask would read as a reward from the first step.
        model_cfg = dataclasses.replace(model_cfg, dropout_rate=0.0)
    return cfg, model_cfg


def best_model_of(run_dir: str) -> str | None:
    """The best model a run lists (its checkpoints.json, best first), or None."""
    try:
        with open(os.path.join(run_dir, "checkpoints.json"), encoding="utf-8") as listing:
            best = json.load(listing)["best"]
    except (OSError, ValueError, KeyError):
        return None
    return os.path.join(run_dir, best[0]["path"]) if best else None


def read_t5_config(model_dir: str) -> dict:
    """The model's config.json, if it describes a T5 this tool can build (relu feed-forward, tied embeddings)."""
    if not os.path.isdir(model_dir):
        raise UserError(f"--init_from={model_dir}: no such directory")
    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as config_file:
            config = json.load(config_file)
    except (OSError, ValueError):
        raise UserError(f"--init_from={model_dir}: not a T5 model directory (no readable config.json; expected a "
                        "final/ or best/step-* directory)") from None
    if config.get("model_type") != "t5" or not config.get("is_encoder_decoder", True):
        raise UserError(f"--init_from={model_dir}: not a T5 model directory (its config.json describes a "
                        f"{config.get('model_type')!r} model)")
    layout = {"feed_forward_proj": (config.get("feed_forward_proj", "relu"), "relu"),
              "tie_word_embeddings": (config.get("tie_word_embeddings", True), True)}
    for name, (found, built) in layout.items():
        if found != built:
            raise UserError(f"--init_from={model_dir}: its T5 has {name}={found!r}; this tool builds T5s with "
                            f"{name}={built!r} (the t5-small/base layout), so its weights cannot load")
    if not any(os.path.isfile(os.path.join(model_dir, name)) for name in WEIGHT_FILES):
        raise UserError(f"--init_from={model_dir}: no weights there (none of {', '.join(WEIGHT_FILES)})")
    return config


def model_tokenizer_dir(cfg, model_dir: str, given) -> str:
    """The model's own tokenizer; a --tokenizer_dir given besides must be the same tokenizer."""
    if not has_tokenizer(model_dir):
        if "tokenizer_dir" in given:
            return cfg.tokenizer_dir
        raise UserError(f"--init_from={model_dir}: holds no tokenizer.json; give --tokenizer_dir=<the tokenizer the "
                        "model was trained with>")
    if "tokenizer_dir" in given and (not has_tokenizer(cfg.tokenizer_dir)
                                     or not tokenize_alike(cfg.tokenizer_dir, model_dir)):
        raise UserError(f"--tokenizer_dir={cfg.tokenizer_dir} is not the tokenizer of --init_from={model_dir}: "
                        "leave --tokenizer_dir out, the model's own is used")
    return model_dir


def settings_from_model(cfg, model_cfg, given) -> tuple:
    """The model's shape and tokenizer. A shape flag that differs is an error; --dropout_rate is not part of the
    shape and may change."""
    config = read_t5_config(cfg.init_from)
    source, output_dir = os.path.realpath(cfg.init_from), os.path.realpath(cfg.output_dir)
    if os.path.commonpath([source, output_dir]) in (source, output_dir):
        raise UserError(f"--init_from={cfg.init_from} and --output_dir={cfg.output_dir} overlap: the new run would "
                        "write over the model it starts from; choose another --output_dir")
    cfg = dataclasses.replace(cfg, tokenizer_dir=model_tokenizer_dir(cfg, cfg.init_from, given))
    tokenizer = load_tokenizer(cfg.tokenizer_dir)
    ids = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
           "eos_token_id": tokenizer.eos_token_id, "decoder_start_token_id": tokenizer.pad_token_id}
    for name, expected in ids.items():
        if config.get(name) != expected:
            raise UserError(f"--init_from={cfg.init_from}: its config.json has {name}={config.get(name)!r}, its "
                            f"tokenizer ({cfg.tokenizer_dir}) needs {expected!r}")
    shape = {field.name: config[field.name] for field in dataclasses.fields(model_cfg)
             if field.name in config and not (field.name == "dropout_rate" and field.name in given)}
    model_cfg = adopt_model_shape(model_cfg, shape, given, f"--init_from={cfg.init_from}",
                                  "cannot start from the model, its shape differs")
    return cfg, model_cfg
