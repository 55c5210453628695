"""The command line: every field is a flag of the right type, and every mistake is one clear line (exit 2)."""
import dataclasses
import typing

import pytest
from conftest import tiny_corpus_rows, write_parquet

import train_low_mem
import training.loop
from commands.cli import main
from commands.flags import field_docs, field_metadata
from commands.options import DemoFlags, EvaluateFlags, ExportFlags, GenerateFlags, PlanFlags, PlotFlags, TokenizerFlags
from config import (
    ConfigChoice,
    T5ModelConfig,
    T5ModelConfigDemo,
    TrainConfig,
    TrainConfigDemo,
    TrainConfigPretrainLarge,
    TrainConfigSFT,
)
from tests.cli_helpers import PATCHED_ENTRY, run_cli_raw
from tests.patched_cli import ECHO_FLAGS

CONTRACT_LARGE = dict(batch_size_per_gpu=32, gradient_accumulation_steps=2, max_seq_len=192,
                      dataloader_buffer_size=5000, epochs=3, save_steps=5000, logging_steps=100, learn_rate=1e-4,
                      warmup_steps=1024, keep_latest_n_ckp=5, mixed_precision="bf16",
                      train_file="data/pretrain_train_10m.parquet", validation_file="data/pretrain_valid_100k.parquet",
                      output_dir="model_save/pretrain_large")
CONTRACT_GENERAL = dict(batch_size_per_gpu=16, gradient_accumulation_steps=8, max_seq_len=256)
CONTRACT_MODEL = dict(d_model=768, d_ff=3072, num_heads=12, d_kv=64, num_layers=10, num_decoder_layers=10)
# The dataclasses whose fields are each command's flags.
COMMAND_FLAGS = {
    "train": [ConfigChoice, TrainConfig, T5ModelConfig],
    "train_tokenizer": [TokenizerFlags],
    "demo": [DemoFlags, TrainConfigDemo, T5ModelConfigDemo],
    "evaluate": [EvaluateFlags],
    "generate": [GenerateFlags],
    "plan": [ConfigChoice, PlanFlags, TrainConfig, T5ModelConfig],
    "plot": [PlotFlags],
    "export": [ExportFlags],
}
CONTRACT_SHARED_FIELDS = ("tokenizer_dir", "max_grad_norm", "seed", "ultra_low_mem", "num_workers", "pin_memory",
                          "memory_cleanup_steps", "memory_log_steps", "eval_max_samples", "log_dir", "max_steps")


def parse_train(argv: list[str]):
    """Run the real entry point (`main`, through Fire) for `train`, capturing the configs instead of training."""
    captured = {}

    def capture(cfg, model_cfg, given):
        captured.update(cfg=cfg, model_cfg=model_cfg)

    original = training.loop.run_training
    training.loop.run_training = capture
    try:
        main(train_low_mem.COMMANDS, ["train"] + argv)
    finally:
        training.loop.run_training = original
    return captured["cfg"], captured["model_cfg"]


def changed_value(value, annotation):
    """A value of the field's type that differs from its default."""
    if typing.get_origin(annotation) is typing.Literal:
        return next(choice for choice in typing.get_args(annotation) if choice != value)
    if typing.get_origin(annotation) is typing.Union:  # bool-or-auto and int-or-auto, "auto" by default
        return {bool: True, int: 3}[typing.get_args(annotation)[0]]
    return {bool: lambda v: not v, int: lambda v: v + 3, float: lambda v: v / 2 + 0.125,
            str: lambda v: v + "_x"}[annotation](value)


@pytest.mark.parametrize("config_class", [TrainConfig, TrainConfigPretrainLarge, TrainConfigSFT])
def test_every_field_round_trips_through_the_cli_with_its_type(config_class):
    expected, argv = {}, [f"--use_large_config={config_class is TrainConfigPretrainLarge}"]
    for cls in (config_class, T5ModelConfig):
        hints, default = typing.get_type_hints(cls), cls()
        for field in dataclasses.fields(cls):
            value = changed_value(getattr(default, field.name), hints[field.name])
            if field.name == "is_finetune":  # it chooses the config (TrainConfigSFT): keep the class's own
                value = config_class is TrainConfigSFT
            expected[field.name] = value
            argv.append(f"--{field.name}={value}")
    cfg, model_cfg = parse_train(argv)
    assert type(cfg) is config_class
    parsed = {**dataclasses.asdict(cfg), **dataclasses.asdict(model_cfg)}
    for name, value in expected.items():
        assert parsed[name] == value and type(parsed[name]) is type(value), name


@pytest.mark.parametrize("spelling,meaning", [("True", True), ("False", False), ("true", True), ("false", False),
                                              ("1", True), ("0", False)])
def test_booleans_accept_every_documented_spelling(spelling, meaning):
    cfg, _ = parse_train([f"--is_keep_training={spelling}", f"--use_large_config={spelling}"])
    assert cfg.is_keep_training is meaning
    assert type(cfg) is (TrainConfigPretrainLarge if meaning else TrainConfig)


def test_fine_tuning_chooses_the_original_projects_sft_values_unless_the_large_config_is_asked_for():
    cfg, _ = parse_train(["--is_finetune=True"])
    assert type(cfg) is TrainConfigSFT and cfg.is_finetune
    original = dict(epochs=20, batch_size_per_gpu=20, learn_rate=5e-5, gradient_accumulation_steps=6, max_seq_len=256)
    assert {name: getattr(cfg, name) for name in original} == original
    cfg, _ = parse_train(["--is_finetune=True", "--use_large_config=True"])
    assert type(cfg) is TrainConfigPretrainLarge and cfg.is_finetune
    assert type(parse_train(["--is_finetune=False"])[0]) is TrainConfig


def test_numbers_written_as_floats_or_exponents_become_integers_when_whole():
    cfg, _ = parse_train(["--save_steps=5.0", "--max_steps=1e3", "--learn_rate=2e-4", "--num_workers=auto"])
    assert (cfg.save_steps, cfg.max_steps, cfg.learn_rate, cfg.num_workers) == (5, 1000, 2e-4, "auto")


def test_both_configs_have_exactly_the_contract_defaults():
    large, general, model = TrainConfigPretrainLarge(), TrainConfig(), T5ModelConfig()
    assert {k: getattr(large, k) for k in CONTRACT_LARGE} == CONTRACT_LARGE
    assert {k: getattr(general, k) for k in CONTRACT_GENERAL} == CONTRACT_GENERAL
    assert {k: getattr(model, k) for k in CONTRACT_MODEL} == CONTRACT_MODEL
    assert (large.memory_cleanup_steps, large.memory_log_steps, large.max_steps) == (50, 200, 0)
    for name in CONTRACT_SHARED_FIELDS + ("dropout_rate",):
        assert hasattr(large, name) or hasattr(model, name), name


def test_every_field_has_help_text():
    for cls in {TrainConfigPretrainLarge, *(cls for classes in COMMAND_FLAGS.values() for cls in classes)}:
        docs = field_docs(cls)
        assert all(docs.get(f.name) for f in dataclasses.fields(cls)), cls.__name__


@pytest.mark.parametrize("variant,base", [(TrainConfigPretrainLarge, TrainConfig), (TrainConfigDemo, TrainConfig),
                                          (TrainConfigSFT, TrainConfig),
                                          (T5ModelConfigDemo, T5ModelConfig)])
def test_configs_with_other_defaults_keep_the_bounds_and_types_of_their_base(variant, base):
    bounds = {f.name: field_metadata(base, f.name) for f in dataclasses.fields(base)}
    assert {f.name: field_metadata(variant, f.name) for f in dataclasses.fields(variant)} == bounds
    assert typing.get_type_hints(variant) == typing.get_type_hints(base)
    # The variant only changes defaults: bounds are declared once, on the base.
    base_defaults = base()
    for field in dataclasses.fields(variant):
        if getattr(variant(), field.name) != getattr(base_defaults, field.name):
            assert not field.metadata, f"{variant.__name__}.{field.name} declares its bounds again"


@pytest.mark.parametrize("flag,fragments", [
    ("--lern_rate=0.1", ["unknown flag --lern_rate", "did you mean --learn_rate?"]),
    ("--batch_size_per_gpu=-1", ["--batch_size_per_gpu", "minimum 1"]),
    ("--save_steps=0", ["--save_steps", "minimum 1"]),
    ("--max_seq_len=4", ["--max_seq_len", "minimum 8"]),
    ("--mixed_precision=fp8", ["--mixed_precision", "bf16"]),
    ("--epochs=two", ["--epochs", "not an integer"]),
    ("--is_keep_training=maybe", ["--is_keep_training", "boolean"]),
    ("--learn_rate=1,2", ["--learn_rate", "not a number"]),
    ("--learn_rate=nan", ["--learn_rate", "not a finite number"]),
    ("--num_workers=-1", ["--num_workers", "minimum 0"]),
    ("--seed=4294967296", ["--seed", "maximum 4294967295"]),
])
def test_bad_flags_exit_2_with_one_line_naming_the_flag(flag, fragments):
    result = run_cli_raw(["train", flag])
    assert result.returncode == 2
    assert result.stderr.startswith("error: ")
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in result.stderr


def test_every_bad_flag_is_reported_at_once():
    result = run_cli_raw(["train", "--lern_rate=1", "--epochs=-2", "--pin_memory=perhaps"])
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 3 and all(line.startswith("error: ") for line in lines)


def test_help_lists_every_field_with_its_comment():
    result = run_cli_raw(["train", "--help"])
    assert result.returncode == 0
    for field in dataclasses.fields(TrainConfig) + dataclasses.fields(T5ModelConfig):
        assert f"--{field.name}=" in result.stdout
    assert field_docs(TrainConfig)["save_steps"] in result.stdout



@pytest.mark.parametrize("name", COMMAND_FLAGS)
def test_every_commands_help_lists_each_of_its_flags_with_its_help(name):
    result = run_cli_raw([name, "--help"])
    assert result.returncode == 0
    for cls in COMMAND_FLAGS[name]:
        docs = field_docs(cls)
        for field in dataclasses.fields(cls):
            assert f"--{field.name}" in result.stdout and docs[field.name] in result.stdout, field.name


@pytest.mark.parametrize("argv,hint", [
    (["plan", "--num_process=3"], "--num_process (did you mean --num_processes?)"),
    (["plan", "--num_sample=5"], "--num_sample (did you mean --num_samples?)"),
    (["demo", "--train_row=5"], "--train_row (did you mean --train_rows?)"),
    (["train", "--use_large_confg=True"], "--use_large_confg (did you mean --use_large_config?)"),
    (["evaluate", "--model_dir=m", "--file=f", "--max_sample=5"], "--max_sample (did you mean --max_samples?)"),
    (["generate", "--model_dir=m", "--prompt=p", "--max_new_token=5"],
     "--max_new_token (did you mean --max_new_tokens?)"),
    (["plot", "--outptu_dir=x"], "--outptu_dir (did you mean --output_dir?)"),
])
def test_a_mistyped_flag_is_matched_against_every_flag_of_its_command(argv, hint):
    result = run_cli_raw(argv)
    assert result.returncode == 2
    assert result.stderr == f"error: unknown flag {hint}\n"


def test_a_mistyped_flag_stops_train_tokenizer_before_it_trains(tmp_path):
    corpus = write_parquet(tmp_path / "corpus.parquet", *tiny_corpus_rows(50))
    result = run_cli_raw(["train_tokenizer", f"--train_file={corpus}", f"--tokenizer_dir={tmp_path / 'tokenizer'}",
                          "--vocab=500"])
    assert result.returncode == 2
    assert result.stderr == "error: unknown flag --vocab (did you mean --vocab_size?)\n"
    assert not (tmp_path / "tokenizer").exists()


@pytest.mark.parametrize("argv,problems", [
    (["evaluate"], ["--model_dir is required", "--file is required"]),
    (["generate", "--model_dir=m"], ["--prompt is required"]),
    (["generate", "--model_dir=m", "--prompt=how", "are"], ["unexpected argument 'are'"]),
    (["trian"], ["unknown command 'trian' (did you mean train?)"]),
    ([], ["no command; the commands are train, train_tokenizer, demo, evaluate, generate, plan, plot"]),
])
def test_missing_flags_stray_words_and_unknown_commands_are_one_line_each(argv, problems):
    result = run_cli_raw(argv)
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == len(problems) and not result.stdout
    for line, problem in zip(lines, problems):
        assert line.startswith(f"error: {problem}")


def test_a_flag_given_twice_is_an_error_not_the_last_value(tmp_path):
    result = run_cli_raw(["plan", f"--output_dir={tmp_path}/a", "--num_samples=100", "--output-dir",
                          f"{tmp_path}/b", "--seed=1", "--seed=1"])
    assert result.returncode == 2 and not result.stdout
    assert result.stderr.splitlines() == ["error: --output_dir is given 2 times: give it once",
                                          "error: --seed is given 2 times: give it once"]


@pytest.mark.parametrize("typed", ["run, 1e5", "0x10", "True", "1_000"])
def test_text_flags_arrive_exactly_as_typed(tmp_path, typed):
    # Fire alone would make `run, 1e5` a tuple, `0x10` the number 16 and `True` a boolean.
    path = f"{tmp_path}/{typed}"
    result = run_cli_raw(["plot", f"--output_dir={path}"])
    assert result.returncode == 2 and result.stderr.startswith(f"error: --output_dir={path}: no metrics.jsonl")
    # `generate` receives the prompt as typed (patched to print its flags instead of loading a model).
    prompt = run_cli_raw(["generate", f"--model_dir={tmp_path}", f"--prompt={typed}"], entry=PATCHED_ENTRY,
                         env={ECHO_FLAGS: 1})
    assert prompt.returncode == 0, prompt.stderr
    assert f"prompt={typed!r}" in prompt.stdout


def test_help_without_a_command_lists_every_command():
    result = run_cli_raw(["--help"])
    assert result.returncode == 0
    assert all(f"  {name} " in result.stdout for name in COMMAND_FLAGS)


def test_help_cut_short_by_its_reader_ends_quietly():
    import subprocess
    import sys

    from tests.cli_helpers import ENTRY, REPO, child_env

    process = subprocess.Popen([sys.executable, ENTRY, "train", "--help"], cwd=REPO, env=child_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # like `| head` once it has read its lines: nobody reads what the command still writes
    stderr = process.communicate(timeout=60)[1].decode()
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr and process.returncode == 141


@pytest.mark.parametrize("columns,problem", [
    ({"question": ["问"], "answer": ["答"]}, "missing column 'prompt'"),
    ({"prompt": [1, 2], "response": ["答", "答"]}, "column 'prompt' must hold strings"),
])
def test_evaluate_checks_its_file_as_train_does(tmp_path, columns, problem):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "valid.parquet"
    pq.write_table(pa.table(columns), path)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    result = run_cli_raw(["evaluate", f"--model_dir={tmp_path / 'model'}", f"--file={path}"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr == f"error: --file: {path}: {problem}" + (
        " (columns: question, answer)" + RAW_TEXT_HINT + "\n" if "missing" in problem else ", found int64\n")


RAW_TEXT_HINT = ("; evaluate scores prompt/response files (BLEU-4 and loss); a span-corruption model's denoising "
                 "loss on raw text is in its run's eval lines (metrics.jsonl)")


def test_evaluate_on_a_file_of_raw_documents_says_what_it_scores(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "wiki.parquet"
    pq.write_table(pa.table({"text": ["一篇文章"]}), path)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    result = run_cli_raw(["evaluate", f"--model_dir={tmp_path / 'model'}", f"--file={path}"])
    assert result.returncode == 2 and result.stderr == (
        f"error: --file: {path}: missing column 'prompt' (columns: text){RAW_TEXT_HINT}\n")


def test_a_runs_directory_given_as_a_model_names_its_final_model(tmp_path):
    (tmp_path / "run" / "final").mkdir(parents=True)
    (tmp_path / "run" / "final" / "config.json").write_text("{}")
    result = run_cli_raw(["generate", f"--model_dir={tmp_path / 'run'}", "--prompt=你好"])
    assert result.returncode == 2 and result.stderr == (
        f"error: --model_dir={tmp_path / 'run'}: a run's directory, not a model: give --model_dir="
        f"{tmp_path / 'run' / 'final'} (or one of its best models, {tmp_path / 'run' / 'best' / 'step-*'})\n")


def test_evaluate_reports_a_bad_model_and_a_bad_file_at_once(tmp_path):
    result = run_cli_raw(["evaluate", f"--model_dir={tmp_path / 'nothing'}", f"--file={tmp_path / 'none.parquet'}"])
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 2
    assert lines[0].startswith("error: --model_dir=") and lines[1].startswith("error: --file: ")
