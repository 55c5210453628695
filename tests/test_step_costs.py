"""What a training step costs the devices, through the real CLI: one agreement between the ranks per optimizer step
however many micro-batches it has, and `--compile=True` training the same model as eager and resuming exactly."""
import re

import pytest

from tests.cli_helpers import PATCHED_ENTRY, final_weights, read_metrics, run_cli, tiny_run_flags

pytestmark = pytest.mark.slow


def test_each_optimizer_step_makes_one_agreement_between_the_ranks_however_many_micro_batches(tmp_path, task):
    data, tokenizer_dir = task
    flags = tiny_run_flags(tmp_path, tokenizer_dir, data, batch_size_per_gpu=4, gradient_accumulation_steps=3,
                           epochs=1, max_steps=6, save_steps=1000, memory_log_steps=0)
    result = run_cli("train", flags, nproc=2, entry=PATCHED_ENTRY, env={"T5LM_TEST_COUNT_COLLECTIVES": "1"})
    counts = [int(n) for n in re.findall(r"collectives in step: (\d+)", result.stderr)]
    assert len(counts) == 2 * 6  # every step on both ranks
    assert set(counts) == {1}


@pytest.mark.parametrize("nproc", [1, 2])
def test_each_optimizer_step_reads_one_value_back_from_the_device_log_lines_included(tmp_path, task, nproc):
    """The step's totals and its gradient norm come back in one transfer, after clipping; the loop's log lines,
    guards and schedule use those host values (every step logs here)."""
    data, tokenizer_dir = task
    flags = tiny_run_flags(tmp_path, tokenizer_dir, data, batch_size_per_gpu=4, gradient_accumulation_steps=3,
                           epochs=1, max_steps=6, save_steps=1000, logging_steps=1, memory_log_steps=0)
    result = run_cli("train", flags, nproc=nproc, entry=PATCHED_ENTRY, env={"T5LM_TEST_COUNT_READS": "1"})
    counts = [int(n) for n in re.findall(r"reads since the step before: (\d+)", result.stderr)]
    assert len(counts) == nproc * 5  # between the 6 steps, on every rank
    assert set(counts) == {1}, counts


COMPILED_RUN = dict(batch_size_per_gpu=8, gradient_accumulation_steps=1, epochs=1, save_steps=8, logging_steps=1,
                    eval_max_samples=8, dropout_rate=0.0)


@pytest.fixture(scope="module")
def compiled_uninterrupted(tmp_path_factory, task):
    data, tokenizer_dir = task
    flags = tiny_run_flags(tmp_path_factory.mktemp("compiled"), tokenizer_dir, data, compile=True, **COMPILED_RUN)
    result = run_cli("train", flags, timeout=900)
    return flags, result


def losses(output_dir: str) -> list[float]:
    return [r["loss"] for r in read_metrics(output_dir, "train")]


def test_a_compiled_run_trains_like_an_eager_one_within_1e_4(tmp_path, task, compiled_uninterrupted):
    data, tokenizer_dir = task
    compiled, result = compiled_uninterrupted
    eager = tiny_run_flags(tmp_path, tokenizer_dir, data, **COMPILED_RUN)
    run_cli("train", eager)
    # Lengths vary from batch to batch: one compile for all of them, logged (a second only for a 1-sized batch).
    compiles = re.findall(r"compiling the training forward \(graph [\d/]+, dynamic shapes\)", result.stdout + result.stderr)
    assert len(compiles) == 1, compiles
    ours, theirs = losses(compiled["output_dir"]), losses(eager["output_dir"])
    assert len(ours) == len(theirs) == 256 // 8
    assert ours[-1] < ours[0] - 0.5  # it learns
    for step, (a, b) in enumerate(zip(ours, theirs), start=1):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: compiled {a} vs eager {b}"


def test_a_compiled_run_stopped_and_resumed_ends_bitwise_equal_to_the_uninterrupted_one(tmp_path, task,
                                                                                         compiled_uninterrupted):
    data, tokenizer_dir = task
    uninterrupted, _ = compiled_uninterrupted
    flags = tiny_run_flags(tmp_path, tokenizer_dir, data, compile=True, **COMPILED_RUN)
    run_cli("train", dict(flags, max_steps=13), timeout=900)
    run_cli("train", dict(flags, is_keep_training=True, max_steps=0), timeout=900)
    assert losses(flags["output_dir"]) == losses(uninterrupted["output_dir"])
    ours, theirs = final_weights(flags["output_dir"]), final_weights(uninterrupted["output_dir"])
    assert ours.keys() == theirs.keys() and all(ours[name].equal(theirs[name]) for name in ours)
