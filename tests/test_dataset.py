"""The prompt/response pipeline as training runs it (`PairDataset`, one step at a time): coverage, order, exact
resume, rank equivalence, truncation, bad data, workers; and the contract's `LowMemParquetDataset`, which hands the
same micro-batches out one by one."""

import itertools

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import write_parquet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from data_pipeline.pairs import PairDataset
from data_pipeline.windows import StreamSpec
from model.dataset import LowMemParquetDataset
from utils.errors import UserError

FILE_SIZES = (83, 57, 41)  # three files, several row groups each, 181 rows in all


def prompt_of(file_index, row):
    # The key before "：" identifies the row; the varying tail gives rows different lengths.
    return f"问{file_index}_{row}：" + "长" * (row * 7 % 23)


def response_of(file_index, row):
    return f"答{file_index}_{row}。" + "好" * (row * 5 % 31)


def write_corpus(directory, sizes=FILE_SIZES, row_group_size=10):
    paths = []
    for file_index, size in enumerate(sizes):
        path = directory / f"part{file_index}.parquet"
        write_parquet(path, [prompt_of(file_index, r) for r in range(size)],
                      [response_of(file_index, r) for r in range(size)], row_group_size=row_group_size)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


ALL_KEYS = sorted(f"{f}_{r}" for f, size in enumerate(FILE_SIZES) for r in range(size))


OPTIONS = dict(max_seq_len=64, batch_size=4, buffer_size=40, seed=0)


def make(paths, tokenizer, **overrides) -> PairDataset:
    return PairDataset(StreamSpec(paths, **{**OPTIONS, **overrides}), tokenizer)


def batches_of(steps) -> list[dict]:
    """The micro-batches of steps, in the order a rank trains on them, as dicts."""
    return [batch.as_dict() for step in steps for batch in step.micro_batches]


def keys_of(batch, tokenizer):
    """Row keys of a micro-batch, read back from its prompts; a dummy micro-batch has none."""
    if (batch["labels"] == -100).all():
        return []
    return [text[1:].split("：")[0] for text in tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)]


def same_batches(left, right):
    return len(left) == len(right) and all(
        a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(left, right))


def test_every_row_appears_once_per_epoch_whatever_the_world_size(corpus, tiny_tokenizer):
    for world_size in (1, 2, 3):
        seen = [key for rank in range(world_size)
                for batch in batches_of(make(corpus, tiny_tokenizer, rank=rank, world_size=world_size))
                for key in keys_of(batch, tiny_tokenizer)]
        assert sorted(seen) == ALL_KEYS, f"world_size={world_size}"


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=3), row_group_size=st.integers(1, 30),
       batch_size=st.integers(1, 6), buffer_size=st.integers(1, 50), world_size=st.integers(1, 3),
       accumulation=st.integers(1, 3))
def test_every_row_appears_once_for_any_layout(tmp_path_factory, tiny_tokenizer, sizes, row_group_size,
                                               batch_size, buffer_size, world_size, accumulation):
    paths = write_corpus(tmp_path_factory.mktemp("layout"), sizes, row_group_size)
    options = dict(batch_size=batch_size, buffer_size=buffer_size, world_size=world_size,
                   gradient_accumulation_steps=accumulation)
    per_rank = [list(make(paths, tiny_tokenizer, rank=rank, **options)) for rank in range(world_size)]
    assert [len(steps) for steps in per_rank] == [make(paths, tiny_tokenizer, **options).steps_per_epoch] * world_size
    assert all(len(step.micro_batches) == accumulation for steps in per_rank for step in steps)
    seen = [key for steps in per_rank for batch in batches_of(steps) for key in keys_of(batch, tiny_tokenizer)]
    assert sorted(seen) == sorted(f"{f}_{r}" for f, size in enumerate(sizes) for r in range(size))


def test_order_changes_with_epoch_and_seed_and_repeats_for_the_same_pair(corpus, tiny_tokenizer):
    def order(seed, epoch):
        dataset = make(corpus, tiny_tokenizer, seed=seed)
        dataset.set_epoch(epoch)
        return [key for batch in batches_of(dataset) for key in keys_of(batch, tiny_tokenizer)]

    assert order(0, 0) == order(0, 0)
    assert order(0, 1) == order(0, 1)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)


@pytest.mark.parametrize("accumulation, consumed", [(1, 7), (3, 3), (2, 0)])
def test_resume_after_k_steps_yields_exactly_the_following_steps(corpus, tiny_tokenizer, accumulation, consumed):
    reference = list(make(corpus, tiny_tokenizer, gradient_accumulation_steps=accumulation))
    first = make(corpus, tiny_tokenizer, gradient_accumulation_steps=accumulation)
    iterator = iter(first)
    for _ in range(consumed):
        next(iterator)
    resumed = make(corpus, tiny_tokenizer, gradient_accumulation_steps=accumulation)
    resumed.load_state_dict(first.state_dict())
    assert same_batches(batches_of(resumed), batches_of(reference[consumed:]))
    # What the trainer does: seek to the position its state holds (the end of the step it took last).
    sought = make(corpus, tiny_tokenizer, gradient_accumulation_steps=accumulation)
    if consumed:
        sought.seek(0, reference[consumed - 1].end_sample, 4 * accumulation)
    assert same_batches(batches_of(sought), batches_of(reference[consumed:]))


def test_a_row_group_far_larger_than_a_window_is_streamed_and_resumable(tmp_path, tiny_tokenizer):
    # One 300-row row group and 40-row windows: windows continue one stream; a resume starts a new one.
    path = write_parquet(tmp_path / "one_group.parquet", [prompt_of(0, r) for r in range(300)],
                         [response_of(0, r) for r in range(300)])
    reference = batches_of(make(path, tiny_tokenizer))
    assert sorted(key for batch in reference for key in keys_of(batch, tiny_tokenizer)) == sorted(
        f"0_{r}" for r in range(300))
    resumed = make(path, tiny_tokenizer)
    resumed.load_state_dict(resumed.state_at(0, 4 * 50))
    assert same_batches(batches_of(resumed), reference[50:])


def test_keeping_files_open_gives_the_same_batches_as_ultra_low_memory(corpus, tiny_tokenizer):
    assert same_batches(batches_of(make(corpus, tiny_tokenizer, ultra_low_mem=False)),
                        batches_of(make(corpus, tiny_tokenizer)))


def test_large_string_columns_mix_with_string_columns(tmp_path, corpus, tiny_tokenizer):
    large = tmp_path / "large.parquet"
    pq.write_table(pa.table({"prompt": pa.array(["问9_0：", "问9_1："], pa.large_string()),
                             "response": pa.array(["答", "答"], pa.large_string())}), large)
    seen = [key for batch in batches_of(make([*corpus, large], tiny_tokenizer)) for key in keys_of(batch, tiny_tokenizer)]
    assert sorted(seen) == sorted(ALL_KEYS + ["9_0", "9_1"])


def test_state_after_a_full_epoch_points_at_the_start_of_the_next(corpus, tiny_tokenizer):
    dataset = make(corpus, tiny_tokenizer)
    dataset.set_epoch(4)
    for _ in dataset:
        pass
    assert dataset.state_dict()["epoch"] == 5 and dataset.state_dict()["sample"] == 0
    expected = make(corpus, tiny_tokenizer)
    expected.set_epoch(5)
    assert same_batches(batches_of(dataset), batches_of(expected))


def test_resume_on_another_world_size_continues_without_loss_or_duplication(corpus, tiny_tokenizer):
    before = [make(corpus, tiny_tokenizer, rank=rank, world_size=2) for rank in range(2)]
    seen = []
    for dataset in before:
        seen += [key for batch in batches_of(itertools.islice(dataset, 5)) for key in keys_of(batch, tiny_tokenizer)]
    state = before[0].state_dict()
    assert state["sample"] == 5 * 8
    for rank in range(3):
        after = make(corpus, tiny_tokenizer, rank=rank, world_size=3)
        after.load_state_dict(state)
        seen += [key for batch in batches_of(after) for key in keys_of(batch, tiny_tokenizer)]
    assert sorted(seen) == ALL_KEYS


def test_two_ranks_see_the_micro_batches_of_one_rank_accumulating_two(corpus, tiny_tokenizer):
    single = batches_of(make(corpus, tiny_tokenizer, gradient_accumulation_steps=2))
    rank0, rank1 = (batches_of(make(corpus, tiny_tokenizer, rank=rank, world_size=2)) for rank in range(2))
    assert same_batches(single[0::2], rank0) and same_batches(single[1::2], rank1)


def test_truncation_is_by_tokens_and_keeps_eos_last(tmp_path, tiny_tokenizer):
    prompts = [f"问{i}：" + "很长的问题" * 40 for i in range(6)]
    responses = ["很长的回答" * 40 + str(i) for i in range(6)]
    path = write_parquet(tmp_path / "long.parquet", prompts, responses)
    eos = tiny_tokenizer.eos_token_id
    batches = batches_of(make(path, tiny_tokenizer, max_seq_len=16))
    expected = {tuple(tiny_tokenizer(p).input_ids[:15] + [eos]) for p in prompts}
    assert {tuple(row.tolist()) for batch in batches for row in batch["input_ids"]} == expected
    for batch in batches:
        assert batch["input_ids"].shape[1] <= 16 and batch["labels"].shape[1] <= 16
        assert (batch["input_ids"][:, -1] == eos).all() and (batch["labels"][:, -1] == eos).all()


def test_padding_is_pad_in_inputs_and_minus_100_in_labels(corpus, tiny_tokenizer):
    for batch in batches_of(make(corpus, tiny_tokenizer, batch_size=8)):
        assert set(batch) == {"input_ids", "attention_mask", "labels"}
        assert all(tensor.dtype == torch.long for tensor in batch.values())
        padding = batch["attention_mask"] == 0
        assert (batch["input_ids"][padding] == tiny_tokenizer.pad_token_id).all()
        prompt_lengths = batch["attention_mask"].sum(1)
        assert (batch["input_ids"][torch.arange(len(prompt_lengths)), prompt_lengths - 1]
                == tiny_tokenizer.eos_token_id).all()
        label_lengths = (batch["labels"] != -100).sum(1)
        assert ((batch["labels"] != -100) == (torch.arange(batch["labels"].shape[1]) < label_lengths[:, None])).all()


def test_length_grouping_keeps_padding_low(tmp_path, tiny_tokenizer):
    # Independent uniform prompt and response lengths: random batches of 16 would be about 55% real tokens.
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, size=(400, 2))
    path = write_parquet(tmp_path / "mixed.parquet", [f"问{i}" + "长" * a for i, (a, _) in enumerate(lengths)],
                         ["答" + "好" * b for _, b in lengths])
    real = padded = 0
    for batch in batches_of(make(path, tiny_tokenizer, batch_size=16, buffer_size=400)):
        real += int(batch["attention_mask"].sum() + (batch["labels"] != -100).sum())
        padded += batch["input_ids"].numel() + batch["labels"].numel()
    assert real / padded > 0.8


def test_tail_step_gives_every_rank_the_same_count_with_empty_dummies(tmp_path, tiny_tokenizer):
    # 3 ranks × 2 micro-steps × 4 rows = 24 rows a step; 52 rows leave a 4-row tail for 6 micro-batches.
    path = write_parquet(tmp_path / "tail.parquet", [f"问0_{i}：" for i in range(52)], [f"答{i}" for i in range(52)])
    per_rank = [batches_of(make(path, tiny_tokenizer, rank=rank, world_size=3, gradient_accumulation_steps=2))
                for rank in range(3)]
    assert [len(batches) for batches in per_rank] == [6, 6, 6] == [2 * make(path, tiny_tokenizer, world_size=3,
                                                                             gradient_accumulation_steps=2).steps_per_epoch] * 3
    tails = [batch for batches in per_rank for batch in batches[-2:]]
    dummies = [batch for batch in tails if (batch["labels"] == -100).all()]
    assert len(dummies) == 2 and all(batch["input_ids"].tolist() == [[tiny_tokenizer.eos_token_id]]
                                     for batch in dummies)
    assert sum(len(batch["input_ids"]) for batch in tails) - len(dummies) == 4


def test_step_mode_reports_position_and_the_label_tokens_of_all_ranks(corpus, tiny_tokenizer):
    per_rank = [list(make(corpus, tiny_tokenizer, rank=rank, world_size=2, gradient_accumulation_steps=2))
                for rank in range(2)]
    steps = len(per_rank[0])
    assert steps == len(per_rank[1]) == make(corpus, tiny_tokenizer, world_size=2,
                                             gradient_accumulation_steps=2).steps_per_epoch == -(-181 // 16)
    for index, (item0, item1) in enumerate(zip(*per_rank)):
        labels = [batch["labels"] for batch in batches_of((item0, item1))]
        assert item0.step_tokens == item1.step_tokens == sum(int((lab != -100).sum()) for lab in labels)
        assert item0.end_sample == min((index + 1) * 16, 181) and item0.epoch == 0
        assert len(item0.micro_batches) == 2


def test_null_and_empty_rows_are_skipped_and_counted(tmp_path, tiny_tokenizer):
    prompts = [f"问0_{i}：" if i % 5 else None for i in range(30)]
    responses = [f"答{i}" if i % 7 else "" for i in range(30)]
    path = write_parquet(tmp_path / "holes.parquet", prompts, responses, row_group_size=8)
    dataset = make(path, tiny_tokenizer)
    steps = list(dataset)
    kept = [key for batch in batches_of(steps) for key in keys_of(batch, tiny_tokenizer)]
    usable = [f"0_{i}" for i in range(30) if i % 5 and i % 7]
    assert sorted(kept) == sorted(usable)
    assert dataset.skipped_rows == sum(step.skipped for step in steps) == 30 - len(usable)


def test_dataloader_workers_yield_the_same_sequence_as_the_main_process(corpus, tiny_tokenizer):
    # Two datasets: iterating in the main process moves its position on to the next epoch.
    dataset, twin = (make(corpus, tiny_tokenizer, gradient_accumulation_steps=3) for _ in range(2))
    in_process = list(DataLoader(dataset, batch_size=None, num_workers=0))
    with_workers = list(DataLoader(twin, batch_size=None, num_workers=2))
    assert [s.end_sample for s in in_process] == [s.end_sample for s in with_workers]
    assert len(in_process) == len(dataset) == dataset.steps_per_epoch
    assert same_batches(batches_of(in_process), batches_of(with_workers))


def write_table(path, table):
    pq.write_table(table, path)
    return path


def write_bytes(path, data):
    path.write_bytes(data)
    return path


def write_truncated(directory):
    whole = write_parquet(directory / "whole.parquet", ["问"] * 50, ["答"] * 50).read_bytes()
    return write_bytes(directory / "cut.parquet", whole[:-30])


# problem → (writes the bad input into a directory and returns its path, words the error must contain)
BAD_INPUTS = {
    "missing file": (lambda d: d / "absent.parquet", ["not found"]),
    "directory": (lambda d: d, ["directory"]),
    "not parquet": (lambda d: write_bytes(d / "notes.parquet", b"just some text\n" * 20), ["parquet"]),
    "truncated": (write_truncated, ["parquet"]),
    "missing column": (lambda d: write_table(d / "nocol.parquet", pa.table({"prompt": ["问"], "answer": ["答"]})),
                       ["response"]),
    "non-string column": (lambda d: write_table(d / "ints.parquet", pa.table({"prompt": ["问"], "response": [3]})),
                          ["response"]),
    "no usable rows": (lambda d: write_parquet(d / "blank.parquet", ["问", "问"], ["", None]), ["no usable rows"]),
    "only empty files": (lambda d: write_parquet(d / "empty.parquet", [], []), ["no usable rows"]),
}


@pytest.mark.parametrize("problem", BAD_INPUTS)
def test_bad_data_raises_a_user_error_naming_the_file(tmp_path, tiny_tokenizer, problem):
    write_bad_input, expected_words = BAD_INPUTS[problem]
    path = write_bad_input(tmp_path)
    with pytest.raises(UserError) as raised:
        make(path, tiny_tokenizer)
    assert str(path) in str(raised.value) and all(word in str(raised.value) for word in expected_words)


def test_corrupt_data_pages_pass_the_footer_check_and_fail_naming_the_file_when_read(tmp_path, tiny_tokenizer):
    path = tmp_path / "corrupt.parquet"
    pq.write_table(pa.table({"prompt": [f"问{i}" for i in range(200)], "response": ["答"] * 200}), path,
                   compression="none")
    data = bytearray(path.read_bytes())
    data[4:400] = b"\xff" * 396  # the first data pages; the footer at the end stays intact
    path.write_bytes(bytes(data))
    dataset = make(path, tiny_tokenizer)
    with pytest.raises(UserError, match="corrupt.parquet"):
        list(dataset)


# ---------------------------------------------------------------- the contract's dataset


def contract_dataset(paths, tokenizer, **overrides) -> LowMemParquetDataset:
    """As users' scripts build it (the interface contract's signature)."""
    return LowMemParquetDataset(paths, tokenizer, **{**OPTIONS, **overrides})


def test_the_contracts_dataset_yields_the_pipelines_micro_batches_one_by_one_as_dicts(corpus, tiny_tokenizer):
    dataset = contract_dataset(corpus, tiny_tokenizer, gradient_accumulation_steps=3)
    dataset.set_epoch(1)
    batches = list(dataset)
    steps = make(corpus, tiny_tokenizer, gradient_accumulation_steps=3)
    steps.set_epoch(1)
    assert same_batches(batches, batches_of(steps)) and len(batches) == len(dataset) == 3 * steps.steps_per_epoch
    assert all(set(batch) == {"input_ids", "attention_mask", "labels"} and
               all(tensor.dtype == torch.long for tensor in batch.values()) for batch in batches)


@pytest.mark.parametrize("accumulation, consumed", [(1, 7), (3, 7), (3, 9), (2, 0)])
def test_the_contracts_dataset_resumes_after_any_micro_batch_with_exactly_the_following_ones(
        corpus, tiny_tokenizer, accumulation, consumed):
    reference = list(contract_dataset(corpus, tiny_tokenizer, gradient_accumulation_steps=accumulation))
    first = contract_dataset(corpus, tiny_tokenizer, gradient_accumulation_steps=accumulation)
    iterator = iter(first)
    for _ in range(consumed):
        next(iterator)
    resumed = contract_dataset(corpus, tiny_tokenizer, gradient_accumulation_steps=accumulation)
    resumed.load_state_dict(first.state_dict())
    resumed.set_epoch(0)  # a resumed script may call it: the position stays where it was loaded
    assert same_batches(list(resumed), reference[consumed:])
    assert resumed.state_dict()["epoch"] == 1 and resumed.state_dict()["micro"] == 0


def test_a_glob_that_matches_nothing_is_a_user_error(tmp_path, tiny_tokenizer):
    with pytest.raises(UserError, match="no file matches"):
        make(str(tmp_path / "*.parquet"), tiny_tokenizer)
