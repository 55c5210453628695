"""The front door: README.md is a page, README.zh.md gives the same commands, docs/FLAGS.md is what the code says,
and every command of both READMEs runs as written on a fresh copy of the repository (with tiny sizes added where
a command would train for hours, and a CPU process where it launches on 3 GPUs)."""
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import urllib.request

import pyarrow.parquet as pq
import pytest

from commands.demo import write_demo_parquet
from tests.cli_helpers import REPO, TINY_MODEL, child_env, free_port

README, README_ZH = os.path.join(REPO, "README.md"), os.path.join(REPO, "README.zh.md")
COMMAND_STARTS = ("python ", "pip ", "accelerate ", "torchrun ", "ACCELERATE_USE_CPU=")
GPU_LAUNCHER = "accelerate launch --multi_gpu --num_processes 3 train_low_mem.py"
# What a 3-GPU run of the large config becomes here: seconds on one CPU process (only flags the command lacks or
# that set sizes; a resume gets no model or data flag: they come from the saved run).
TINY_TRAINING = dict(max_seq_len=24, batch_size_per_gpu=4, gradient_accumulation_steps=1, dataloader_buffer_size=64,
                     eval_max_samples=4, eval_batch_size=4, keep_latest_n_ckp=1, mixed_precision="no",
                     num_workers=0, logging_steps=1, max_steps=3)


def commands_of(path: str) -> list[str]:
    """The commands of a markdown file's bash blocks, one per line (continuations joined, comments dropped)."""
    text = open(path, encoding="utf-8").read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = " ".join(line.split("#")[0].split()) if not line.lstrip().startswith("#") else ""
            commands += [part.strip() for part in line.split("&&") if part.strip().startswith(COMMAND_STARTS)]
    return commands


def test_the_readme_is_a_page():
    assert len(open(README, encoding="utf-8").read().splitlines()) <= 250


def test_the_chinese_readme_gives_exactly_the_commands_of_the_english_one():
    english = commands_of(README)
    assert len(english) >= 14 and commands_of(README_ZH) == english


def test_the_flag_reference_is_what_the_code_says():
    result = subprocess.run([sys.executable, "-m", "commands.flags_doc", "--check"], cwd=REPO, capture_output=True,
                            text=True, env=child_env())
    assert result.returncode == 0, result.stderr


def test_every_link_between_the_documents_points_at_a_file_that_exists():
    documents = [README, README_ZH] + [os.path.join(REPO, "docs", name) for name in os.listdir(os.path.join(REPO, "docs"))]
    missing = []
    for document in documents:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", open(document, encoding="utf-8").read()):
            if not target.startswith("http") and not os.path.exists(os.path.join(os.path.dirname(document), target)):
                missing.append(f"{os.path.relpath(document, REPO)} -> {target}")
    assert missing == []


# ------------------------------------------------- every command, run as written on a fresh copy

def fresh_copy(directory: str) -> str:
    """The repository as a clone has it: the files git tracks or would track, nothing built or downloaded."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = os.path.join(REPO, name)
        if os.path.isfile(source):
            os.makedirs(os.path.dirname(os.path.join(directory, name)), exist_ok=True)
            shutil.copy2(source, os.path.join(directory, name))
    return directory


def write_the_users_files(clone: str) -> None:
    """What the commands expect the user to have: raw jsonl rows, and the guide's data files."""
    # Distinct rows (random characters), enough for prepare's default validation split of 1,000 rows.
    rng = random.Random(0)
    characters = [chr(code) for code in range(0x4E00, 0x4E00 + 3000)]
    os.makedirs(os.path.join(clone, "raw"))
    with open(os.path.join(clone, "raw", "part-0.jsonl"), "w", encoding="utf-8") as out:
        for _ in range(3000):
            prompt = "".join(rng.choices(characters, k=rng.randint(8, 20)))
            out.write(json.dumps({"prompt": prompt, "response": prompt[::-1]}, ensure_ascii=False) + "\n")
    write_demo_parquet(os.path.join(clone, "prompts.parquet"), 8, seed=6)
    for name, count, seed in (("pretrain_train_10m", 256, 1), ("pretrain_valid_100k", 32, 2),
                              ("sft_train_dataset", 128, 3), ("sft_valid_dataset", 16, 4)):
        write_demo_parquet(os.path.join(clone, "data", f"{name}.parquet"), count, seed=seed, row_group_size=64)


def flags_of(arguments: list[str]) -> dict:
    return dict(argument[2:].split("=", 1) for argument in arguments if argument.startswith("--"))


def as_run_here(command: str) -> tuple[list[str], str]:
    """The argv this machine runs for a README command, and what to send to its stdin."""
    command = command.replace(GPU_LAUNCHER, "python train_low_mem.py")
    words = shlex.split(command)
    name, flags = words[2], flags_of(words[3:])
    extra = {}
    if name == "demo":
        extra = dict(train_rows=256, valid_rows=32, eval_max_samples=32, eval_batch_size=32, epochs=1, **TINY_MODEL)
    elif name == "train" and "is_keep_training" in flags:
        extra = dict(max_steps=5)
    elif name == "train":
        extra = {**TINY_TRAINING, **({} if "init_from" in flags else TINY_MODEL)}
    elif name == "train_tokenizer":
        extra = dict(vocab_size=600)
    elif name == "evaluate":
        extra = dict(max_samples=4, max_seq_len=24)
    elif name in ("generate", "chat"):
        extra = dict(max_new_tokens=8)
    elif name == "serve":
        extra = dict(port=free_port())
    argv = [sys.executable, "train_low_mem.py", name] + [f"--{k}={v}" for k, v in {**flags, **extra}.items()]
    return argv, "你好\n/exit\n" if name == "chat" else ""


def run_server_until_healthy(argv: list[str], clone: str) -> str:
    port = flags_of(argv)["port"]
    server = subprocess.Popen(argv, cwd=clone, env=child_env(ACCELERATE_USE_CPU="true"), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        for line in server.stdout:
            if f"http://127.0.0.1:{port}" in line:
                break
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as response:
            assert response.status == 200
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        return server.stdout.read()
    finally:
        server.kill()


@pytest.mark.slow
def test_every_command_of_the_readmes_runs_as_written_on_a_fresh_copy(tmp_path):
    clone = fresh_copy(str(tmp_path / "t5-lowmem"))
    write_the_users_files(clone)
    ran = []
    for command in commands_of(README):
        if command.startswith("pip ") or "pytest" in command:
            for requirements in re.findall(r"-r (\S+)", command):
                assert os.path.isfile(os.path.join(clone, requirements))  # the environment is this test's own
            continue
        argv, stdin = as_run_here(command)
        if argv[2] == "serve":
            run_server_until_healthy(argv, clone)
        else:
            result = subprocess.run(argv, cwd=clone, env=child_env(ACCELERATE_USE_CPU="true"), input=stdin,
                                    capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        ran.append(argv[2])
    assert ran == ["demo", "prepare", "train_tokenizer", "plan", "train", "train", "evaluate", "generate", "train",
                   "generate", "generate", "train", "chat", "serve", "plot", "generate", "generate"]
    # The preference tuning started from the fine-tuned model and kept its best by reward accuracy.
    with open(os.path.join(clone, "model_save", "dpo", "checkpoints.json"), encoding="utf-8") as listing:
        assert json.load(listing)["metric"] == "reward_accuracy"
    assert pq.read_table(os.path.join(clone, "answers.parquet")).column_names == ["prompt", "response", "answer"]
    # The resume continued the run it was given (its saved settings), to the step asked for.
    with open(os.path.join(clone, "model_save", "pretrain_large", "metrics.jsonl"), encoding="utf-8") as metrics:
        steps = [json.loads(line)["step"] for line in metrics if '"train"' in line]
    assert steps == [1, 2, 3, 4, 5]
