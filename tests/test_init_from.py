"""A new run from a trained model (--init_from), fine-tuning (--is_finetune, --freeze), through the real CLI on CPU."""
import hashlib
import json
import os
from pathlib import Path

import pytest

from config import TrainConfigPretrainLarge, resolve_path
from tests.cli_helpers import (
    assert_same_weights,
    final_weights,
    read_metrics,
    run_cli,
    tiny_run_flags,
    trained_tiny_run,
)

pytestmark = pytest.mark.slow

SOURCE_RUN = dict(epochs=1, batch_size_per_gpu=8, save_steps=100, dropout_rate=0.1)


@pytest.fixture(scope="module")
def source(tmp_path_factory, task):
    """A trained tiny model: its run's flags (the last evaluation scored the model that final/ holds)."""
    return trained_tiny_run(tmp_path_factory.mktemp("source"), task, **SOURCE_RUN)


def source_model(source) -> str:
    return os.path.join(source["output_dir"], "final")


def new_run_flags(tmp_path, source, **overrides) -> dict:
    """A run started from the source model: no tokenizer or shape flags, they come with the model."""
    data = {name: source[name] for name in ("train_file", "validation_file")}
    flags = dict(tiny_run_flags(tmp_path, "unused", data, init_from=source_model(source)), **overrides)
    for name in ("tokenizer_dir", "d_model", "d_ff", "num_heads", "d_kv", "num_layers", "num_decoder_layers"):
        if name not in overrides:
            flags.pop(name)
    return flags


def directory_digest(directory: str) -> dict:
    return {str(path.relative_to(directory)): (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
            for path in Path(directory).rglob("*") if path.is_file()}


def test_a_run_from_a_trained_model_starts_at_step_0_scoring_what_the_model_scored(tmp_path, source):
    before = directory_digest(source["output_dir"])
    flags = new_run_flags(tmp_path, source, max_steps=3)
    result = run_cli("train", flags)
    first_eval = read_metrics(flags["output_dir"], "eval")[0]
    source_eval = read_metrics(source["output_dir"], "eval")[-1]
    assert first_eval["step"] == 0
    assert first_eval["eval_loss"] == pytest.approx(source_eval["eval_loss"], abs=1e-5)
    assert first_eval["bleu4"] == pytest.approx(source_eval["bleu4"], abs=1e-9)
    assert [r["step"] for r in read_metrics(flags["output_dir"], "train")] == [1, 2, 3]
    assert "a new run: step 0, fresh optimizer and schedule" in result.stdout
    with open(os.path.join(flags["output_dir"], "train_config.json")) as saved:
        recorded = json.load(saved)
    assert recorded["train"]["tokenizer_dir"] == source_model(source)  # the model's own tokenizer
    assert recorded["model"]["d_model"] == source["d_model"] and recorded["model"]["dropout_rate"] == 0.1
    assert directory_digest(source["output_dir"]) == before  # the source run is untouched


def test_dropout_may_change_when_starting_from_a_model_since_it_is_not_part_of_its_shape(tmp_path, source):
    flags = new_run_flags(tmp_path, source, max_steps=1, dropout_rate=0.0)
    run_cli("train", flags)
    with open(os.path.join(flags["output_dir"], "train_config.json")) as saved:
        assert json.load(saved)["model"]["dropout_rate"] == 0.0


def not_a_t5_directory(tmp_path) -> str:
    directory = tmp_path / "gpt2"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    return str(directory)


def no_config_directory(tmp_path) -> str:
    (tmp_path / "empty").mkdir()
    return str(tmp_path / "empty")


@pytest.mark.parametrize("case,fragment", [
    ("missing", "no such directory"),
    ("no_config", "not a T5 model directory (no readable config.json"),
    ("gpt2", "not a T5 model directory (its config.json describes a 'gpt2' model)"),
    ("other_tokenizer", "is not the tokenizer of --init_from="),
    ("other_shape", "cannot start from the model, its shape differs: --d_model=64 was given, but --init_from="),
    ("keep_training", "starts a new run, --is_keep_training=True continues the one in --output_dir="),
    ("inside_output_dir", "overlap: the new run would write over the model it starts from"),
    ("output_dir_inside", "overlap: the new run would write over the model it starts from"),
])
def test_a_bad_start_from_a_model_is_one_error_line_and_trains_nothing(tmp_path, source, tiny_tokenizer_dir, case,
                                                                        fragment):
    flags = new_run_flags(tmp_path, source)
    if case == "missing":
        flags["init_from"] = str(tmp_path / "nowhere")
    elif case == "no_config":
        flags["init_from"] = no_config_directory(tmp_path)
    elif case == "gpt2":
        flags["init_from"] = not_a_t5_directory(tmp_path)
    elif case == "other_tokenizer":
        flags["tokenizer_dir"] = str(tiny_tokenizer_dir)
    elif case == "other_shape":
        flags["d_model"] = 64
    elif case == "keep_training":
        flags["is_keep_training"] = True
    elif case == "inside_output_dir":
        flags["output_dir"] = source["output_dir"]
    elif case == "output_dir_inside":
        flags["output_dir"] = os.path.join(source_model(source), "fine-tuned")
    result = run_cli("train", flags, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    if case != "inside_output_dir":
        assert not os.path.exists(flags["output_dir"])


def test_the_tokenizer_the_model_was_trained_with_may_be_named_too(tmp_path, source):
    # The model's copy records its run's truncation length, the original does not: the same tokenizer all the same.
    flags = new_run_flags(tmp_path, source, max_steps=1, tokenizer_dir=source["tokenizer_dir"])
    run_cli("train", flags)
    with open(os.path.join(flags["output_dir"], "train_config.json")) as saved:
        assert json.load(saved)["train"]["tokenizer_dir"] == source_model(source)


def test_fine_tuning_starts_by_default_from_the_best_model_a_run_lists(tmp_path):
    from training.init_from import best_model_of

    assert best_model_of(str(tmp_path)) is None  # no checkpoints.json
    (tmp_path / "checkpoints.json").write_text(json.dumps({"best": []}))
    assert best_model_of(str(tmp_path)) is None
    (tmp_path / "checkpoints.json").write_text(json.dumps({"best": [{"path": "best/step-00000040", "bleu4": 0.5},
                                                                    {"path": "best/step-00000020", "bleu4": 0.4}]}))
    assert best_model_of(str(tmp_path)) == str(tmp_path / "best" / "step-00000040")


def test_fine_tuning_without_init_from_names_the_missing_pre_trained_model(tmp_path, source):
    if os.path.exists(resolve_path(TrainConfigPretrainLarge().output_dir)):
        pytest.skip("this checkout holds a pre-training run in model_save/pretrain_large")
    flags = new_run_flags(tmp_path, source, is_finetune=True)
    flags.pop("init_from")
    result = run_cli("train", flags, check=False)
    assert result.returncode == 2
    assert "error: --is_finetune=True starts from --init_from, by default the best model of the pre-training run" \
           in result.stderr


def trained_tensors(before: dict, after: dict) -> set:
    return {name for name in before if not before[name].equal(after[name])}


# (The tied output projection and input embeddings are the shared embedding: saved once, as shared.weight.)
@pytest.mark.parametrize("freeze,frozen_prefixes", [
    ("auto", ("shared.", "encoder.")),  # fine-tuning's default: what the original froze
    ("embeddings", ("shared.",)),
])
def test_fine_tuning_leaves_the_frozen_tensors_bitwise_unchanged_and_trains_the_rest(tmp_path, source, freeze,
                                                                                      frozen_prefixes):
    flags = new_run_flags(tmp_path, source, is_finetune=True, freeze=freeze, epochs=1)
    result = run_cli("train", flags)
    before, after = final_weights(source["output_dir"]), final_weights(flags["output_dir"])
    trained = trained_tensors(before, after)
    frozen = {name for name in before if name.startswith(frozen_prefixes)}
    assert frozen and not (trained & frozen)
    assert trained == set(before) - frozen  # every other tensor moved
    assert "train (--freeze=" in result.stdout


def test_a_fine_tuning_run_stopped_and_resumed_ends_bitwise_equal_to_an_uninterrupted_one(tmp_path, source):
    uninterrupted = new_run_flags(tmp_path / "whole", source, is_finetune=True)
    run_cli("train", uninterrupted)
    flags = new_run_flags(tmp_path / "resumed", source, is_finetune=True)
    run_cli("train", dict(flags, max_steps=13))
    resume_flags = dict(flags, is_keep_training=True, max_steps=0)
    resume_flags.pop("init_from")
    second = run_cli("train", resume_flags)
    assert "resumed from" in second.stdout and "step 13" in second.stdout
    assert_same_weights(final_weights(flags["output_dir"]), final_weights(uninterrupted["output_dir"]))
    def losses(run: dict) -> list:
        return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in read_metrics(run["output_dir"], "train")]

    assert losses(flags) == losses(uninterrupted)


def test_a_fine_tuning_run_cannot_resume_with_another_freeze(tmp_path, source):
    flags = new_run_flags(tmp_path, source, is_finetune=True, max_steps=10)
    run_cli("train", flags)
    flags = dict(flags, is_keep_training=True, freeze="none")
    flags.pop("init_from")
    result = run_cli("train", flags, check=False)
    assert result.returncode == 2
    assert "--freeze: the saved run has 'encoder', this one 'none'" in result.stderr


def test_plan_counts_the_gradients_optimizer_state_and_activations_of_the_trained_parameters_only(tmp_path, source):
    def plan(freeze: str) -> dict:
        flags = new_run_flags(tmp_path, source, is_finetune=True, freeze=freeze, json=True)
        return json.loads(run_cli("plan", flags).stdout)

    frozen, whole = plan("encoder"), plan("none")
    assert frozen["parameters"] == whole["parameters"] == whole["trainable_parameters"]
    assert frozen["trainable_parameters"] < whole["parameters"]
    parts, whole_parts = frozen["gpu_memory_breakdown_bytes"], whole["gpu_memory_breakdown_bytes"]
    assert parts["gradients"] == 4 * frozen["trainable_parameters"] < whole_parts["gradients"]
    assert parts["optimizer_state"] < whole_parts["optimizer_state"]
    assert parts["weights"] == whole_parts["weights"]
    # A frozen encoder keeps nothing for a backward pass (measured by the probe on the frozen model).
    assert frozen["activation_method"] == whole["activation_method"] == "probe"
    assert frozen["activation_bytes"] < whole["activation_bytes"]
