"""The training engine, through the real CLI on CPU: it learns, and its flags do exactly what they say."""
import json
import math
import os

import pytest

from tests.cli_helpers import (
    PATCHED_ENTRY,
    assert_same_weights,
    assert_two_ranks_equal_one_with_double_accumulation,
    final_weights,
    read_metrics,
    run_cli,
    tiny_run_flags,
)
from tests.patched_cli import SLOW_EVALUATION
from training.schedule import lr_factor

pytestmark = pytest.mark.slow


def test_loss_falls_on_a_learnable_task_within_a_few_dozen_steps(tmp_path, task):
    data, tokenizer_dir = task
    flags = tiny_run_flags(tmp_path, tokenizer_dir, data, max_steps=64, learn_rate=3e-4, save_steps=64)
    run_cli("train", flags)
    losses = [r["loss"] for r in read_metrics(flags["output_dir"], "train")]
    assert len(losses) == 64
    assert sum(losses[-8:]) / 8 < 0.75 * sum(losses[:4]) / 4


def test_logged_learning_rate_follows_warmup_then_cosine_to_a_tenth(tmp_path, task):
    data, tokenizer_dir = task
    flags = tiny_run_flags(tmp_path, tokenizer_dir, data, warmup_steps=5, epochs=2, learn_rate=2e-3,
                           eval_max_samples=0, keep_latest_n_ckp=0, save_steps=100)
    run_cli("train", flags)
    records = read_metrics(flags["output_dir"], "train")
    total_steps = 2 * math.ceil(256 / 8)
    assert [r["step"] for r in records] == list(range(1, total_steps + 1))
    for record in records:
        # `lr` is the rate the logged step used: the schedule at the number of steps done before it.
        expected = 2e-3 * lr_factor(record["step"] - 1, 5, total_steps)
        assert record["lr"] == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert records[-1]["lr"] == pytest.approx(2e-4, rel=1e-9)  # the last step runs at 0.1 x learn_rate


def test_accumulation_equals_a_batch_twice_as_large(tmp_path, task):
    data, tokenizer_dir = task
    common = dict(max_steps=12, dropout_rate=0.0, eval_max_samples=0, keep_latest_n_ckp=0, save_steps=100)
    accumulated = tiny_run_flags(tmp_path / "a", tokenizer_dir, data, batch_size_per_gpu=4,
                                 gradient_accumulation_steps=2, **common)
    large = tiny_run_flags(tmp_path / "b", tokenizer_dir, data, batch_size_per_gpu=8,
                           gradient_accumulation_steps=1, **common)
    run_cli("train", accumulated)
    run_cli("train", large)
    losses_a = [r["loss"] for r in read_metrics(accumulated["output_dir"], "train")]
    losses_b = [r["loss"] for r in read_metrics(large["output_dir"], "train")]
    assert losses_a == pytest.approx(losses_b, rel=1e-5)
    assert_same_weights(final_weights(accumulated["output_dir"]), final_weights(large["output_dir"]), rtol=1e-5,
                        atol=1e-7)


def test_two_processes_equal_one_process_with_double_accumulation(tmp_path, task):
    data, tokenizer_dir = task
    result = assert_two_ranks_equal_one_with_double_accumulation(
        lambda name, **overrides: tiny_run_flags(tmp_path / name, tokenizer_dir, data, **overrides), steps=10)
    # Only the main process logs: one line per logging step, not one per rank.
    assert result.stdout.count("step 10/") == 1


def test_metrics_and_log_file_follow_the_contract(tmp_path, task):
    data, tokenizer_dir = task
    flags = tiny_run_flags(tmp_path, tokenizer_dir, data, max_steps=20, logging_steps=5, save_steps=10,
                           memory_log_steps=10)
    run_cli("train", flags, nproc=2)
    records = read_metrics(flags["output_dir"])
    train = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in train] == [5, 10, 15, 20]
    for record in train:
        assert {"step", "epoch", "samples", "loss", "lr", "grad_norm", "tokens_per_s"} <= record.keys()
        assert record["samples"] == record["step"] * 16  # 8 rows x 2 ranks per step, counted globally
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [10, 16, 20]  # every save_steps, and at the end of epoch 0 (step 16)
    assert all({"step", "epoch", "bleu4", "eval_loss", "samples"} <= r.keys() for r in evals)
    memory = [r for r in records if r["event"] == "memory"]
    assert [r["step"] for r in memory] == [10, 20] and all(r["rss_mb"] > 0 for r in memory)
    logs = os.listdir(flags["log_dir"])
    assert len(logs) == 1 and logs[0].startswith("chat_trainer_low_mem_") and logs[0].endswith(".log")
    with open(os.path.join(flags["log_dir"], logs[0]), encoding="utf-8") as log_file:
        text = log_file.read()
    assert text.count("step 20/") == 1 and "[rank 1]" not in text
    with open(os.path.join(flags["output_dir"], "train_config.json"), encoding="utf-8") as saved:
        assert json.load(saved)["changed"]["max_steps"] == 20


def test_report_to_tensorboard_writes_event_files_through_accelerate(tmp_path, task):
    data, tokenizer_dir = task
    flags = tiny_run_flags(tmp_path, tokenizer_dir, data, max_steps=4, logging_steps=2, save_steps=4,
                           report_to="tensorboard")
    run_cli("train", flags)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(flags["output_dir"], "t5_pretrain"))  # the project name Accelerate uses
    events.Reload()
    # The same numbers as metrics.jsonl, at the same steps.
    logged = events.Scalars("train/loss")
    expected = read_metrics(flags["output_dir"], "train")
    assert [event.step for event in logged] == [r["step"] for r in expected] == [2, 4]
    assert [event.value for event in logged] == pytest.approx([r["loss"] for r in expected], rel=1e-6)
    assert [event.step for event in events.Scalars("eval/bleu4")] == [4]
    unknown = run_cli("train", dict(flags, report_to="tensorbored", output_dir=str(tmp_path / "other")), check=False)
    assert unknown.returncode == 2 and "unknown tracker 'tensorbored'" in unknown.stderr


def progress_lines(output: str) -> list[str]:
    return [line.split(" INFO ")[1] for line in output.splitlines() if " INFO step " in line]


def test_piped_output_shows_the_first_step_and_the_last_lines_rate_leaves_evaluations_out(tmp_path, task):
    data, tokenizer_dir = task
    # 32 steps of 8 rows, logged only at the end (logging_steps beyond the run), 4 evaluations of 2 s each.
    flags = tiny_run_flags(tmp_path, tokenizer_dir, data, epochs=1, logging_steps=1000, save_steps=8,
                           eval_max_samples=4, keep_latest_n_ckp=0)
    result = run_cli("train", flags, entry=PATCHED_ENTRY, env={SLOW_EVALUATION: 2})
    lines = progress_lines(result.stdout)
    # No bar in a pipe: a line after the first step says the run is alive, the closing line gives the last step.
    assert [line.split(" epoch")[0] for line in lines] == ["step 1/32", "step 32/32"]
    assert read_metrics(flags["output_dir"], "train") == []  # the console's lines, not metrics.jsonl's cadence
    samples_per_s = float(lines[-1].split(" samples/s")[0].rsplit("| ", 1)[1])
    # With the 8 s of evaluation counted, 256 samples could not exceed 32 samples/s.
    assert samples_per_s > 2 * 256 / 8
