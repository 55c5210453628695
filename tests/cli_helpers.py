"""Running the real CLI in subprocesses, with tiny models, and reading what a run leaves behind."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from commands.demo import write_demo_parquet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY = os.path.join(REPO, "train_low_mem.py")
# The same CLI with faults patched in from outside (see tests/patched_cli.py).
PATCHED_ENTRY = os.path.join(REPO, "tests", "patched_cli.py")
# A model small enough for a CPU test step to take milliseconds (d_model 32, one layer each side).
TINY_MODEL = dict(d_model=32, d_ff=64, num_heads=2, d_kv=16, num_layers=1, num_decoder_layers=1)


def child_env(**extra) -> dict:
    """One thread per process: two ranks share the CI machine's 2 cores, and runs stay reproducible."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=REPO)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def as_flags(flags: dict) -> list[str]:
    return [f"--{name}={value}" for name, value in flags.items()]


def free_port() -> int:
    """A port no process listens on now: tests may run side by side (pytest -n 2), each launch needs its own."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_cli(command: str, flags: dict, nproc: int = 1, env: dict | None = None, timeout: int = 300,
            check: bool = True, entry: str = ENTRY) -> subprocess.CompletedProcess:
    """`python train_low_mem.py COMMAND --flags` (or under torchrun with `nproc` CPU ranks, gloo)."""
    if nproc == 1:
        launcher = [sys.executable, entry]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                    "--master_port", str(free_port()), entry]
    result = subprocess.run(launcher + [command] + as_flags(flags), capture_output=True, text=True,
                            cwd=REPO, env=child_env(ACCELERATE_USE_CPU="true", **(env or {})), timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\n"
                             f"stderr:\n{result.stderr[-5000:]}")
    return result


def run_cli_raw(argv: list[str], timeout: int = 120, entry: str = ENTRY, env: dict | None = None
                ) -> subprocess.CompletedProcess:
    """The CLI exactly as typed: `python train_low_mem.py ARGV...`."""
    return subprocess.run([sys.executable, entry] + argv, capture_output=True, text=True, cwd=REPO,
                          env=child_env(**(env or {})), timeout=timeout)


def make_task_data(directory, train_rows: int = 256, valid_rows: int = 32) -> dict:
    """A learnable task (copy / reverse / double a Chinese phrase) as train and validation parquet files."""
    directory = str(directory)
    return {"train_file": write_demo_parquet(os.path.join(directory, "train.parquet"), train_rows, seed=1,
                                             row_group_size=64),
            "validation_file": write_demo_parquet(os.path.join(directory, "valid.parquet"), valid_rows, seed=2)}


def tiny_run_flags(tmp_path, tokenizer_dir: str, data: dict, **overrides) -> dict:
    """Flags of a seconds-long CPU run: tiny model, fp32, frequent logging, outputs under tmp_path."""
    flags = dict(data, tokenizer_dir=tokenizer_dir, output_dir=os.path.join(str(tmp_path), "out"),
                 log_dir=os.path.join(str(tmp_path), "logs"), max_seq_len=24, batch_size_per_gpu=8,
                 gradient_accumulation_steps=1, dataloader_buffer_size=128, learn_rate=1e-4, warmup_steps=4,
                 epochs=2, save_steps=10, logging_steps=1, eval_max_samples=16, eval_batch_size=16,
                 keep_latest_n_ckp=2, mixed_precision="no", num_workers=0, seed=7, memory_log_steps=10, **TINY_MODEL)
    flags.update(overrides)
    return flags


def trained_tiny_run(directory, task, **overrides) -> dict:
    """A seconds-long run of the task (`tiny_run_flags` and `overrides`) trained to its end: its flags."""
    data, tokenizer_dir = task
    flags = tiny_run_flags(directory, tokenizer_dir, data, **overrides)
    run_cli("train", flags)
    return flags


def read_metrics(output_dir: str, event: str | None = None) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl"), encoding="utf-8") as lines:
        records = [json.loads(line) for line in lines if line.strip()]
    return [r for r in records if event is None or r["event"] == event]


def final_weights(output_dir: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(output_dir, "final", "model.safetensors"))


def assert_same_weights(a: dict, b: dict, rtol: float = 0.0, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if rtol == 0 and atol == 0:
            assert torch.equal(a[name], b[name]), f"{name} differs"
        else:
            torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=f"{name} differs")


def assert_two_ranks_equal_one_with_double_accumulation(flags_for, steps: int) -> subprocess.CompletedProcess:
    """Train `steps` steps on 2 torchrun ranks and on 1 rank accumulating 2 micro-batches (`flags_for(name,
    **overrides)` gives each run's flags): the same losses and weights, but for the order of float sums. Returns
    the 2-rank run."""
    common = dict(max_steps=steps, dropout_rate=0.0, eval_max_samples=0, keep_latest_n_ckp=0, save_steps=100,
                  batch_size_per_gpu=4)
    two_ranks = flags_for("ddp", gradient_accumulation_steps=1, **common)
    one_rank = flags_for("single", gradient_accumulation_steps=2, **common)
    result = run_cli("train", two_ranks, nproc=2)
    run_cli("train", one_rank)
    losses_2 = [r["loss"] for r in read_metrics(two_ranks["output_dir"], "train")]
    losses_1 = [r["loss"] for r in read_metrics(one_rank["output_dir"], "train")]
    assert len(losses_2) == steps and losses_2 == pytest.approx(losses_1, rel=1e-4)
    assert_same_weights(final_weights(two_ranks["output_dir"]), final_weights(one_rank["output_dir"]), rtol=1e-4,
                        atol=1e-6)
    return result


def start_training(flags: dict, nproc: int = 1, entry: str = ENTRY, env: dict | None = None,
                   own_group: bool = False) -> subprocess.Popen:
    """The run in the background; with `own_group`, in a process group of its own, as a terminal's foreground job
    (Ctrl-C there signals every process of the group: the run and its DataLoader workers)."""
    launcher = [sys.executable, entry] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
        str(free_port()), entry]
    return subprocess.Popen(launcher + ["train"] + as_flags(flags), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=own_group,
                            env=child_env(ACCELERATE_USE_CPU="true", **(env or {})))


def wait_for_line(process: subprocess.Popen, fragment: str, timeout: float = 120) -> str:
    deadline, seen = time.time() + timeout, []
    while time.time() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        seen.append(line)
        if fragment in line:
            return "".join(seen)
    raise AssertionError(f"never saw {fragment!r}:\n{''.join(seen)[-3000:]}")
