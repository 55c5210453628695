"""Preference tuning (DPO, IPO): the paper's formulas, one forward per pair, the reference pass computed once, exact
resume and data parallelism, the pre-flight and the plan, through the real CLI on CPU (fp32, tiny models)."""
import glob
import json
import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.cli_helpers import (
    PATCHED_ENTRY,
    TINY_MODEL,
    assert_same_weights,
    assert_two_ranks_equal_one_with_double_accumulation,
    final_weights,
    read_metrics,
    run_cli,
    start_training,
    trained_tiny_run,
    wait_for_line,
)
from tests.patched_cli import OOM_FROM_ROWS, REFERENCE_PART_PAIRS, SLOW_FORWARD, SLOW_REFERENCE

# ------------------------------------------------------------------ the formulas, on fixed log-probabilities

POLICY = [[-10.0, -12.5], [-3.0, -2.0], [-7.25, -7.25], [-20.0, -35.0]]
REFERENCE = [[-11.0, -12.0], [-3.5, -1.0], [-7.0, -8.0], [-21.0, -30.0]]
CHOSEN_TOKENS = [5, 2, 4, 9]


def by_the_papers(policy, reference, tokens, beta, kind, label_smoothing, sft_weight):
    """One pair's loss and (accuracy, margin, chosen reward, rejected reward, chosen logp, rejected logp), written
    from the DPO and IPO papers' definitions in plain floats."""
    chosen_reward, rejected_reward = beta * (policy[0] - reference[0]), beta * (policy[1] - reference[1])
    margin = chosen_reward - rejected_reward
    log_sigmoid = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
    if kind == "ipo":
        loss = ((policy[0] - reference[0]) - (policy[1] - reference[1]) - 1 / (2 * beta)) ** 2
    else:
        loss = -(1 - label_smoothing) * log_sigmoid(margin) - label_smoothing * log_sigmoid(-margin)
    loss += sft_weight * -policy[0] / tokens
    return loss, [float(chosen_reward > rejected_reward), margin, chosen_reward, rejected_reward, *policy]


@pytest.mark.parametrize("beta, kind, label_smoothing, sft_weight", [
    (0.1, "sigmoid", 0.0, 0.0), (0.5, "sigmoid", 0.2, 0.0), (0.1, "ipo", 0.0, 0.0), (0.3, "sigmoid", 0.0, 0.5),
    (2.0, "ipo", 0.0, 1.0)])
def test_the_loss_rewards_and_accuracy_are_the_papers_formulas(beta, kind, label_smoothing, sft_weight):
    from model.preference import PreferenceLoss

    loss = PreferenceLoss(beta, kind, label_smoothing, sft_weight)
    losses, stats = loss.per_pair(torch.tensor(POLICY, dtype=torch.float64),
                                  torch.tensor(REFERENCE, dtype=torch.float64),
                                  torch.tensor(CHOSEN_TOKENS, dtype=torch.float64))
    for row, (policy, reference, tokens) in enumerate(zip(POLICY, REFERENCE, CHOSEN_TOKENS)):
        expected_loss, expected_stats = by_the_papers(policy, reference, tokens, beta, kind, label_smoothing,
                                                      sft_weight)
        assert losses[row].item() == pytest.approx(expected_loss, rel=1e-12)
        assert stats[row].tolist() == pytest.approx(expected_stats, rel=1e-12)


# --------------------------------------------------------------------- one forward for both answers of a pair

def tiny_model(tokenizer):
    from config import T5ModelConfig
    from model.t5 import build_model

    torch.manual_seed(0)
    return build_model(T5ModelConfig(**TINY_MODEL, dropout_rate=0.0), tokenizer).eval()


def separate_logps(model, prompts: list, answers: list) -> list[float]:
    """Each answer's summed log-probability from a forward of its own, prompt and answer alone (no padding)."""
    results = []
    for prompt, answer in zip(prompts, answers):
        labels = torch.tensor([answer])
        logits = model(input_ids=torch.tensor([prompt]), labels=labels).logits
        results.append(torch.log_softmax(logits.double(), -1)[0, torch.arange(len(answer)), labels[0]].sum().item())
    return results


def test_one_forward_of_a_pair_gives_each_answers_log_probability_as_a_forward_of_its_own(task_tokenizer_dir):
    from data_pipeline.batch import Ragged
    from data_pipeline.preference import PreferenceMicroBatch
    from model.preference import answer_logps
    from model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(task_tokenizer_dir)
    model = tiny_model(tokenizer)
    encode = lambda texts: [tokenizer(text)["input_ids"] for text in texts]  # noqa: E731
    prompts = encode(["复制：春天来了", "倒序：山高水长的地方", "你好"])
    chosen = encode(["春天来了", "方地的长水高山", "你好呀，朋友们，今天天气很好"])
    rejected = encode(["秋天", "山高水长", "再见"])
    batch = PreferenceMicroBatch.of_pairs(*map(Ragged.from_lists, (prompts, chosen, rejected)), np.zeros((3, 2)),
                                          tokenizer.pad_token_id)
    assert batch.input_padding  # prompts of different lengths: the encoder's padding must not count either
    with torch.no_grad():
        together = answer_logps(model, batch.input_ids, batch.attention_mask, batch.labels).view(2, -1).T
        assert together[:, 0].tolist() == pytest.approx(separate_logps(model, prompts, chosen), rel=1e-5)
        assert together[:, 1].tolist() == pytest.approx(separate_logps(model, prompts, rejected), rel=1e-5)


def test_a_stand_in_pair_trains_nothing(task_tokenizer_dir):
    from data_pipeline.preference import PreferenceMicroBatch
    from model.preference import PreferenceLoss, preference_loss_sum
    from model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(task_tokenizer_dir)
    model = tiny_model(tokenizer).train()
    stand_in = PreferenceMicroBatch.placeholder(tokenizer.eos_token_id)
    loss, stats = preference_loss_sum(model, stand_in, stand_in.attention_mask, PreferenceLoss())
    loss.backward()
    assert loss.item() == 0.0 and stats.abs().sum().item() == 0.0
    assert all(p.grad is not None and p.grad.abs().sum().item() == 0.0 for p in model.parameters())


# ------------------------------------------------------------------------------------ runs through the CLI

def write_pairs(source: str, destination: str, seed: int, odd_rows: bool = False) -> str:
    """Pairs as the learning benchmark builds them: chosen = the row's response, rejected = another row's. With
    `odd_rows`, one pair with an empty chosen answer and two whose answers are the same are added."""
    table = pq.read_table(source)
    prompts, responses = table["prompt"].to_pylist(), table["response"].to_pylist()
    rng = np.random.default_rng(seed)
    rejected = [responses[(i + 1 + int(rng.integers(len(responses) - 1))) % len(responses)]
                for i in range(len(responses))]
    chosen = list(responses)
    if odd_rows:
        prompts, chosen, rejected = prompts + ["甲", "乙", "丙"], chosen + ["", "同", "样"], rejected + ["不", "同", "样"]
    pq.write_table(pa.table({"prompt": prompts, "chosen": chosen, "rejected": rejected}), destination,
                   row_group_size=64)
    return destination


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory, task) -> str:
    flags = trained_tiny_run(tmp_path_factory.mktemp("sft"), task, epochs=4, learn_rate=3e-4, dropout_rate=0.0,
                             keep_latest_n_ckp=1)
    return os.path.join(flags["output_dir"], "final")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, task) -> dict:
    data, _ = task
    directory = tmp_path_factory.mktemp("pairs")
    return {"train_file": write_pairs(data["train_file"], str(directory / "train.parquet"), 1, odd_rows=True),
            "validation_file": write_pairs(data["validation_file"], str(directory / "valid.parquet"), 2)}


def dpo_flags(directory, sft_model: str, pairs: dict, **overrides) -> dict:
    """A seconds-long DPO run from the fine-tuned tiny model: its shape and tokenizer come with it."""
    flags = dict(pairs, objective="dpo", init_from=sft_model, output_dir=os.path.join(str(directory), "out"),
                 log_dir=os.path.join(str(directory), "logs"), max_seq_len=24, batch_size_per_gpu=4,
                 gradient_accumulation_steps=2, dataloader_buffer_size=128, learn_rate=1e-4, warmup_steps=4,
                 epochs=2, save_steps=10, logging_steps=1, eval_max_samples=16, eval_batch_size=8,
                 keep_latest_n_ckp=2, mixed_precision="no", num_workers=0, seed=7, memory_log_steps=0)
    flags.update(overrides)
    return flags


def reference_dirs(output_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(output_dir, "reference_logps", "*", "meta.json")))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, sft_model, pairs) -> dict:
    flags = dpo_flags(tmp_path_factory.mktemp("dpo"), sft_model, pairs)
    return dict(flags, stdout=run_cli("train", flags).stdout)


@pytest.mark.slow
def test_dpo_learns_the_preferences_logs_its_figures_and_keeps_the_best_by_reward_accuracy(uninterrupted):
    output = uninterrupted["stdout"]
    assert "configuration (TrainConfigDPO)" in output
    assert ("256 training and 16 validation pairs; training pairs skipped: 1 with an empty prompt or answer, 2 whose "
            "two answers are the same") in output
    train = read_metrics(uninterrupted["output_dir"], "train")
    assert set(train[0]) >= {"reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "chosen_logp",
                             "rejected_logp"}
    # The policy starts as the reference: every reward is 0, the sigmoid loss log 2.
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-5) and abs(train[0]["reward_margin"]) < 1e-4
    evaluations = read_metrics(uninterrupted["output_dir"], "eval")
    assert evaluations[0]["step"] == 0 and evaluations[0]["reward_accuracy"] == 0.0
    assert evaluations[0]["reward_margin"] == 0.0 and evaluations[0]["eval_loss"] == pytest.approx(math.log(2))
    last = evaluations[-1]  # 66 steps later (a wrong sign or scale would move these the other way)
    assert last["reward_accuracy"] > 0.6 and last["reward_margin"] > 0 and last["eval_loss"] < math.log(2) - 0.05
    with open(os.path.join(uninterrupted["output_dir"], "checkpoints.json")) as listing:
        kept = json.load(listing)
    assert kept["metric"] == "reward_accuracy"
    ranked = sorted(evaluations, key=lambda e: (-e["reward_accuracy"], e["eval_loss"], e["step"]))[:2]
    assert [(e["step"], e["reward_accuracy"]) for e in kept["best"]] == [(e["step"], e["reward_accuracy"])
                                                                      for e in ranked]
    assert "example | prompt:" in output
    assert "pairs with an empty prompt or answer, or the same two answers, skipped so far" in output


@pytest.mark.slow
def test_the_reference_is_computed_once_reused_and_recomputed_for_another_model_or_data(
        tmp_path, sft_model, pairs, uninterrupted, task):
    first = dpo_flags(tmp_path, sft_model, pairs, max_steps=2)
    assert "reference pass: the starting model's log-probabilities" in run_cli("train", first).stdout
    [meta] = reference_dirs(first["output_dir"])
    written = os.path.getmtime(meta)
    resumed = run_cli("train", {**{k: v for k, v in first.items() if k != "init_from"}, "is_keep_training": True,
                                "max_steps": 4}).stdout
    assert "reference log-probabilities: reused from" in resumed and "reference pass:" not in resumed
    # The same run's starting model and data, and the numbers of the run trained in another directory.
    here = np.load(os.path.join(os.path.dirname(meta), "train.npy"))
    [theirs] = reference_dirs(uninterrupted["output_dir"])
    assert np.array_equal(here, np.load(os.path.join(os.path.dirname(theirs), "train.npy")), equal_nan=True)
    assert os.path.getmtime(meta) == written

    # Another starting model, or changed data, is another reference (a new run in a new directory each time).
    other_model = os.path.join(uninterrupted["output_dir"], "final")
    run_cli("train", dict(first, output_dir=str(tmp_path / "other_model"), init_from=other_model))
    [other] = reference_dirs(str(tmp_path / "other_model"))
    assert os.path.basename(os.path.dirname(other)) != os.path.basename(os.path.dirname(meta))
    assert not np.array_equal(np.load(os.path.join(os.path.dirname(other), "train.npy")), here, equal_nan=True)
    data, _ = task
    changed = write_pairs(data["train_file"], str(tmp_path / "changed.parquet"), seed=5)
    run_cli("train", dict(first, output_dir=str(tmp_path / "other_data"), train_file=changed))
    [again] = reference_dirs(str(tmp_path / "other_data"))
    assert os.path.basename(os.path.dirname(again)) not in {os.path.basename(os.path.dirname(p)) for p in (meta, other)}


@pytest.mark.slow
def test_a_dpo_run_stopped_in_training_resumes_from_its_output_directory_alone_bitwise(
        tmp_path, sft_model, pairs, uninterrupted):
    flags = dpo_flags(tmp_path, sft_model, pairs)
    process = start_training(flags, entry=PATCHED_ENTRY, env={SLOW_FORWARD: 0.05})  # SIGTERM lands mid-run
    wait_for_line(process, "step 5/")
    process.terminate()
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0 and "stopped by a signal" in output, output[-2000:]
    resumed = run_cli("train", {"output_dir": flags["output_dir"], "is_keep_training": True})
    assert "configuration (TrainConfigDPO)" in resumed.stdout and "resume: --" not in resumed.stdout
    assert "reference log-probabilities: reused from" in resumed.stdout
    assert_same_weights(final_weights(flags["output_dir"]), final_weights(uninterrupted["output_dir"]))
    ours = [(r["step"], r["loss"], r["reward_margin"]) for r in read_metrics(flags["output_dir"], "train")]
    theirs = [(r["step"], r["loss"], r["reward_margin"]) for r in read_metrics(uninterrupted["output_dir"], "train")]
    assert ours == theirs


@pytest.mark.slow
def test_a_dpo_run_stopped_inside_the_reference_pass_continues_it_when_run_again_and_ends_bitwise(
        tmp_path, sft_model, pairs):
    # The parts' batches depend on their size: both runs cut the pairs into 9 parts of 32.
    whole = dpo_flags(tmp_path / "whole", sft_model, pairs)
    run_cli("train", whole, entry=PATCHED_ENTRY, env={REFERENCE_PART_PAIRS: 32})
    flags = dpo_flags(tmp_path / "stopped", sft_model, pairs)
    slow = {SLOW_REFERENCE: 0.5, REFERENCE_PART_PAIRS: 32}  # half a second a part
    process = start_training(flags, entry=PATCHED_ENTRY, env=slow)
    wait_for_line(process, "reference pass: the starting model's")
    process.terminate()
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0 and "stopped by a signal during the reference pass" in output, output[-2000:]
    kept = glob.glob(os.path.join(flags["output_dir"], "reference_logps", "*", "parts-train", "*.npy"))
    assert 0 < len(kept) < 9 and not reference_dirs(flags["output_dir"])
    again = run_cli("train", flags, entry=PATCHED_ENTRY, env={REFERENCE_PART_PAIRS: 32})
    assert "reference pass done" in again.stdout
    assert_same_weights(final_weights(flags["output_dir"]), final_weights(whole["output_dir"]))


@pytest.mark.slow
def test_two_dpo_ranks_equal_one_rank_accumulating_two_micro_batches(tmp_path, sft_model, pairs):
    def flags_for(name, **overrides):
        return dpo_flags(tmp_path / name, sft_model, pairs, **overrides)

    result = assert_two_ranks_equal_one_with_double_accumulation(flags_for, steps=6)
    assert "reference pass done" in result.stdout


@pytest.mark.slow
def test_a_dpo_step_out_of_memory_halves_the_micro_batch_and_matches_a_run_started_that_way(tmp_path, sft_model,
                                                                                             pairs):
    common = dict(max_steps=8, eval_max_samples=0, keep_latest_n_ckp=0)
    recovered = dpo_flags(tmp_path / "recovered", sft_model, pairs, batch_size_per_gpu=4,
                          gradient_accumulation_steps=1, **common)
    halved = dpo_flags(tmp_path / "halved", sft_model, pairs, batch_size_per_gpu=2, gradient_accumulation_steps=2,
                       **common)
    result = run_cli("train", recovered, env={OOM_FROM_ROWS: 3}, entry=PATCHED_ENTRY)
    assert "retrying with batch_size_per_gpu=2, gradient_accumulation_steps=2" in result.stdout
    run_cli("train", halved)
    assert_same_weights(final_weights(recovered["output_dir"]), final_weights(halved["output_dir"]), rtol=1e-5,
                        atol=1e-7)


@pytest.mark.parametrize("case", ["a prompt/response file", "no starting model", "compile"])
def test_a_dpo_run_without_what_it_needs_exits_2_naming_it(tmp_path, task, sft_model, pairs, case):
    flags = dpo_flags(tmp_path, sft_model, pairs)
    if case == "a prompt/response file":
        flags["train_file"], expected = task[0]["train_file"], "'chosen'"
    elif case == "no starting model":
        if os.path.exists(os.path.join(os.path.dirname(os.path.dirname(__file__)), "model_save", "sft",
                                       "checkpoints.json")):
            pytest.skip("this checkout has a fine-tuning run in model_save/sft: the default would start from it")
        flags.pop("init_from")
        flags.update(TINY_MODEL, tokenizer_dir=os.path.join(sft_model))
        expected = "--objective=dpo starts from --init_from, by default the best model of the fine-tuning run"
    else:
        flags["compile"], expected = True, "--compile=True with --objective=dpo"
    result = run_cli("train", flags, check=False)
    assert result.returncode == 2 and expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not os.path.exists(flags["output_dir"])


def test_plan_shows_a_dpo_step_needs_no_more_memory_than_a_fine_tuning_step_of_as_many_answers(sft_model):
    result = run_cli("plan", dict(objective="dpo", init_from=sft_model, num_samples=8000, max_seq_len=64,
                                  batch_size_per_gpu=8, json=True, step_time=0.3))
    plan = json.loads(result.stdout)
    assert 0 < plan["dpo_activation_gb"] <= plan["sft_equivalent_activation_gb"]
    assert plan["reference_model_gb"] == 0.0
    assert plan["two_model_design_extra_bytes"] == 4 * plan["parameters"]
    # One forward-only pass over the pairs: a third of an epoch of 8000 / (8 x 8) steps at 0.3 s.
    assert plan["reference_pass_hours"] == pytest.approx(math.ceil(8000 / 64) * 0.3 / 3 / 3600, abs=1e-4)
