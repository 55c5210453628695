"""Evaluation, the best-k models and exact resume, through the real CLI on CPU (fp32, tiny model)."""
import json
import os
import shutil

import pyarrow.parquet as pq
import pytest

from tests.cli_helpers import (
    PATCHED_ENTRY,
    TINY_MODEL,
    assert_same_weights,
    final_weights,
    read_metrics,
    run_cli,
    start_training,
    tiny_run_flags,
    trained_tiny_run,
    wait_for_line,
)
from tests.patched_cli import SLOW_FORWARD
from tests.test_span_corruption import span_run_flags

pytestmark = pytest.mark.slow

# Dropout stays on (0.1): a resume is exact only if every RNG state comes back too.
RUN = dict(batch_size_per_gpu=4, gradient_accumulation_steps=2, epochs=2, save_steps=10, logging_steps=1)
TOTAL_STEPS = 2 * 256 // 8



@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, task):
    return trained_tiny_run(tmp_path_factory.mktemp("uninterrupted"), task, **RUN)


def test_stopping_and_resuming_twice_ends_bitwise_identical_to_an_uninterrupted_run(tmp_path, task, uninterrupted):
    data, tokenizer_dir = task
    flags = tiny_run_flags(tmp_path, tokenizer_dir, data, **RUN)
    run_cli("train", dict(flags, max_steps=13))  # mid-epoch, between two saves
    second = run_cli("train", dict(flags, is_keep_training=True, max_steps=37))  # into the second epoch
    assert "resumed from" in second.stdout and "step 13" in second.stdout
    # A resume keeps the saved --max_steps unless given: 0 lifts the cap.
    third = run_cli("train", dict(flags, is_keep_training=True, max_steps=0))
    assert "step 37, epoch 1" in third.stdout and "--max_steps changed from 37 to 0" in third.stdout
    assert_same_weights(final_weights(flags["output_dir"]), final_weights(uninterrupted["output_dir"]))
    steps = [r["step"] for r in read_metrics(flags["output_dir"], "train")]
    assert steps == list(range(1, TOTAL_STEPS + 1))  # nothing replayed, nothing skipped
    ours = [(r["step"], r["loss"], r["lr"], r["samples"]) for r in read_metrics(flags["output_dir"], "train")]
    theirs = [(r["step"], r["loss"], r["lr"], r["samples"]) for r in read_metrics(uninterrupted["output_dir"], "train")]
    assert ours == theirs
    with open(os.path.join(flags["output_dir"], "checkpoints.json")) as a, \
            open(os.path.join(uninterrupted["output_dir"], "checkpoints.json")) as b:
        assert json.load(a) == json.load(b)


def evaluations(output_dir: str) -> list[tuple]:
    return [(r["step"], r["bleu4"], r["eval_loss"]) for r in read_metrics(output_dir, "eval")]


def test_a_stop_at_an_epochs_last_step_resumes_without_repeating_or_missing_its_evaluation(tmp_path, task):
    data, tokenizer_dir = task
    # Saves every 16 steps: one falls on the epoch's last step (32), the run is stopped right there, then resumed.
    reference = tiny_run_flags(tmp_path / "reference", tokenizer_dir, data, **dict(RUN, save_steps=16))
    run_cli("train", reference)
    flags = tiny_run_flags(tmp_path / "resumed", tokenizer_dir, data, **dict(RUN, save_steps=16))
    run_cli("train", dict(flags, max_steps=32))
    run_cli("train", dict(flags, is_keep_training=True, max_steps=0))
    assert [e[0] for e in evaluations(reference["output_dir"])] == [16, 32, 48, 64]
    assert evaluations(flags["output_dir"]) == evaluations(reference["output_dir"])
    assert_same_weights(final_weights(flags["output_dir"]), final_weights(reference["output_dir"]))


def test_resuming_with_another_global_batch_keeps_the_schedule_ending_at_a_tenth(tmp_path, task):
    data, tokenizer_dir = task
    flags = tiny_run_flags(tmp_path, tokenizer_dir, data, batch_size_per_gpu=8, gradient_accumulation_steps=1,
                           epochs=2, max_steps=10, warmup_steps=4, eval_max_samples=0, keep_latest_n_ckp=0,
                           save_steps=100)
    run_cli("train", flags)
    # Half the global batch (as on half the GPUs): 256 - 80 rows left of epoch 0 in steps of 4, then 64 steps.
    resumed = run_cli("train", dict(flags, is_keep_training=True, batch_size_per_gpu=4, max_steps=0))
    total = 10 + (256 - 80) // 4 + 256 // 4
    assert f"{total} steps in 2 epochs" in resumed.stdout
    records = read_metrics(flags["output_dir"], "train")
    assert [r["step"] for r in records] == list(range(1, total + 1))
    rates = [r["lr"] for r in records]
    assert all(later <= earlier for earlier, later in zip(rates[4:], rates[5:]))  # cosine decay never rises
    assert rates[-1] == pytest.approx(0.1 * flags["learn_rate"], rel=1e-9)


def test_a_two_process_run_continues_on_one_process_at_the_same_global_sample(tmp_path, task):
    data, tokenizer_dir = task
    common = dict(batch_size_per_gpu=4, dropout_rate=0.0, epochs=1, save_steps=100, eval_max_samples=0,
                  keep_latest_n_ckp=0)
    reference = tiny_run_flags(tmp_path / "reference", tokenizer_dir, data, gradient_accumulation_steps=1, **common)
    run_cli("train", reference, nproc=2)
    resumed = tiny_run_flags(tmp_path / "resumed", tokenizer_dir, data, gradient_accumulation_steps=1, **common)
    run_cli("train", dict(resumed, max_steps=13), nproc=2)
    # One process with twice the accumulation keeps the global batch of 8 rows, so the numbers must agree.
    result = run_cli("train", dict(resumed, is_keep_training=True, gradient_accumulation_steps=2, max_steps=0))
    assert "2 processes, this one 1" in result.stdout + result.stderr
    samples = [r["samples"] for r in read_metrics(resumed["output_dir"], "train")]
    assert samples == [8 * step for step in range(1, 33)]
    ours = [r["loss"] for r in read_metrics(resumed["output_dir"], "train")]
    theirs = [r["loss"] for r in read_metrics(reference["output_dir"], "train")]
    assert ours == pytest.approx(theirs, rel=1e-4)
    assert_same_weights(final_weights(resumed["output_dir"]), final_weights(reference["output_dir"]), rtol=1e-4,
                        atol=1e-6)


def test_a_state_left_half_written_is_ignored_for_the_previous_complete_one(tmp_path, task, uninterrupted):
    data, tokenizer_dir = task
    flags = tiny_run_flags(tmp_path, tokenizer_dir, data, **RUN)
    run_cli("train", dict(flags, max_steps=20))
    state_root = os.path.join(flags["output_dir"], "state")
    (complete,) = os.listdir(state_root)
    # A crash mid-save leaves a newer directory without its COMPLETE marker (and maybe a temporary one).
    for broken in ("step-00000030-epoch-0000-000000000240", "tmp-step-00000030-epoch-0000-000000000240"):
        shutil.copytree(os.path.join(state_root, complete), os.path.join(state_root, broken))
        os.remove(os.path.join(state_root, broken, "COMPLETE"))
        with open(os.path.join(state_root, broken, "model.safetensors"), "r+b") as weights:
            weights.truncate(100)
    with open(os.path.join(flags["output_dir"], "metrics.jsonl"), "a", encoding="utf-8") as metrics:
        metrics.write('{"event": "train", "step": 2')  # a line the crash cut short
    result = run_cli("train", dict(flags, is_keep_training=True, max_steps=0))
    assert f"resumed from {os.path.join(state_root, complete)}" in result.stdout
    assert_same_weights(final_weights(flags["output_dir"]), final_weights(uninterrupted["output_dir"]))
    assert [r["step"] for r in read_metrics(flags["output_dir"], "train")] == list(range(1, TOTAL_STEPS + 1))


def test_resuming_with_another_model_shape_is_a_clear_error(tmp_path, task):
    data, tokenizer_dir = task
    flags = tiny_run_flags(tmp_path, tokenizer_dir, data, max_steps=2, eval_max_samples=0, keep_latest_n_ckp=0)
    run_cli("train", flags)
    result = run_cli("train", dict(flags, is_keep_training=True, d_ff=48), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: cannot resume" in result.stderr and "--d_ff" in result.stderr


def test_resuming_with_a_new_learning_rate_continues_and_says_what_changed(tmp_path, task):
    data, tokenizer_dir = task
    flags = tiny_run_flags(tmp_path, tokenizer_dir, data, max_steps=4, eval_max_samples=0, keep_latest_n_ckp=0,
                           warmup_steps=0)
    run_cli("train", flags)
    result = run_cli("train", dict(flags, is_keep_training=True, max_steps=6, learn_rate=5e-5))
    assert "--learn_rate changed from 0.0001 to 5e-05" in result.stdout
    records = read_metrics(flags["output_dir"], "train")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[4]["lr"] < 5e-5 < records[3]["lr"]


def test_a_fresh_run_refuses_to_overwrite_a_previous_runs_state(tmp_path, task):
    data, tokenizer_dir = task
    flags = tiny_run_flags(tmp_path, tokenizer_dir, data, max_steps=2, eval_max_samples=0, keep_latest_n_ckp=0)
    run_cli("train", flags)
    result = run_cli("train", flags, check=False)
    assert result.returncode == 2 and "--is_keep_training=True" in result.stderr


def test_best_models_load_with_auto_classes_and_the_commands_use_them(uninterrupted):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    output_dir = uninterrupted["output_dir"]
    with open(os.path.join(output_dir, "checkpoints.json"), encoding="utf-8") as listing:
        best = json.load(listing)["best"]
    assert 1 <= len(best) <= 2 and [e["bleu4"] for e in best] == sorted((e["bleu4"] for e in best), reverse=True)
    assert sorted(os.listdir(os.path.join(output_dir, "best"))) == sorted(os.path.basename(e["path"]) for e in best)
    for entry in best:
        path = os.path.join(output_dir, entry["path"])
        model, tokenizer = AutoModelForSeq2SeqLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
        inputs = tokenizer(["复述：春夏秋冬"], return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        assert output.shape[0] == 1 and output.shape[1] <= 9
    evaluation = run_cli("evaluate", {"model_dir": os.path.join(output_dir, "final"),
                                      "file": uninterrupted["validation_file"], "max_samples": 8, "max_seq_len": 24})
    assert evaluation.stdout.startswith("bleu4 ") and "rows 8" in evaluation.stdout
    # The command prints the final model's own greedy answer: to a validation prompt the 64-step model answers.
    final = os.path.join(output_dir, "final")
    model, tokenizer = AutoModelForSeq2SeqLM.from_pretrained(final), AutoTokenizer.from_pretrained(final)
    prompts = pq.read_table(uninterrupted["validation_file"]).column("prompt").to_pylist()[:8]
    answers = [tokenizer.decode(model.generate(**tokenizer([p], return_tensors="pt"), max_new_tokens=8,
                                               do_sample=False)[0], skip_special_tokens=True) for p in prompts]
    prompt, expected = next((p, a) for p, a in zip(prompts, answers) if a.strip())
    answer = run_cli("generate", {"model_dir": final, "prompt": prompt, "max_new_tokens": 8})
    assert answer.stdout == expected + "\n"
    missing = run_cli("generate", {"model_dir": os.path.join(output_dir, "nothing"), "prompt": "x"}, check=False)
    assert missing.returncode == 2 and missing.stderr.startswith("error: --model_dir")


def test_a_resume_takes_the_model_shape_and_tokenizer_from_the_saved_run(tmp_path, task):
    data, tokenizer_dir = task
    flags = tiny_run_flags(tmp_path, tokenizer_dir, data, max_steps=3, eval_max_samples=0, keep_latest_n_ckp=0)
    run_cli("train", flags)
    # The same training flags, but no model flag and no tokenizer (the defaults would be the 190M model).
    essentials = {name: value for name, value in flags.items() if name not in TINY_MODEL and name != "tokenizer_dir"}
    resumed = run_cli("train", dict(essentials, is_keep_training=True, max_steps=5))
    assert "resumed from" in resumed.stdout and "step 3, epoch 0" in resumed.stdout
    assert [r["step"] for r in read_metrics(flags["output_dir"], "train")] == [1, 2, 3, 4, 5]


def test_a_model_flag_that_contradicts_the_saved_run_is_an_error_before_anything_is_built(tmp_path, task):
    data, tokenizer_dir = task
    flags = tiny_run_flags(tmp_path, tokenizer_dir, data, max_steps=2, eval_max_samples=0, keep_latest_n_ckp=0)
    run_cli("train", flags)
    result = run_cli("train", dict(flags, is_keep_training=True, d_ff=48, num_heads=4), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        f"error: cannot resume, the saved state is incompatible: --d_ff=48 was given, but the saved run in "
        f"{flags['output_dir']} has 64",
        f"error: cannot resume, the saved state is incompatible: --num_heads=4 was given, but the saved run in "
        f"{flags['output_dir']} has 2"]
    assert "model:" not in result.stdout and "log file" not in result.stdout  # nothing was built


def test_resuming_a_directory_without_a_saved_state_is_an_error_naming_it(tmp_path, task):
    data, tokenizer_dir = task
    flags = tiny_run_flags(tmp_path, tokenizer_dir, data, max_steps=2)
    result = run_cli("train", dict(flags, is_keep_training=True), check=False)
    assert result.returncode == 2 and result.stderr.startswith(
        f"error: --is_keep_training=True: --output_dir={flags['output_dir']} holds no saved state")
    assert "leave out --is_keep_training" in result.stderr and not os.path.exists(flags["output_dir"])


def test_each_epoch_end_saves_the_state_once(tmp_path, task):
    data, tokenizer_dir = task
    flags = tiny_run_flags(tmp_path, tokenizer_dir, data, epochs=2, save_steps=1000, eval_max_samples=16)
    result = run_cli("train", flags)
    saves = [line for line in result.stdout.splitlines() if "saved resumable state" in line]
    assert [line.split("at step ")[1].split(":")[0] for line in saves] == ["32", "64"]
    assert len([r for r in read_metrics(flags["output_dir"], "eval")]) == 2


# ------------------------------------------------- a resume given only where the run is

def run_of_kind(kind: str, directory, task, text_task, pretrained: dict) -> dict:
    """The flags of a seconds-long run of each kind the tool trains, none of them at its defaults."""
    if kind == "span corruption":
        return span_run_flags(directory, text_task, learn_rate=3e-4, warmup_steps=2, seed=11)
    data, tokenizer_dir = task
    if kind == "fine-tuning":  # from the pre-trained model, its encoder frozen, with the fine-tuning config
        flags = tiny_run_flags(directory, tokenizer_dir, data, is_finetune=True,
                               init_from=os.path.join(pretrained["output_dir"], "final"), learn_rate=5e-4)
        return {name: value for name, value in flags.items() if name not in TINY_MODEL and name != "tokenizer_dir"}
    return tiny_run_flags(directory, tokenizer_dir, data, **dict(RUN, learn_rate=3e-4, warmup_steps=2))


@pytest.mark.parametrize("kind", ["pre-training", "fine-tuning", "span corruption"])
def test_a_resume_given_only_the_output_directory_continues_the_saved_run_bitwise(tmp_path, task, text_task,
                                                                                  uninterrupted, kind):
    whole = run_of_kind(kind, tmp_path / "whole", task, text_task, uninterrupted)
    run_cli("train", whole)
    flags = run_of_kind(kind, tmp_path / "stopped", task, text_task, uninterrupted)
    # Steps slowed down (a sleep in the forward) so that SIGTERM lands mid-run, as a scheduler's would.
    process = start_training(flags, entry=PATCHED_ENTRY, env={SLOW_FORWARD: 0.05})
    wait_for_line(process, "step 3/")
    process.terminate()
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0 and "stopped by a signal" in output, output[-2000:]

    resumed = run_cli("train", {"output_dir": flags["output_dir"], "is_keep_training": True})
    config = "TrainConfigSFT" if kind == "fine-tuning" else "TrainConfig"
    assert f"configuration ({config})" in resumed.stdout and "resumed from" in resumed.stdout
    assert "resume: --" not in resumed.stdout  # no setting of the saved run was replaced by a default
    assert_same_weights(final_weights(flags["output_dir"]), final_weights(whole["output_dir"]))
    assert ([(r["step"], r["loss"], r["lr"]) for r in read_metrics(flags["output_dir"], "train")]
            == [(r["step"], r["loss"], r["lr"]) for r in read_metrics(whole["output_dir"], "train")])


def test_a_flag_given_on_a_resume_changes_that_setting_alone_and_is_logged(tmp_path, task):
    data, tokenizer_dir = task
    flags = tiny_run_flags(tmp_path, tokenizer_dir, data, max_steps=3, eval_max_samples=0, keep_latest_n_ckp=0,
                           gradient_accumulation_steps=3, warmup_steps=7, epochs=3)
    run_cli("train", flags)
    resumed = run_cli("train", {"output_dir": flags["output_dir"], "is_keep_training": True, "max_steps": 5})
    changes = [line.split("resume: ")[1] for line in resumed.stdout.splitlines() if "resume: --" in line]
    assert changes == ["--max_steps changed from 3 to 5"]
    saved = read_metrics(flags["output_dir"], "train")
    assert [r["step"] for r in saved] == [1, 2, 3, 4, 5]
    assert all(r["samples"] == 8 * 3 * r["step"] for r in saved)  # the saved global batch: 8 rows x 3


def test_a_resume_of_a_run_that_reached_its_max_steps_says_how_to_go_on(tmp_path, task):
    data, tokenizer_dir = task
    flags = tiny_run_flags(tmp_path, tokenizer_dir, data, max_steps=2, eval_max_samples=0, keep_latest_n_ckp=0)
    run_cli("train", flags)
    result = run_cli("train", {"output_dir": flags["output_dir"], "is_keep_training": True}, check=False)
    assert result.returncode == 2 and result.stderr == (
        "error: --is_keep_training=True: the saved run stopped at its --max_steps=2; give --max_steps=<a later "
        "step> to go on, or --max_steps=0 to train to the end of its epochs\n")


def test_a_resume_whose_tokenizer_was_replaced_names_the_runs_own_copy_which_resumes(tmp_path, task):
    data, tokenizer_dir = task
    own_tokenizer = tmp_path / "tokenizer"
    shutil.copytree(tokenizer_dir, own_tokenizer)
    flags = tiny_run_flags(tmp_path, str(own_tokenizer), data, max_steps=2, eval_max_samples=0, keep_latest_n_ckp=0)
    run_cli("train", flags)
    run_cli("train_tokenizer", {"train_file": data["train_file"], "tokenizer_dir": own_tokenizer, "vocab_size": 350,
                                "overwrite": True})
    resume = {"output_dir": flags["output_dir"], "is_keep_training": True, "max_steps": 3}
    refused = run_cli("train", resume, check=False)
    copy = os.path.join(flags["output_dir"], "final")
    assert refused.returncode == 2 and "--tokenizer_dir: not the tokenizer the saved run used" in refused.stderr
    assert f"--tokenizer_dir={copy}" in refused.stderr
    resumed = run_cli("train", dict(resume, tokenizer_dir=copy))
    assert "step 2, epoch 0" in resumed.stdout
    assert [r["step"] for r in read_metrics(flags["output_dir"], "train")] == [1, 2, 3]


def test_evaluate_scores_at_the_length_the_model_was_trained_with_unless_told(uninterrupted):
    final = os.path.join(uninterrupted["output_dir"], "final")
    with open(os.path.join(final, "config.json"), encoding="utf-8") as config:
        assert json.load(config)["trained_max_seq_len"] == 24
    own = run_cli("evaluate", {"model_dir": final, "file": uninterrupted["validation_file"], "max_samples": 4})
    told = run_cli("evaluate", {"model_dir": final, "file": uninterrupted["validation_file"], "max_samples": 4,
                                "max_seq_len": 16})
    assert "greedy answers of up to 24 tokens" in own.stderr and "greedy answers of up to 16 tokens" in told.stderr
