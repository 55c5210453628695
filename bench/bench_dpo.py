"""Does DPO learn preferences without wrecking the model? Held-out reward accuracy and BLEU-4, one run, real rows.

    python bench/bench_dpo.py                      # 600 fine-tuning steps, then 300 DPO steps (about 10 min, 2 cores)
    python bench/bench_dpo.py --sft_steps 1500 --dpo_sft_weights 0,1     # plain DPO and DPO + RPO's term
    python bench/bench_dpo.py --sft_steps 100 --dpo_steps 40    # a smoke run

Everything goes through the real CLI. A tokenizer is trained on the shared sample rows
(`../shared/data/sample_train_3k.parquet`, 3,000 real Chinese Q&A rows), a small T5 is trained on them
(`train`, the fine-tuned model DPO starts from), and preference pairs are built as the issue asks: chosen = the
row's real response, rejected = another row's response (for training from the 3,000 rows, held out from the first
rows of `sample_valid_1k.parquet`). `train --objective=dpo` then runs with TrainConfigDPO's defaults but for the
batch, length and step count. Printed: the held-out reward accuracy and margin at each evaluation (the first one is
the starting model: accuracy 0, every reward 0), and greedy BLEU-4 of both models against the held-out references
(`evaluate`), with the references' teacher-forced loss: DPO must not make the model's answers worse.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
SMALL = dict(d_model=128, d_ff=512, num_heads=4, d_kv=32, num_layers=2, num_decoder_layers=2)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft_steps", type=int, default=600)
    parser.add_argument("--dpo_steps", type=int, default=300)
    parser.add_argument("--valid_pairs", type=int, default=200, help="held-out pairs and BLEU rows")
    parser.add_argument("--dpo_learn_rate", type=float, default=1e-5, help="TrainConfigDPO's")
    parser.add_argument("--dpo_sft_weights", default="0", help="comma-separated --dpo_sft_weight values: one DPO "
                        "run from the same fine-tuned model for each")
    parser.add_argument("--max_seq_len", type=int, default=64)
    parser.add_argument("--vocab_size", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def cli(command: str, threads: int, **flags) -> str:
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    argv = [sys.executable, str(REPO / "train_low_mem.py"), command] + [f"--{k}={v}" for k, v in flags.items()]
    result = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO)
    if result.returncode:
        raise SystemExit(f"{command} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result.stdout


def write_pairs(source: Path, destination: Path, rows: int, seed: int) -> Path:
    """chosen = each row's response, rejected = the response of another row drawn at random."""
    table = pq.read_table(source).slice(0, rows)
    responses = table["response"].to_pylist()
    rng = np.random.default_rng(seed)
    others = (np.arange(len(responses)) + 1 + rng.integers(0, len(responses) - 1, len(responses))) % len(responses)
    pq.write_table(pa.table({"prompt": table["prompt"], "chosen": responses,
                             "rejected": [responses[i] for i in others]}), destination, row_group_size=5000)
    return destination


def scores(output: str) -> tuple[float, float]:
    """`evaluate`'s BLEU-4 and eval loss (the references' token cross-entropy, teacher-forced)."""
    found = re.search(r"bleu4 ([0-9.]+)  eval_loss ([0-9.]+)", output)
    return float(found.group(1)), float(found.group(2))


def main() -> None:
    args = parse_args()
    train_rows, valid_rows = SHARED / "sample_train_3k.parquet", SHARED / "sample_valid_1k.parquet"
    if not train_rows.exists():
        raise SystemExit(f"needs the shared sample rows ({train_rows})")
    work = Path(tempfile.mkdtemp(prefix="bench_dpo_"))
    common = dict(max_seq_len=args.max_seq_len, mixed_precision="no", num_workers=0, memory_log_steps=0,
                  log_dir=work / "logs", seed=0)
    started = time.time()
    cli("train_tokenizer", args.threads, train_file=train_rows, tokenizer_dir=work / "tokenizer",
        vocab_size=args.vocab_size, max_rows=0)
    cli("train", args.threads, train_file=train_rows, validation_file=valid_rows, tokenizer_dir=work / "tokenizer",
        output_dir=work / "sft", batch_size_per_gpu=16, gradient_accumulation_steps=1, epochs=100,
        max_steps=args.sft_steps, learn_rate=1e-4, warmup_steps=args.sft_steps // 10, save_steps=10**6,
        eval_max_samples=0, keep_latest_n_ckp=0, logging_steps=100, **SMALL, **common)
    sft_seconds = time.time() - started
    pairs_train = write_pairs(train_rows, work / "pairs_train.parquet", 3000, seed=1)
    pairs_valid = write_pairs(valid_rows, work / "pairs_valid.parquet", args.valid_pairs, seed=2)
    evaluate = lambda model_dir: scores(cli(  # noqa: E731
        "evaluate", args.threads, model_dir=model_dir, file=valid_rows, max_samples=args.valid_pairs,
        max_seq_len=args.max_seq_len))
    sft_bleu, sft_loss = evaluate(work / "sft" / "final")
    print(f"fine-tuning: {args.sft_steps} steps of 16 rows ({sft_seconds / 60:.1f} min)")
    for weight in [float(value) for value in args.dpo_sft_weights.split(",")]:
        output_dir = work / f"dpo-{weight:g}"
        started = time.time()
        cli("train", args.threads, objective="dpo", init_from=work / "sft" / "final", train_file=pairs_train,
            validation_file=pairs_valid, output_dir=output_dir, batch_size_per_gpu=8, gradient_accumulation_steps=1,
            epochs=100, max_steps=args.dpo_steps, learn_rate=args.dpo_learn_rate, dpo_sft_weight=weight,
            warmup_steps=args.dpo_steps // 10, save_steps=args.dpo_steps // 3, eval_max_samples=args.valid_pairs,
            eval_batch_size=50, logging_steps=50, keep_latest_n_ckp=1, **common)
        seconds = time.time() - started
        with open(output_dir / "metrics.jsonl", encoding="utf-8") as lines:
            evaluations = [r for r in map(json.loads, lines) if r["event"] == "eval"]
        dpo_bleu, dpo_loss = evaluate(output_dir / "final")
        print(f"\nDPO, --dpo_sft_weight={weight:g}: {args.dpo_steps} steps of 8 pairs, beta 0.1, learn_rate "
              f"{args.dpo_learn_rate:g} ({seconds / 60:.1f} min, reference pass included)")
        print(f"held-out pairs ({args.valid_pairs}): step  reward accuracy  reward margin  eval loss")
        for record in evaluations:
            print(f"  {record['step']:>30}  {record['reward_accuracy']:15.3f}  {record['reward_margin']:13.3f}  "
                  f"{record['eval_loss']:9.4f}")
        print(f"on {args.valid_pairs} held-out rows: greedy BLEU-4 fine-tuned {sft_bleu:.4f}, after DPO "
              f"{dpo_bleu:.4f}; the references' loss fine-tuned {sft_loss:.4f}, after DPO {dpo_loss:.4f}")


if __name__ == "__main__":
    main()
