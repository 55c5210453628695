"""Span corruption on packed raw text: the objective's arithmetic, the packed dataset's guarantees, and runs of the
real CLI (--objective=span_corruption) on CPU."""
import collections
import json
import math
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from data_pipeline.batch import LABEL_PAD
from data_pipeline.packed_text import PackedTextDataset, TextSpec
from data_pipeline.span_corruption import SpanCorruption, restore, sentinels_of
from data_pipeline.windows import (CHUNK_MASKS, CHUNK_SHUFFLE, ROW_GROUP_ORDER, WINDOW_SHUFFLE, StreamSpec,
                                   epoch_stream)
from model.tokenizer import load_tokenizer
from tests.cli_helpers import (
    TINY_MODEL,
    assert_same_weights,
    assert_two_ranks_equal_one_with_double_accumulation,
    final_weights,
    read_metrics,
    run_cli,
)
from tests.conftest import raw_documents, sample_rows, write_text_parquet
from utils.errors import UnreadableData

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

T5 = SpanCorruption(0.15, 3.0)


def test_the_lengths_are_t5s_a_512_token_input_packs_568_tokens_into_114_targets():
    assert T5.chunk_length(512) == 568 and T5.input_length(568) == 512 and T5.target_length(568) == 114
    assert T5.chunk_length(192) == 212 and T5.input_length(212) <= 192 < T5.input_length(213)


@settings(max_examples=200, deadline=None)
@given(length=st.integers(1, 700), density=st.floats(0.01, 0.5), mean=st.floats(1.0, 10.0),
       seed=st.integers(0, 2**32 - 1))
def test_a_corrupted_chunk_has_the_promised_lengths_and_restores_to_the_chunk(length, density, mean, seed):
    corruption = SpanCorruption(density, mean)
    chunk = np.arange(1000, 1000 + length, dtype=np.int32)
    sentinels = np.arange(10, 10 + corruption.spans(length))
    inputs, targets = corruption.corrupt(chunk, np.random.default_rng(seed), sentinels, eos_id=1)
    assert len(inputs) == corruption.input_length(length) and len(targets) == corruption.target_length(length)
    assert inputs[-1] == targets[-1] == 1
    assert sum(token in sentinels for token in targets) == corruption.spans(length)
    assert restore(inputs, targets, sentinels) == chunk.tolist()


def packed(files, tokenizer, counts_dir, noise_density=0.15, mean_noise_span_length=3.0, **overrides
           ) -> PackedTextDataset:
    spec = StreamSpec(files, **{**dict(max_seq_len=48, batch_size=4, buffer_size=64, seed=3), **overrides})
    return PackedTextDataset(spec, tokenizer, TextSpec(corruption=SpanCorruption(noise_density, mean_noise_span_length),
                                                       counts_dir=counts_dir))


@pytest.fixture
def dataset_factory(text_task, tmp_path):
    data, tokenizer_dir = text_task
    tokenizer = load_tokenizer(tokenizer_dir)

    def make(**overrides):
        return packed(data["train_file"], tokenizer, **{"counts_dir": str(tmp_path / "counts"), **overrides})
    return make, tokenizer, data


def rows_of(batch):
    """(input ids, target ids) of each row of a micro-batch, padding removed."""
    for inputs, mask, labels in zip(batch.input_ids, batch.attention_mask, batch.labels):
        yield inputs[mask.bool()].numpy(), labels[labels != LABEL_PAD].numpy()


def epoch_chunks(dataset, tokenizer) -> list:
    """Every chunk of an epoch, restored from its corrupted rows and put back in stream order by the dataset's
    public chunk order (one rank, no accumulation: a step's rows come in that order)."""
    sentinels = np.array(sentinels_of(tokenizer))
    epoch = dataset.state_dict()["epoch"]
    visited = [restore(inputs, targets, sentinels) for step in dataset for batch in step.micro_batches
               for inputs, targets in rows_of(batch)]
    order = dataset.chunk_order(epoch, 0, dataset.num_samples)
    assert sorted(order) == list(range(dataset.num_samples))  # every chunk once
    in_stream_order = [None] * len(visited)
    for chunk, tokens in zip(order, visited):
        in_stream_order[chunk] = tokens
    return in_stream_order


def restored_documents(dataset, tokenizer) -> list[str]:
    """The documents an epoch's corrupted batches restore to, after checking the chunks' lengths."""
    chunks = epoch_chunks(dataset, tokenizer)
    assert all(len(chunk) == dataset.chunk_length for chunk in chunks[:-1]) and len(chunks) == dataset.num_samples
    stream = [token for chunk in chunks for token in chunk]
    assert len(stream) == dataset.num_tokens and stream[-1] == tokenizer.eos_token_id
    documents, current = [], []
    for token in stream:
        current.append(token)
        if token == tokenizer.eos_token_id:
            documents.append(tokenizer.decode(current, skip_special_tokens=True))
            current = []
    return documents


def test_the_corrupted_batches_of_an_epoch_restore_to_every_document_exactly_once(dataset_factory):
    make, tokenizer, data = dataset_factory
    expected = [d for d in pq.read_table(data["train_file"])["text"].to_pylist() if d]
    assert collections.Counter(restored_documents(make(), tokenizer)) == collections.Counter(expected)


def test_windows_without_a_token_and_steps_over_many_windows_lose_and_repeat_nothing(dataset_factory, tmp_path):
    _, tokenizer, _ = dataset_factory
    documents = ["甲乙"] * 3 + [""] * 9 + ["丙丁戊"] * 3 + [None] * 5 + ["己"] + [""] * 4
    path = write_text_parquet(tmp_path / "sparse.parquet", documents, row_group_size=3)
    for epoch in (0, 1):
        dataset = packed(str(path), tokenizer, max_seq_len=8, buffer_size=2, counts_dir=str(tmp_path / "counts"))
        dataset.set_epoch(epoch)
        assert sorted(restored_documents(dataset, tokenizer)) == sorted(d for d in documents if d)


def test_noise_density_over_an_epoch_is_within_a_hundredth_of_the_flag(dataset_factory):
    make, tokenizer, _ = dataset_factory
    for density in (0.15, 0.3):
        dataset = make(noise_density=density, max_seq_len=64)
        sentinels = set(sentinels_of(tokenizer))
        cut = total = 0
        for step in dataset:
            for batch in step.micro_batches:
                for inputs, targets in rows_of(batch):
                    noise = sum(1 for t in targets[:-1] if t not in sentinels)
                    cut += noise
                    total += noise + sum(1 for t in inputs[:-1] if t not in sentinels)
        assert total == dataset.num_tokens and abs(cut / total - density) <= 0.01


def test_chunks_are_visited_shuffled_within_the_block_of_the_window_they_start_in(dataset_factory):
    make, _, _ = dataset_factory
    dataset = make(buffer_size=16)
    for epoch in (0, 1):
        bounds = dataset.chunk_blocks(epoch)
        order = dataset.chunk_order(epoch, 0, dataset.num_samples)
        assert len(bounds) == dataset.num_windows + 1 and bounds[-1] == dataset.num_samples
        for first, end in zip(bounds[:-1], bounds[1:]):
            assert sorted(order[first:end]) == list(range(first, end))  # a block's chunks, each once, in its turn
        assert list(order) != sorted(order)
        # Any stretch of the epoch is the same chunks, however it is asked for (a resume asks from its position).
        assert list(dataset.chunk_order(epoch, 7, 50)) == list(order[7:50])
    assert list(dataset.chunk_order(0, 0, 60)) != list(dataset.chunk_order(1, 0, 60))


def test_a_step_of_book_length_documents_holds_chunks_of_many_of_them(dataset_factory, tmp_path):
    from bench_chunk_shuffle import documents_per_step

    _, tokenizer, _ = dataset_factory
    rng = np.random.default_rng(0)
    phrases = ["春夏秋冬", "山水之间", "今天天气很好", "学习需要坚持", "北京是中国的首都"]
    books = ["".join(rng.choice(phrases, 400)) for _ in range(12)]  # ~2,000 tokens each: ~50 chunks of 40
    path = write_text_parquet(tmp_path / "books.parquet", books, row_group_size=4)
    dataset = packed(str(path), tokenizer, counts_dir=str(tmp_path / "counts"), max_seq_len=32, batch_size=8,
                     buffer_size=12)
    figures = documents_per_step(dataset, tokenizer)
    assert figures["documents"] == 12 and figures["consecutive"] < 1.3 and figures["shuffled"] > 5


def test_each_purpose_draws_from_its_own_random_stream():
    # numpy pads seed lists with zeros: [seed, epoch] and [seed, epoch, 0] would be one stream.
    assert (np.random.default_rng([5, 1]).random(4) == np.random.default_rng([5, 1, 0]).random(4)).all()
    draws = {purpose: tuple(epoch_stream(5, 1, purpose, 0).random(4))
             for purpose in (ROW_GROUP_ORDER, WINDOW_SHUFFLE, CHUNK_MASKS, CHUNK_SHUFFLE)}
    assert len(set(draws.values())) == 4


def test_no_token_is_padding_but_in_the_epochs_last_chunk(dataset_factory):
    make, _, _ = dataset_factory
    dataset = make(batch_size=8)
    steps = list(dataset)
    # The epoch's last chunk, the only short one, is visited somewhere in its block: only its step pads.
    position = list(dataset.chunk_order(0, 0, dataset.num_samples)).index(dataset.num_samples - 1)
    padded = [index for index, step in enumerate(steps) for batch in step.micro_batches
              if not (bool(batch.attention_mask.all()) and bool((batch.labels != LABEL_PAD).all()))]
    assert padded == [position // 8]
    assert step_tokens_are_the_labels(steps)


@pytest.mark.parametrize("compile", [False, True])
def test_a_compiled_run_gets_inputs_and_targets_padded_to_a_multiple_of_8(text_task, tmp_path, compile):
    """At 64 tokens a chunk's target has 14: the memory-efficient attention kernel and a compiled graph want 16."""
    from config import TrainConfig
    from training.feed import DataFeed
    from training.runtime import Runtime
    from training.state import TrainingState

    data, tokenizer_dir = text_task
    cfg = TrainConfig(**data, tokenizer_dir=tokenizer_dir, objective="span_corruption", compile=compile,
                      max_seq_len=64, batch_size_per_gpu=4, gradient_accumulation_steps=1,
                      dataloader_buffer_size=100, output_dir=str(tmp_path))
    feed = DataFeed(cfg, load_tokenizer(tokenizer_dir), Runtime("no", True, 0, False, 24.0, []), 0, 1)
    state = TrainingState(batch_size_per_gpu=4, gradient_accumulation_steps=1)
    widths = {(batch.input_ids.shape[1], batch.labels.shape[1]) for step in feed.epoch_steps(state)
              for batch in step.micro_batches}
    full = T5.chunk_length(64)
    assert (T5.input_length(full), T5.target_length(full)) == (64, 14)
    assert (64, 16 if compile else 14) in widths
    assert all(inputs % 8 == 0 and targets % 8 == 0 for inputs, targets in widths) == compile


def step_tokens_are_the_labels(steps) -> bool:
    return all(step.step_tokens == sum(int((b.labels != LABEL_PAD).sum()) for b in step.micro_batches)
               for step in steps)


def test_padding_efficiency_on_the_sample_rows_is_above_0_99(tmp_path):
    from model.tokenizer import train_tokenizer

    documents = [f"{p}\n{r}" for p, r in zip(*sample_rows())]
    path = write_text_parquet(tmp_path / "documents.parquet", documents, row_group_size=500)
    tokenizer = train_tokenizer(path, tmp_path / "tokenizer", vocab_size=4000, text_column="text")
    dataset = packed(str(path), tokenizer, max_seq_len=192, batch_size=32, buffer_size=5000,
                     counts_dir=str(tmp_path / "counts"))
    real = padded = 0
    for step in dataset:
        for batch in step.micro_batches:
            real += batch.real_tokens
            padded += batch.input_ids.numel() + batch.labels.numel()
    assert real / padded >= 0.99


def test_resuming_at_a_step_yields_exactly_the_following_batches(dataset_factory):
    make, _, _ = dataset_factory
    whole = make(gradient_accumulation_steps=2)
    whole.set_epoch(1)
    steps = list(whole)
    resumed = make(gradient_accumulation_steps=2)
    resumed.seek(1, steps[6].end_sample, resumed.spec.global_batch_size)
    for expected, got in zip(steps[7:], list(resumed), strict=True):
        for a, b in zip(expected.micro_batches, got.micro_batches, strict=True):
            assert all(torch.equal(x, y) for x, y in zip(a.as_dict().values(), b.as_dict().values()))


def test_two_ranks_see_the_micro_batches_of_one_rank_accumulating_two(dataset_factory):
    make, _, _ = dataset_factory
    single = list(make(gradient_accumulation_steps=2))
    ranks = [list(make(rank=r, world_size=2)) for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1])
    for one, *two in zip(single, *ranks):
        assert [s.step_tokens for s in two] == [one.step_tokens] * 2
        for mine, theirs in zip(one.micro_batches, [two[0].micro_batches[0], two[1].micro_batches[0]]):
            assert torch.equal(mine.input_ids, theirs.input_ids) and torch.equal(mine.labels, theirs.labels)


def test_each_epoch_orders_and_masks_differently_and_repeats_for_the_same_seed(dataset_factory):
    make, _, _ = dataset_factory
    first = [b.input_ids for s in make() for b in s.micro_batches]
    again = [b.input_ids for s in make() for b in s.micro_batches]
    other = make()
    other.set_epoch(1)
    second = [b.input_ids for s in other for b in s.micro_batches]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, second))


def test_dataloader_workers_yield_the_same_steps_as_the_main_process(dataset_factory):
    make, _, _ = dataset_factory
    in_process = list(DataLoader(make(), batch_size=None, num_workers=0))
    with_workers = list(DataLoader(make(), batch_size=None, num_workers=2))
    assert [s.end_sample for s in in_process] == [s.end_sample for s in with_workers]
    assert all(torch.equal(a.micro_batches[0].labels, b.micro_batches[0].labels)
               for a, b in zip(in_process, with_workers))


def test_token_counts_are_kept_and_counted_again_only_for_another_file(dataset_factory, tmp_path):
    make, tokenizer, _ = dataset_factory
    make()
    counts = sorted(os.listdir(tmp_path / "counts"))
    make(max_seq_len=100)  # other chunks of the same documents: the same counts
    assert sorted(os.listdir(tmp_path / "counts")) == counts
    other = write_text_parquet(tmp_path / "other.parquet", raw_documents(100, seed=9))
    packed(str(other), tokenizer, counts_dir=str(tmp_path / "counts"))
    assert len(os.listdir(tmp_path / "counts")) == len(counts) + 1


def test_a_window_whose_file_changed_after_counting_names_the_file(dataset_factory, tmp_path):
    _, tokenizer, _ = dataset_factory
    path = tmp_path / "corpus.parquet"
    write_text_parquet(path, raw_documents(100, seed=4))
    stat = os.stat(path)
    dataset = packed(str(path), tokenizer, counts_dir=str(tmp_path / "counts"))
    write_text_parquet(path, [d if i % 7 else "改" for i, d in enumerate(raw_documents(100, seed=4))])
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(UnreadableData, match="its counts say") as error:
        list(dataset)
    assert str(path) in str(error.value)


# ---------------------------------------------------------------- the real CLI

def span_run_flags(tmp_path, text_task, **overrides) -> dict:
    """A seconds-long span corruption run on the raw-text task, with a tiny model, in fp32."""
    data, tokenizer_dir = text_task
    flags = dict(data, tokenizer_dir=tokenizer_dir, output_dir=str(tmp_path / "out"), log_dir=str(tmp_path / "logs"),
                 objective="span_corruption", max_seq_len=32, batch_size_per_gpu=8, gradient_accumulation_steps=1,
                 dataloader_buffer_size=64, learn_rate=1e-4, warmup_steps=4, epochs=2, save_steps=10,
                 logging_steps=1, eval_max_samples=16, eval_batch_size=8, keep_latest_n_ckp=2, mixed_precision="no",
                 num_workers=0, seed=7, **TINY_MODEL)
    flags.update(overrides)
    return flags


@pytest.mark.slow
def test_a_span_corruption_run_with_a_new_tokenizer_learns_and_ranks_its_best_models_by_eval_loss(tmp_path,
                                                                                                   text_task):
    flags = span_run_flags(tmp_path, text_task, tokenizer_dir=str(tmp_path / "new_tokenizer"), vocab_size=500,
                           epochs=3, learn_rate=1e-3)
    result = run_cli("train", flags)
    assert len(sentinels_of(load_tokenizer(flags["tokenizer_dir"]))) == 100
    assert "counting the tokens of every document" in result.stdout and "packed into" in result.stdout
    evals = read_metrics(flags["output_dir"], "eval")
    assert evals and all("bleu4" not in r for r in evals)
    # Far below a guess over the vocabulary (ln 500 = 6.2), and still falling after the first evaluation.
    assert evals[-1]["eval_loss"] < min(0.7 * math.log(500), evals[0]["eval_loss"] - 0.2)
    with open(os.path.join(flags["output_dir"], "checkpoints.json")) as listed:
        checkpoints = json.load(listed)
    best_two = sorted(evals, key=lambda r: (r["eval_loss"], r["step"]))[:2]
    assert checkpoints["metric"] == "eval_loss"
    assert [e["step"] for e in checkpoints["best"]] == [r["step"] for r in best_two]
    assert sorted(os.listdir(os.path.join(flags["output_dir"], "best"))) == sorted(
        os.path.basename(e["path"]) for e in checkpoints["best"])


@pytest.mark.slow
def test_a_span_corruption_run_stopped_and_resumed_ends_bitwise_equal_to_an_uninterrupted_one(tmp_path, text_task):
    uninterrupted = span_run_flags(tmp_path / "whole", text_task)
    run_cli("train", uninterrupted)
    flags = span_run_flags(tmp_path / "resumed", text_task)
    run_cli("train", dict(flags, max_steps=9))  # inside epoch 0, off a save: the resume starts mid-window
    # The resume need not repeat the objective's flags: they come with the saved run.
    resume = {name: value for name, value in flags.items() if name not in ("objective", "text_column")}
    second = run_cli("train", dict(resume, is_keep_training=True, max_steps=0))
    assert "resumed from" in second.stdout and "counting the tokens" not in second.stdout
    assert_same_weights(final_weights(flags["output_dir"]), final_weights(uninterrupted["output_dir"]))

    def history(run: dict) -> list:
        return [(r["event"], r["step"], r.get("loss"), r.get("eval_loss")) for r in read_metrics(run["output_dir"])
                if r["event"] in ("train", "eval")]

    assert history(flags) == history(uninterrupted)


@pytest.mark.slow
def test_two_processes_equal_one_process_with_double_accumulation(tmp_path, text_task):
    # (On 2 ranks, rank 1 waits for the token counts rank 0 writes.)
    assert_two_ranks_equal_one_with_double_accumulation(
        lambda name, **overrides: span_run_flags(tmp_path / name, text_task, **overrides), steps=8)


def pairs_file(tmp_path) -> str:
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"prompt": ["问"] * 10, "response": ["答"] * 10}), path)
    return str(path)


@pytest.mark.parametrize("case,fragment", [
    ("no_text_column", "missing column 'text' (columns: prompt, response)"),
    ("validation_without_it", "--validation_file: "),
    ("tokenizer_without_sentinels", "has no sentinel tokens (<extra_id_0>, <extra_id_1>, ...)"),
    ("too_many_spans", "--max_seq_len=512: a chunk would have 255 noise spans, more than the 100 sentinel tokens"),
    ("noise_density", "--noise_density"),
])
def test_bad_span_corruption_settings_exit_2_with_one_line_naming_the_problem(tmp_path, text_task, task_tokenizer_dir,
                                                                              case, fragment):
    flags = span_run_flags(tmp_path, text_task)
    if case == "no_text_column":
        flags["train_file"] = pairs_file(tmp_path)
    elif case == "validation_without_it":
        flags["validation_file"] = pairs_file(tmp_path)
    elif case == "tokenizer_without_sentinels":
        flags["tokenizer_dir"] = task_tokenizer_dir
    elif case == "too_many_spans":
        flags.update(tokenizer_dir=str(tmp_path / "none_yet"), max_seq_len=512, noise_density=0.5,
                     mean_noise_span_length=1.0)
    elif case == "noise_density":
        flags["noise_density"] = 0.9
    result = run_cli("train", flags, check=False)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and fragment in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not os.path.exists(flags["output_dir"])


def test_train_tokenizer_on_a_missing_text_column_exits_2_naming_it(tmp_path, text_task):
    result = run_cli("train_tokenizer", {"train_file": text_task[0]["train_file"], "text_column": "body",
                                         "tokenizer_dir": str(tmp_path / "tokenizer"), "vocab_size": 500},
                     check=False)
    assert result.returncode == 2 and "missing column 'body'" in result.stderr and "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def stopped_span_run(tmp_path_factory, text_task):
    flags = span_run_flags(tmp_path_factory.mktemp("stopped"), text_task, max_steps=3)
    run_cli("train", flags)
    return flags


@pytest.mark.slow
@pytest.mark.parametrize("change,fragment", [
    (dict(objective="seq2seq"), "--objective: the saved run has 'span_corruption', this one 'seq2seq'"),
    (dict(max_seq_len=48), "--max_seq_len: the saved run has 32, this one 48 (it cuts the documents into other "
                           "chunks)"),
    (dict(noise_density=0.3), "--noise_density: the saved run has 0.15, this one 0.3"),
    ("other_documents", "the saved run's epochs had"),
])
def test_a_span_corruption_run_resumes_only_on_the_same_chunks(stopped_span_run, tmp_path, change, fragment):
    if change == "other_documents":
        change = {"train_file": str(write_text_parquet(tmp_path / "other.parquet", raw_documents(300, seed=8)))}
    result = run_cli("train", dict(stopped_span_run, is_keep_training=True, **change), check=False)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and fragment in errors[0], result.stderr[-2000:]


def test_a_non_finite_eval_loss_ranks_below_every_finite_one():
    from training.best_models import BestModels

    best = BestModels(None, "unused", 3, None, metric="eval_loss")
    entries = [{"eval_loss": loss, "step": step} for step, loss in ((1, float("nan")), (2, 3.0), (3, 2.0),
                                                                     (4, float("inf")))]
    assert [e["step"] for e in best.ranked(entries)] == [3, 2, 1, 4]


@pytest.mark.slow
def test_plan_estimates_the_chunks_then_counts_them_exactly_once_a_run_kept_the_token_counts(tmp_path, text_task):
    flags = span_run_flags(tmp_path, text_task, max_steps=1, max_seq_len=64)

    def plan() -> dict:
        return json.loads(run_cli("plan", dict(flags, json=True, probe=False)).stdout)

    before = plan()
    result = run_cli("train", flags)
    chunks = int(result.stdout.split(" chunks of ")[0].rsplit(" ", 1)[-1])
    after = plan()
    assert after["packing"]["chunks"] == chunks and after["packing"]["source"].startswith("token counts kept in")
    assert after["steps_per_epoch"] == math.ceil(chunks / 8) and after["objective"] == "span_corruption"
    # (398: the file's 400 documents less a null and an empty one)
    assert before["packing"]["source"].startswith("estimated from the first 398 documents")
    assert abs(before["packing"]["chunks"] - chunks) <= 0.05 * chunks
    # The decoder reads targets of a quarter of max_seq_len: far less memory than a seq2seq step of that length.
    pairs = json.loads(run_cli("plan", dict(flags, json=True, probe=False, objective="seq2seq",
                                            num_samples=1000)).stdout)
    assert after["activation_bytes"] < 0.7 * pairs["activation_bytes"]


def test_plan_of_packed_text_without_its_file_says_it_needs_one(tmp_path, text_task):
    flags = span_run_flags(tmp_path, text_task, num_samples=1000, train_file=str(tmp_path / "missing.parquet"))
    result = run_cli("plan", flags, check=False)
    assert result.returncode == 2 and "plan with a readable --train_file" in result.stderr


def test_the_documented_example_is_what_the_code_produces():
    import doctest

    import data_pipeline.span_corruption as module

    result = doctest.testmod(module)
    assert result.attempted >= 6 and result.failed == 0
