"""Reliability: bad input is one clear line per problem; kills, signals, divergence and OOM lose nothing."""
import io
import json
import logging
import os
import random
import signal
import subprocess
import threading
import time

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file

from tests.cli_helpers import (
    PATCHED_ENTRY,
    REPO,
    assert_same_weights,
    final_weights,
    make_task_data,
    read_metrics,
    run_cli,
    start_training,
    tiny_run_flags,
    trained_tiny_run,
    wait_for_line,
)
from tests.patched_cli import (EVAL_OOM_FROM_ROWS, OOM_FROM_ROWS, OOM_IN_BACKWARD_ON_RANK, OOM_IN_CLIPPING_AT_STEP,
                               OOM_IN_FORWARD_ON_RANK, SLOW_FORWARD, UNREADABLE_ON_RANK)
from training.checkpoint import BEST_DIR, STATE_DIR, complete_states
from training.signals import StopSignals
from utils.atomic import TMP_PREFIX

pytestmark = pytest.mark.slow


def assert_user_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.startswith("error: ")
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


# ---------------------------------------------------------------- bad input
def broken_inputs(directory) -> dict:
    """Each kind of bad file the pre-flight must name, made on disk."""
    directory = str(directory)
    paths = {name: os.path.join(directory, name) for name in
             ("text.parquet", "truncated.parquet", "no_response.parquet", "int_response.parquet", "empty.parquet")}
    with open(paths["text.parquet"], "w") as text:
        text.write("prompt,response\nhello,world\n")
    good = make_task_data(os.path.join(directory, "good"))["train_file"]
    with open(good, "rb") as source, open(paths["truncated.parquet"], "wb") as truncated:
        truncated.write(source.read()[:-200])
    pq.write_table(pa.table({"prompt": ["a", "b"]}), paths["no_response.parquet"])
    pq.write_table(pa.table({"prompt": ["a", "b"], "response": [1, 2]}), paths["int_response.parquet"])
    pq.write_table(pa.table({"prompt": ["a", "b"], "response": ["", ""]}), paths["empty.parquet"])
    return paths


@pytest.mark.parametrize("case,fragments", [
    ("missing", ["--train_file", "nowhere.parquet"]),
    ("directory", ["--train_file", "directory"]),
    ("text.parquet", ["--train_file", "text.parquet", "parquet"]),
    ("truncated.parquet", ["--train_file", "truncated.parquet"]),
    ("no_response.parquet", ["--train_file", "no_response.parquet", "response"]),
    ("int_response.parquet", ["--train_file", "int_response.parquet", "response"]),
    ("empty.parquet", ["--train_file", "empty.parquet", "no usable rows"]),
])
def test_a_bad_training_file_exits_2_naming_it_and_writes_nothing(tmp_path, task, case, fragments):
    data, tokenizer_dir = task
    files = broken_inputs(tmp_path)
    train_file = {"missing": str(tmp_path / "nowhere.parquet"), "directory": str(tmp_path)}.get(case, files.get(case))
    flags = tiny_run_flags(tmp_path / "run", tokenizer_dir, dict(data, train_file=train_file))
    assert_user_error(run_cli("train", flags, check=False), *fragments)
    assert not os.path.exists(flags["output_dir"])


def test_every_problem_is_reported_at_once_one_line_each(tmp_path, task):
    data, tokenizer_dir = task
    not_a_tokenizer = tmp_path / "tokenizer"
    not_a_tokenizer.mkdir()
    (not_a_tokenizer / "tokenizer.json").write_text("{not json")
    an_output_file = tmp_path / "taken"
    an_output_file.write_text("a file where the output directory should go")
    small_validation = make_task_data(tmp_path / "small", valid_rows=3)["validation_file"]
    flags = tiny_run_flags(tmp_path / "run", str(not_a_tokenizer), dict(
        train_file=str(tmp_path / "missing.parquet"), validation_file=small_validation),
        output_dir=str(an_output_file), eval_max_samples=16, eval_batch_size=8)
    result = run_cli("train", flags, check=False)
    assert_user_error(result, "--train_file", "--validation_file", "fewer than one evaluation batch",
                      "--tokenizer_dir", "--output_dir")
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("error: ") for line in lines)


def test_under_torchrun_each_problem_is_printed_once_not_once_per_rank(tmp_path, task):
    data, tokenizer_dir = task
    flags = tiny_run_flags(tmp_path, tokenizer_dir, dict(data, train_file=str(tmp_path / "missing.parquet")))
    result = run_cli("train", flags, nproc=2, check=False)
    assert result.returncode != 0
    assert [line for line in result.stderr.splitlines() if line.startswith("error: ")] == [
        f"error: --train_file: {tmp_path / 'missing.parquet'}: file not found"]
    assert not os.path.exists(flags["output_dir"])


def test_contradictory_settings_and_a_full_disk_are_caught_before_training(tmp_path, task):
    data, tokenizer_dir = task
    no_eval = tiny_run_flags(tmp_path, tokenizer_dir, data, eval_max_samples=0, keep_latest_n_ckp=5)
    assert_user_error(run_cli("train", no_eval, check=False), "--eval_max_samples=0", "--keep_latest_n_ckp")
    enormous = tiny_run_flags(tmp_path, tokenizer_dir, data, d_model=65536, d_ff=262144, num_layers=24,
                              num_decoder_layers=24)
    assert_user_error(run_cli("train", enormous, check=False), "--output_dir", "GB free")


def test_a_warmup_longer_than_the_run_is_a_warning_not_an_error(tmp_path, task):
    data, tokenizer_dir = task
    flags = tiny_run_flags(tmp_path, tokenizer_dir, data, warmup_steps=10_000, max_steps=1, eval_max_samples=0,
                           keep_latest_n_ckp=0)
    result = run_cli("train", flags)
    assert "--warmup_steps=10000 is not below the run's 64 steps" in result.stdout


# ---------------------------------------------------------------- crashes and signals
CRASH_RUN = dict(epochs=1, save_steps=1, logging_steps=1, eval_max_samples=4, eval_batch_size=4,
                 batch_size_per_gpu=4, gradient_accumulation_steps=2)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, task):
    return trained_tiny_run(tmp_path_factory.mktemp("uninterrupted"), task, **CRASH_RUN)


@pytest.mark.parametrize("seed", [1, 2])  # plus the kills aimed inside saves, below
def test_kill_9_at_random_instants_then_resume_ends_bitwise_identical(tmp_path, task, uninterrupted, seed):
    data, tokenizer_dir = task
    flags = tiny_run_flags(tmp_path, tokenizer_dir, data, **CRASH_RUN)
    rng = random.Random(seed)
    # Two crashes at random instants of the 32-step run (a state is saved after every step): a little after the
    # log line of a random step, the second one later than the first so that it falls in the resumed run.
    first = rng.randint(2, 14)
    for attempt, step in enumerate((first, rng.randint(first + 2, 30))):
        process = start_training(dict(flags, is_keep_training=attempt > 0))
        wait_for_line(process, f" INFO step {step}/")
        time.sleep(rng.uniform(0.0, 0.05))
        assert process.poll() is None, "the run ended before the kill: the test did not test anything"
        process.send_signal(signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL
        process.stdout.close()
    run_cli("train", dict(flags, is_keep_training=True))
    assert_same_weights(final_weights(flags["output_dir"]), final_weights(uninterrupted["output_dir"]))
    steps = [r["step"] for r in read_metrics(flags["output_dir"], "train")]
    assert steps == list(range(1, 33))


def kill_while_writing(process: subprocess.Popen, directory: str, prefix: str = TMP_PREFIX,
                       timeout: float = 120) -> bool:
    """SIGKILL `process` as soon as a save's temporary directory (named `prefix`...) shows up in `directory`.

    Returns whether the half-written directory was still there after the kill, i.e. the kill hit the save itself.
    """
    def writing() -> bool:
        return os.path.isdir(directory) and any(n.startswith(prefix) for n in os.listdir(directory))

    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if writing():
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.0005)
    process.wait()
    process.stdout.close()
    return writing()


@pytest.mark.parametrize("target", [STATE_DIR, BEST_DIR])
def test_kill_9_in_the_middle_of_a_save_then_resume_ends_bitwise_identical(tmp_path, task, uninterrupted, target):
    data, tokenizer_dir = task
    flags = tiny_run_flags(tmp_path, tokenizer_dir, data, **CRASH_RUN)
    # A kill inside the first save leaves no complete state: then the user starts over, as the error says.
    resumable = lambda: bool(complete_states(flags["output_dir"]))  # noqa: E731
    caught_mid_save = [kill_while_writing(start_training(dict(flags, is_keep_training=resumable())),
                                          os.path.join(flags["output_dir"], target))
                       for attempt in range(3)]
    assert any(caught_mid_save), "no kill landed inside a save; the test did not test anything"
    run_cli("train", dict(flags, is_keep_training=resumable()))
    assert_same_weights(final_weights(flags["output_dir"]), final_weights(uninterrupted["output_dir"]))
    with open(os.path.join(flags["output_dir"], "checkpoints.json"), encoding="utf-8") as listing:
        best = json.load(listing)["best"]
    with open(os.path.join(uninterrupted["output_dir"], "checkpoints.json"), encoding="utf-8") as listing:
        assert best == json.load(listing)["best"]
    assert sorted(os.listdir(os.path.join(flags["output_dir"], BEST_DIR))) == sorted(
        os.path.basename(entry["path"]) for entry in best)


def test_a_kill_after_a_new_best_model_but_before_its_state_is_saved_loses_no_best_model(tmp_path, task):
    data, tokenizer_dir = task
    common = dict(epochs=2, save_steps=4, eval_max_samples=16, eval_batch_size=16, keep_latest_n_ckp=1,
                  learn_rate=3e-4)
    reference = tiny_run_flags(tmp_path / "reference", tokenizer_dir, data, **common)
    run_cli("train", reference)
    scores = [(r["step"], r["bleu4"]) for r in read_metrics(reference["output_dir"], "eval")]
    # A step whose model displaces the single best one (an earlier model with a lower score exists).
    displacing = next(step for step, score in scores if any(s < score for t, s in scores if t < step))
    flags = tiny_run_flags(tmp_path / "killed", tokenizer_dir, data, **common)
    assert kill_while_writing(start_training(flags), os.path.join(flags["output_dir"], STATE_DIR),
                              prefix=f"{TMP_PREFIX}step-{displacing:08d}")
    # Resume only up to the step before the new best model: the old one must still be there and listed.
    run_cli("train", dict(flags, is_keep_training=True, max_steps=displacing - 1))
    with open(os.path.join(flags["output_dir"], "checkpoints.json"), encoding="utf-8") as listing:
        best = json.load(listing)["best"]
    assert len(best) == 1 and best[0]["step"] < displacing
    assert os.listdir(os.path.join(flags["output_dir"], BEST_DIR)) == [os.path.basename(best[0]["path"])]
    assert os.path.isfile(os.path.join(flags["output_dir"], best[0]["path"], "model.safetensors"))


def test_sigterm_to_one_rank_stops_both_in_step_with_a_state_to_resume(tmp_path, task):
    data, tokenizer_dir = task
    common = dict(CRASH_RUN, batch_size_per_gpu=4, gradient_accumulation_steps=1, save_steps=100,
                  eval_max_samples=0, keep_latest_n_ckp=0, dropout_rate=0.0)
    reference = tiny_run_flags(tmp_path / "reference", tokenizer_dir, data, **common)
    run_cli("train", reference, nproc=2)
    flags = tiny_run_flags(tmp_path / "stopped", tokenizer_dir, data, **common)
    launcher = start_training(flags, nproc=2)
    wait_for_line(launcher, "step 3/")
    workers = psutil.Process(launcher.pid).children(recursive=True)
    max(workers, key=lambda p: p.pid).send_signal(signal.SIGTERM)  # only one rank hears it
    output = launcher.communicate(timeout=120)[0]
    assert launcher.returncode == 0, output
    assert "stopped by a signal" in output
    stopped_at = max(r["step"] for r in read_metrics(flags["output_dir"], "train"))
    assert stopped_at < 32
    resumed = run_cli("train", dict(flags, is_keep_training=True), nproc=2)
    assert f"step {stopped_at}, epoch 0" in resumed.stdout
    assert_same_weights(final_weights(flags["output_dir"]), final_weights(reference["output_dir"]), rtol=1e-6,
                        atol=1e-8)


def test_a_data_file_that_breaks_mid_run_is_reported_by_the_rank_that_read_it(tmp_path, task):
    data, tokenizer_dir = task
    train_file = tmp_path / "train.parquet"
    train_file.write_bytes(open(data["train_file"], "rb").read())
    flags = tiny_run_flags(tmp_path, tokenizer_dir, dict(data, train_file=str(train_file)), dataloader_buffer_size=64,
                           eval_max_samples=0, keep_latest_n_ckp=0, save_steps=100)
    launcher = start_training(flags, nproc=2)
    wait_for_line(launcher, "step 1/")
    with open(train_file, "r+b") as broken:  # the rows of the later windows are gone
        broken.truncate(train_file.stat().st_size // 3)
    output = launcher.communicate(timeout=120)[0]  # no rank waits for the others until the 30-minute timeout
    assert launcher.returncode != 0
    assert f"] {train_file}: cannot read row group" in output and "error: [rank " in output
    assert 'File "' + REPO not in output


def test_a_rank_left_waiting_for_one_whose_data_broke_says_so_in_one_line_without_a_traceback(tmp_path, task):
    data, tokenizer_dir = task
    flags = tiny_run_flags(tmp_path, tokenizer_dir, data, eval_max_samples=0, keep_latest_n_ckp=0, save_steps=100)
    launcher = start_training(flags, nproc=2, entry=PATCHED_ENTRY, env={UNREADABLE_ON_RANK: "1:5"})
    output = launcher.communicate(timeout=120)[0]
    assert launcher.returncode != 0
    assert "error: [rank 1] test: rank 1 cannot read the rows of step 5" in output
    assert ("error: [rank 0] another process stopped (its error says why) while this one waited for it in a "
            "collective") in output
    assert 'File "' + REPO not in output


def test_ctrl_c_saves_a_resumable_state_and_exits_cleanly(tmp_path, task, uninterrupted):
    data, tokenizer_dir = task
    flags = tiny_run_flags(tmp_path, tokenizer_dir, data, **CRASH_RUN)
    process = start_training(flags)
    wait_for_line(process, "step 3/")
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0 and "SIGINT received" in output and "stopped by a signal" in output
    assert "Traceback" not in output
    run_cli("train", dict(flags, is_keep_training=True))
    assert_same_weights(final_weights(flags["output_dir"]), final_weights(uninterrupted["output_dir"]))


SLOW_STEPS = {SLOW_FORWARD: 0.5}  # each micro-batch's forward takes half a second longer: steps of about 1 s


def test_ctrl_c_stops_after_the_step_in_progress(tmp_path, task):
    data, tokenizer_dir = task
    flags = tiny_run_flags(tmp_path, tokenizer_dir, data, **dict(CRASH_RUN, save_steps=100))
    process = start_training(flags, entry=PATCHED_ENTRY, env=SLOW_STEPS)
    wait_for_line(process, "step 3/")  # step 3 is done: step 4 is in progress
    time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0 and "after the step in progress" in output
    assert "stopped by a signal at step 4" in output
    assert [r["step"] for r in read_metrics(flags["output_dir"], "train")] == [1, 2, 3, 4]


def test_ctrl_c_in_a_terminal_with_dataloader_workers_is_announced_once_and_their_memory_is_logged(tmp_path, task):
    data, tokenizer_dir = task
    flags = tiny_run_flags(tmp_path, tokenizer_dir, data, **dict(CRASH_RUN, save_steps=100, num_workers=2,
                                                                  memory_log_steps=1))
    process = start_training(flags, entry=PATCHED_ENTRY, env=SLOW_STEPS, own_group=True)
    wait_for_line(process, "step 3/")
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C does: the run and both workers get it
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0 and output.count("SIGINT received") == 1, output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    workers = [r["workers_uss_mb"] for r in read_metrics(flags["output_dir"], "memory")]
    assert workers and min(workers) > 10  # two worker processes, each tens of MB of its own


def test_a_second_ctrl_c_ends_the_run_at_once_with_one_line(tmp_path, task):
    data, tokenizer_dir = task
    flags = tiny_run_flags(tmp_path, tokenizer_dir, data, **dict(CRASH_RUN, save_steps=100))
    process = start_training(flags, entry=PATCHED_ENTRY, env=SLOW_STEPS)
    wait_for_line(process, "step 2/")
    process.send_signal(signal.SIGINT)
    time.sleep(0.2)
    started = time.time()
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=60)[0]
    assert process.returncode == 130 and time.time() - started < 5
    assert "Traceback" not in output and output.count("error: ") == 1
    assert "error: a second Ctrl-C: stopped at once" in output


def test_ctrl_c_while_the_tokens_are_counted_ends_with_one_line_and_leaves_no_partial_counts(tmp_path, text_task):
    from tests.conftest import raw_documents, write_text_parquet

    data, tokenizer_dir = text_task
    corpus = write_text_parquet(tmp_path / "corpus.parquet", raw_documents(1000, seed=5) * 300, row_group_size=5000)
    flags = tiny_run_flags(tmp_path, tokenizer_dir, dict(data, train_file=str(corpus)), objective="span_corruption",
                           max_seq_len=32)
    process = start_training(flags)
    wait_for_line(process, "counting the tokens of every document")
    time.sleep(1)
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=60)[0]
    assert process.returncode == 130 and "Traceback" not in output
    assert [line for line in output.splitlines() if line.startswith("error:")] == ["error: interrupted (Ctrl-C)"]
    assert os.listdir(os.path.join(flags["output_dir"], "token_counts")) == []  # no count, whole or partial


class SignalledWhileWriting(io.RawIOBase):
    """A log file whose first write is interrupted by Ctrl-C: Python runs the handler right there, inside the
    buffered writer's flush (what a write(2) interrupted by the signal does in a real run)."""

    def __init__(self):
        super().__init__()
        self.written = bytearray()

    def writable(self):
        return True

    def write(self, data):
        if not self.written:
            signal.raise_signal(signal.SIGINT)
        self.written += data
        return len(data)


def test_ctrl_c_while_a_log_line_is_being_written_is_announced_without_a_logging_error(monkeypatch, capsys):
    raw = SignalledWhileWriting()
    handler = logging.StreamHandler(io.TextIOWrapper(io.BufferedWriter(raw), encoding="utf-8"))
    monkeypatch.setattr(logging.getLogger("trainer"), "handlers", [handler])
    signals = StopSignals()
    try:
        logging.getLogger("trainer").warning("step 7/100 epoch 0 | loss 3.2")
    finally:
        signals.restore()
    for thread in threading.enumerate():
        if thread is not threading.main_thread():
            thread.join(timeout=10)
    assert signals.is_requested()
    assert "Logging error" not in capsys.readouterr().err
    assert raw.written.decode().splitlines() == [
        "step 7/100 epoch 0 | loss 3.2",
        "SIGINT received: saving a resumable state after the step in progress, then exiting"]


# ---------------------------------------------------------------- divergence and out of memory
def test_a_diverging_run_stops_with_the_guards_message_and_keeps_a_loadable_state(tmp_path, task):
    data, tokenizer_dir = task
    flags = tiny_run_flags(tmp_path, tokenizer_dir, data, learn_rate=1e9, warmup_steps=0, max_grad_norm=0.0,
                           max_bad_steps=3, save_steps=1, eval_max_samples=0, keep_latest_n_ckp=0)
    result = run_cli("train", flags, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: training diverged: 3 consecutive steps" in result.stderr
    assert "skipped" in result.stdout
    state_root = os.path.join(flags["output_dir"], "state")
    (state,) = os.listdir(state_root)
    weights = load_file(os.path.join(state_root, state, "model.safetensors"))
    assert all(tensor.isfinite().all() for tensor in weights.values())
    last_good = max(r["step"] for r in read_metrics(flags["output_dir"], "train") if r["loss"] is not None)
    assert state.startswith(f"step-{last_good:08d}")


def test_two_ranks_agree_to_skip_non_finite_steps_and_stop_together(tmp_path, task):
    data, tokenizer_dir = task
    flags = tiny_run_flags(tmp_path, tokenizer_dir, data, learn_rate=1e9, warmup_steps=0, max_grad_norm=0.0,
                           max_bad_steps=3, save_steps=1, eval_max_samples=0, keep_latest_n_ckp=0)
    result = run_cli("train", flags, nproc=2, check=False, timeout=180)
    assert result.returncode != 0
    # Rank 0 says why and exits 1; rank 1 exits 0, so the launcher has no reason to kill rank 0 before it speaks.
    assert "exitcode  : 1" in result.stderr and "exitcode  : -15" not in result.stderr
    assert "[rank 1]" not in result.stderr  # the other rank does not repeat the agreed warnings
    # Said once (by rank 0); torchrun then prints its own report of the failed ranks, but neither rank a traceback.
    assert result.stderr.count("error: training diverged: 3 consecutive steps") == 1
    assert 'File "' + REPO not in result.stderr
    records = read_metrics(flags["output_dir"], "train")
    skipped = [r["step"] for r in records if r["loss"] is None]
    assert len(skipped) == 3 and skipped == list(range(skipped[0], skipped[0] + 3))
    (state,) = os.listdir(os.path.join(flags["output_dir"], "state"))
    assert state.startswith(f"step-{skipped[0] - 1:08d}")


def test_simulated_oom_halves_the_micro_batch_and_matches_a_run_started_that_way(tmp_path, task):
    data, tokenizer_dir = task
    common = dict(max_steps=12, save_steps=6, eval_max_samples=0, keep_latest_n_ckp=0)
    recovered = tiny_run_flags(tmp_path / "recovered", tokenizer_dir, data, batch_size_per_gpu=8,
                               gradient_accumulation_steps=1, **common)
    halved = tiny_run_flags(tmp_path / "halved", tokenizer_dir, data, batch_size_per_gpu=4,
                            gradient_accumulation_steps=2, **common)
    result = run_cli("train", recovered, env={OOM_FROM_ROWS: 5}, entry=PATCHED_ENTRY)
    assert "retrying with batch_size_per_gpu=4, gradient_accumulation_steps=2" in result.stdout
    run_cli("train", halved)
    assert_same_weights(final_weights(recovered["output_dir"]), final_weights(halved["output_dir"]), rtol=1e-5,
                        atol=1e-7)
    resumed = run_cli("train", dict(recovered, is_keep_training=True, max_steps=14), env={OOM_FROM_ROWS: 5},
                      entry=PATCHED_ENTRY)
    assert "keeping batch_size_per_gpu=4, gradient_accumulation_steps=2" in resumed.stdout
    assert "retrying" not in resumed.stdout


def test_out_of_memory_in_one_ranks_forward_is_recovered_by_both_ranks_as_by_one(tmp_path, task):
    """Rank 1 runs out of memory in its last micro-batch's forward; it joins rank 0's gradient all-reduce with a
    stand-in batch, both learn it from the step's one transfer, drop the attempt, and halve their micro-batches."""
    data, tokenizer_dir = task
    common = dict(max_steps=6, save_steps=100, eval_max_samples=0, keep_latest_n_ckp=0, dropout_rate=0.0)
    recovered = tiny_run_flags(tmp_path / "recovered", tokenizer_dir, data, batch_size_per_gpu=8,
                               gradient_accumulation_steps=1, **common)
    halved = tiny_run_flags(tmp_path / "halved", tokenizer_dir, data, batch_size_per_gpu=4,
                            gradient_accumulation_steps=2, **common)
    result = run_cli("train", recovered, nproc=2, env={OOM_FROM_ROWS: 5, OOM_IN_FORWARD_ON_RANK: 1},
                     entry=PATCHED_ENTRY)
    assert result.stdout.count("retrying with batch_size_per_gpu=4, gradient_accumulation_steps=2") == 1
    run_cli("train", halved, nproc=2)
    assert_same_weights(final_weights(recovered["output_dir"]), final_weights(halved["output_dir"]), rtol=1e-5,
                        atol=1e-7)


def test_out_of_memory_while_clipping_is_recovered_like_any_other_in_the_step(tmp_path, task):
    data, tokenizer_dir = task
    flags = tiny_run_flags(tmp_path, tokenizer_dir, data, batch_size_per_gpu=8, max_steps=6, save_steps=100,
                           eval_max_samples=0, keep_latest_n_ckp=0)
    result = run_cli("train", flags, env={OOM_IN_CLIPPING_AT_STEP: 3}, entry=PATCHED_ENTRY)
    assert "out of GPU memory at step 3: retrying with batch_size_per_gpu=4, gradient_accumulation_steps=2" in \
        result.stdout
    assert [r["step"] for r in read_metrics(flags["output_dir"], "train")] == [1, 2, 3, 4, 5, 6]


def test_an_evaluation_out_of_memory_halves_its_batch_and_scores_every_row_alike(tmp_path, task):
    data, tokenizer_dir = task
    common = dict(max_steps=4, save_steps=2, eval_max_samples=32, keep_latest_n_ckp=1, dropout_rate=0.0)
    halving = tiny_run_flags(tmp_path / "halving", tokenizer_dir, data, eval_batch_size=16, **common)
    result = run_cli("train", halving, env={EVAL_OOM_FROM_ROWS: 9}, entry=PATCHED_ENTRY)
    assert result.stdout.count("evaluation ran out of GPU memory with a batch of 16 rows: going on with batches "
                               "of 8") == 1
    small = tiny_run_flags(tmp_path / "small", tokenizer_dir, data, eval_batch_size=8, **common)
    run_cli("train", small)
    ours, theirs = read_metrics(halving["output_dir"], "eval"), read_metrics(small["output_dir"], "eval")
    assert [(r["step"], r["bleu4"]) for r in ours] == [(r["step"], r["bleu4"]) for r in theirs] and len(ours) == 2
    assert [r["eval_loss"] for r in ours] == pytest.approx([r["eval_loss"] for r in theirs], rel=1e-6)


def test_out_of_memory_at_batch_1_stops_with_advice(tmp_path, task):
    data, tokenizer_dir = task
    flags = tiny_run_flags(tmp_path, tokenizer_dir, data, batch_size_per_gpu=2, max_steps=3, eval_max_samples=0,
                           keep_latest_n_ckp=0)
    result = run_cli("train", flags, env={OOM_FROM_ROWS: 1}, check=False, entry=PATCHED_ENTRY)
    assert result.returncode == 1 and "--max_seq_len" in result.stderr and "Traceback" not in result.stderr


def test_out_of_memory_inside_the_gradient_all_reduce_stops_promptly_with_the_flags_to_resume_with(tmp_path, task):
    data, tokenizer_dir = task
    flags = tiny_run_flags(tmp_path, tokenizer_dir, data, batch_size_per_gpu=8, max_steps=3, eval_max_samples=0,
                           keep_latest_n_ckp=0)
    started = time.time()
    result = run_cli("train", flags, nproc=2, check=False, timeout=150,
                     env={OOM_FROM_ROWS: 5, OOM_IN_BACKWARD_ON_RANK: 1}, entry=PATCHED_ENTRY)
    assert result.returncode != 0 and time.time() - started < 120  # not the 30-minute collective timeout
    assert ("error: [rank 1] out of GPU memory at step 1 with --batch_size_per_gpu=8, inside the last micro-batch's "
            "gradient all-reduce") in result.stderr
    assert "resume with --is_keep_training=True --batch_size_per_gpu=4 --gradient_accumulation_steps=2" in result.stderr


# ---------------------------------------------------------------- best-k bookkeeping
def test_checkpoints_json_holds_the_true_top_5_after_8_planted_scores(tmp_path, task_tokenizer_dir):
    from accelerate import Accelerator

    from config import T5ModelConfig
    from model.t5 import build_model
    from model.tokenizer import load_tokenizer
    from training.best_models import BestModels
    from training.state import TrainingState

    tokenizer = load_tokenizer(task_tokenizer_dir)
    model = build_model(T5ModelConfig(d_model=16, d_ff=16, num_heads=1, d_kv=8, num_layers=1,
                                      num_decoder_layers=1), tokenizer)
    best, state = BestModels(Accelerator(cpu=True), str(tmp_path), 5, tokenizer), TrainingState()
    for step, score in enumerate([0.1, 0.5, 0.3, 0.5, 0.05, 0.7, 0.3, 0.6], start=1):
        state.global_step = step
        best.consider(model, state, score)
        best.sync_disk(state.best)  # what the trainer does once the state that lists them is saved
    with open(tmp_path / "checkpoints.json", encoding="utf-8") as listing:
        kept = json.load(listing)["best"]
    # Equal scores keep the earlier model: step 7's 0.3 never displaces step 3's.
    assert [(e["step"], e["bleu4"]) for e in kept] == [(6, 0.7), (8, 0.6), (2, 0.5), (4, 0.5), (3, 0.3)]
    assert sorted(os.listdir(tmp_path / "best")) == [f"step-{s:08d}" for s in (2, 3, 4, 6, 8)]
    assert kept == state.best
