"""`demo`: the whole system on an embedded, learnable Chinese task, in a few minutes on a laptop CPU.

The task: a prompt asks to copy, reverse or double every character of a short Chinese phrase; the response is the
answer. A tiny T5 learns it quickly, so BLEU-4 visibly climbs from 0 towards 1 while the same `train` path as a
real run (tokenizer, data pipeline, trainer, evaluation, best-k, logging) does the work.
"""
import os
import random
import shutil
import time
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq

from commands.options import DemoFlags
from config import OUTPUT_DIR, T5ModelConfigDemo, TrainConfigDemo, changed_fields, resolve_path
from utils.errors import UserErrors

CHARACTERS = "春夏秋冬山水风花雪月日星云雨天地人心书画江河湖海红黄蓝白金木火土东南西北大小多少上下"
TASKS = {
    "复述": lambda phrase: phrase,
    "倒序": lambda phrase: phrase[::-1],
    "叠字": lambda phrase: "".join(ch * 2 for ch in phrase),
}
# Written first into the demo's directory: the demo empties a non-empty directory only when it holds this file.
MARKER = ".demo_output"
# Fixed inside the demo's directory (see TrainConfigDemo): generated data never lands on the user's files.
OWN_PATHS = ("train_file", "validation_file", "tokenizer_dir")


def demo_rows(count: int, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic (prompt, response) pairs: phrases of 4-8 characters under one of the three tasks."""
    rng = random.Random(seed)
    prompts, responses = [], []
    for _ in range(count):
        task = rng.choice(sorted(TASKS))
        phrase = "".join(rng.choice(CHARACTERS) for _ in range(rng.randint(4, 8)))
        prompts.append(f"{task}：{phrase}")
        responses.append(TASKS[task](phrase))
    return prompts, responses


def write_demo_parquet(path: str, count: int, seed: int, row_group_size: int = 1024) -> str:
    prompts, responses = demo_rows(count, seed)
    table = pa.table({"prompt": pa.array(prompts, pa.string()), "response": pa.array(responses, pa.string())})
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def refusals(cfg: TrainConfigDemo, output_dir: str) -> list[str]:
    """Why the demo may not start over in `output_dir` with these settings: it never deletes or overwrites
    anything it did not create."""
    problems = [f"--{name}: the demo writes its generated data and tokenizer inside --output_dir; train on your "
                "own files with `train`" for name in OWN_PATHS if name in changed_fields(cfg)]
    if os.path.islink(output_dir) or (os.path.exists(output_dir) and not os.path.isdir(output_dir)):
        problems.append(f"--output_dir={cfg.output_dir}: {output_dir} is a file or a link, not a directory")
    elif os.path.isdir(output_dir) and os.listdir(output_dir) and not os.path.isfile(marker_path(output_dir)):
        problems.append(f"--output_dir={cfg.output_dir}: {output_dir} is not empty and is not a previous demo's "
                        f"output (no {MARKER} in it); the demo starts its directory over, so give a new or empty "
                        "one (a demo directory made by an older version has no marker: delete it once by hand)")
    return problems


def marker_path(output_dir: str) -> str:
    return os.path.join(output_dir, MARKER)


def start_over(output_dir: str) -> None:
    """An empty `output_dir` holding only the marker; a previous demo's output is deleted first.

    Its contents go, not the directory itself (it may be a mount point), and the marker stays, so
    an interrupted clean-up is still recognised as the demo's own next time.
    """
    os.makedirs(output_dir, exist_ok=True)
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif name != MARKER:
            os.remove(path)
    with open(marker_path(output_dir), "w", encoding="utf-8") as marker:
        marker.write("Written by `python train_low_mem.py demo`: the next demo run empties this directory.\n")


def run_demo(flags: DemoFlags, cfg: TrainConfigDemo, model_cfg: T5ModelConfigDemo) -> None:
    """Generate the data, train through `train`'s own path, then print BLEU-4 and example answers."""
    from training.loop import run_training

    output_dir = resolve_path(cfg.output_dir)
    problems = refusals(cfg, output_dir)
    if problems:
        raise UserErrors(problems)
    cfg = replace(cfg, output_dir=output_dir,
                  **{name: getattr(cfg, name).replace(OUTPUT_DIR, output_dir) for name in OWN_PATHS + ("log_dir",)})
    start_over(output_dir)
    write_demo_parquet(cfg.train_file, flags.train_rows, seed=1)
    write_demo_parquet(cfg.validation_file, flags.valid_rows, seed=2)
    started = time.time()
    run_training(cfg, model_cfg)
    print_summary(cfg.output_dir, time.time() - started)


def print_summary(run_dir: str, seconds: float) -> None:
    import json

    from commands.saved_model import load_saved_model

    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as lines:
        evals = [r for r in map(json.loads, lines) if r["event"] == "eval"]
    curve = ", ".join(f"step {r['step']}: {r['bleu4']:.3f}" for r in evals)
    print(f"\ndemo finished in {seconds:.0f}s. BLEU-4 on held-out rows: {curve}")
    model, tokenizer = load_saved_model(os.path.join(run_dir, "final"))
    prompts, answers = demo_rows(5, seed=3)
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    outputs = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=24)
    for prompt, answer, output in zip(prompts, answers, tokenizer.batch_decode(outputs, skip_special_tokens=True)):
        print(f"  {prompt} -> {output}   (expected {answer})")
    print(f"model: {os.path.join(run_dir, 'final')}; charts: python train_low_mem.py plot --output_dir={run_dir}")
