"""Benchmark the data pipeline (`PairDataset`, as training runs it): throughput, padding efficiency, construction, resume and memory.

    python bench/bench_data.py [--file ../shared/data/sample_train_3k.parquet] [--big /tmp/big_10m.parquet]

(a) dataset throughput (parquet → padded tensors, num_workers=0) against tokenizing the same texts alone;
(b) the old approach, `pyarrow.parquet.read_table` of the whole file for every sample;
(c) padding efficiency of the length-grouped batches against random batches;
(d) with --big: construction time, time to the first batch when resuming at sample 5,000,000, and peak RSS
    growth while iterating, in fresh subprocesses, on a 1M-row file (written next to a temporary tokenizer,
    or --big_1m) and on the --big file;
(e) the packed span-corruption pipeline (PackedTextDataset) on the --file's rows as documents (prompt and
    response on two lines): one-time token count, then rows/s and tokens/s of an epoch (reading, tokenizing,
    packing, masking, padding) against the tokenizer alone on the same documents, and its padding efficiency.
Timings alternate between the contenders and keep each one's best round, so load from other processes on a
shared machine disturbs the ratios as little as possible.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
from tokenizers import Tokenizer
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from make_big_parquet import make_big_parquet  # noqa: E402

from data_pipeline.packed_text import PackedTextDataset, TextSpec  # noqa: E402
from data_pipeline.pairs import PairDataset  # noqa: E402
from data_pipeline.tokenize import shared_encoder  # noqa: E402
from data_pipeline.windows import StreamSpec  # noqa: E402
from model.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402

SAMPLE = REPO.parent / "shared" / "data" / "sample_train_3k.parquet"
SETTINGS = dict(max_seq_len=192, batch_size=32, buffer_size=5000)
RESUME_SAMPLE = 5_000_000


def best_time(function, rounds: int) -> float:
    """Fastest of `rounds` runs: the least disturbed by other processes."""
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


def dataset_epoch(path, tokenizer) -> int:
    """One epoch through a DataLoader without workers; returns the rows delivered."""
    dataset = PairDataset(StreamSpec(str(path), **SETTINGS), tokenizer)
    return sum(len(batch.input_ids) for step in DataLoader(dataset, batch_size=None, num_workers=0)
               for batch in step.micro_batches)


def throughput(path, tokenizer, rounds: int) -> None:
    table = pq.read_table(path, columns=["prompt", "response"])
    prompts, responses = table["prompt"].to_pylist(), table["response"].to_pylist()
    rows = len(prompts)
    batch = SETTINGS["batch_size"]
    encoder = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    encoder.enable_truncation(SETTINGS["max_seq_len"])

    def hf_call_per_batch():
        for start in range(0, rows, batch):
            tokenizer(prompts[start:start + batch], truncation=True, max_length=SETTINGS["max_seq_len"])
            tokenizer(responses[start:start + batch], truncation=True, max_length=SETTINGS["max_seq_len"])

    def backend_per_batch():
        for start in range(0, rows, batch):
            encoder.encode_batch(prompts[start:start + batch] + responses[start:start + batch])

    def backend_one_call():
        encoder.encode_batch_fast(prompts + responses)

    contenders = {"dataset (parquet -> padded tensors)": lambda: dataset_epoch(path, tokenizer),
                  "tokenizer(texts) per batch of 32 rows": hf_call_per_batch,
                  "backend encode_batch per batch of 32 rows": backend_per_batch,
                  "backend encode_batch_fast, all texts in one call": backend_one_call}
    best = {name: float("inf") for name in contenders}
    for _ in range(rounds):  # interleaved rounds
        for name, function in contenders.items():
            best[name] = min(best[name], best_time(function, 1))
    dataset_rate = rows / best["dataset (parquet -> padded tensors)"]
    print(f"(a) throughput on {path} ({rows:,} rows, best of {rounds} interleaved rounds)")
    for name, seconds in best.items():
        ratio = "" if name.startswith("dataset") else f"   dataset/this = {dataset_rate / (rows / seconds):.2f}"
        print(f"    {name:<50} {rows / seconds:>9,.0f} rows/s{ratio}")

    def old_sample(index):
        row = pq.read_table(path).slice(index, 1)
        tokenizer(row["prompt"][0].as_py(), truncation=True, max_length=SETTINGS["max_seq_len"])
        tokenizer(row["response"][0].as_py(), truncation=True, max_length=SETTINGS["max_seq_len"])

    samples = 20
    old_seconds = best_time(lambda: [old_sample(i) for i in range(samples)], 1)
    old_rate = samples / old_seconds
    print(f"(b) old approach (read_table of the whole file per sample, {samples} samples): {old_rate:,.1f} rows/s"
          f"   dataset/old = {dataset_rate / old_rate:,.0f}x")


def padding_efficiency(tokenizer, epochs: int = 3) -> None:
    real = padded = 0
    dataset = PairDataset(StreamSpec(str(SAMPLE), **SETTINGS), tokenizer)
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        for batch in (batch for step in dataset for batch in step.micro_batches):
            real += batch.real_tokens
            padded += batch.input_ids.numel() + batch.labels.numel()
    encoder = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    encoder.enable_truncation(SETTINGS["max_seq_len"])
    table = pq.read_table(SAMPLE)
    lengths = np.array([[len(encoder.encode(p).ids), len(encoder.encode(r).ids)]
                        for p, r in zip(table["prompt"].to_pylist(), table["response"].to_pylist())])
    random_real = random_padded = 0
    rng = np.random.default_rng(0)
    for _ in range(epochs):
        order = rng.permutation(len(lengths))
        for start in range(0, len(order), SETTINGS["batch_size"]):
            rows = lengths[order[start:start + SETTINGS["batch_size"]]]
            random_real += int(rows.sum())
            random_padded += len(rows) * int(rows.max(axis=0).sum())
    print(f"(c) padding efficiency on {SAMPLE.name} (real / padded tokens, prompt + response, {epochs} epochs): "
          f"length-grouped {real / padded:.3f}   random batches {random_real / random_padded:.3f}")


def packed_throughput(path, scratch: Path, rounds: int) -> None:
    import pyarrow as pa

    table = pq.read_table(path, columns=["prompt", "response"])
    documents = [f"{p}\n{r}" for p, r in zip(table["prompt"].to_pylist(), table["response"].to_pylist())]
    text_file = scratch / "documents.parquet"
    pq.write_table(pa.table({"text": documents}), text_file, row_group_size=1000)
    tokenizer = train_tokenizer([text_file], scratch / "text_tokenizer", vocab_size=8000, text_column="text")
    encoder = shared_encoder(tokenizer, None)
    spec, text = StreamSpec(str(text_file), **SETTINGS), TextSpec(counts_dir=str(scratch / "counts"))
    started = time.perf_counter()
    PackedTextDataset(spec, tokenizer, text)
    counting = time.perf_counter() - started

    def pipeline_epoch() -> tuple:
        dataset = PackedTextDataset(spec, tokenizer, text)
        real = padded = 0
        for step in DataLoader(dataset, batch_size=None, num_workers=0):
            for batch in step.micro_batches:
                real += batch.real_tokens
                padded += batch.input_ids.numel() + batch.labels.numel()
        return dataset.num_tokens, real, padded

    contenders = {"packed pipeline (parquet -> corrupted, padded tensors)": pipeline_epoch,
                  "backend encode_batch_fast, all documents in one call": lambda: encoder.encode_batch_fast(
                      documents)}
    best = {name: float("inf") for name in contenders}
    for _ in range(rounds):
        for name, function in contenders.items():
            best[name] = min(best[name], best_time(function, 1))
    tokens, real, padded = pipeline_epoch()
    pipeline_rate = len(documents) / best["packed pipeline (parquet -> corrupted, padded tensors)"]
    print(f"(e) span corruption on {path.name if hasattr(path, 'name') else path} as {len(documents):,} documents "
          f"({tokens:,} tokens, chunks for max_seq_len {SETTINGS['max_seq_len']}; best of {rounds} rounds): token "
          f"count once {counting:.2f} s")
    for name, seconds in best.items():
        rate = len(documents) / seconds
        ratio = "" if name.startswith("packed") else f"   pipeline/this = {pipeline_rate / rate:.2f}"
        print(f"    {name:<56} {rate:>9,.0f} rows/s {tokens / seconds:>11,.0f} tokens/s{ratio}")
    print(f"    padding efficiency (real / padded tokens, inputs + targets): {real / padded:.4f}")


def high_water_rss() -> int:
    """Peak resident memory of this process since exec or the last reset, in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status: the memory figures need Linux")


def probe(path, tokenizer_dir, batches: int) -> dict:
    """Run in a fresh process: construction, memory and resume figures for one file, in that order."""
    tokenizer = load_tokenizer(tokenizer_dir)
    started = time.perf_counter()
    dataset = PairDataset(StreamSpec(str(path), **SETTINGS), tokenizer)
    figures = {"rows": dataset.num_rows, "construct_s": time.perf_counter() - started}
    rss_before = psutil.Process().memory_info().rss
    # Start the high-water mark afresh: it would otherwise include the imports and, through fork and exec,
    # even the parent's memory (getrusage's ru_maxrss does).
    Path("/proc/self/clear_refs").write_text("5")
    for _, _batch in zip(range(batches), dataset):
        pass
    peak = high_water_rss()
    figures.update(rss_before_mb=rss_before / 2**20, peak_rss_mb=peak / 2**20, growth_mb=(peak - rss_before) / 2**20)
    if dataset.num_rows > RESUME_SAMPLE:
        resumed = PairDataset(StreamSpec(str(path), **SETTINGS), tokenizer)
        started = time.perf_counter()
        resumed.load_state_dict(resumed.state_at(0, RESUME_SAMPLE))
        next(iter(resumed))
        figures["resume_s"] = time.perf_counter() - started
    return figures


def big_file_figures(big, big_1m, tokenizer_dir, batches: int) -> None:
    results = []
    for path in (big_1m, big):
        output = subprocess.run([sys.executable, __file__, "--probe", str(path), "--tokenizer", str(tokenizer_dir),
                                 "--batches", str(batches)], check=True, capture_output=True, text=True).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
    small, large = results
    resume = (f"resume at sample {RESUME_SAMPLE:,} to first batch {large['resume_s']:.2f} s" if "resume_s" in large
              else f"no resume figure (fewer than {RESUME_SAMPLE:,} rows)")
    print(f"(d) on {big} ({large['rows']:,} rows): construction {large['construct_s']:.2f} s, {resume}")
    for r in results:
        print(f"    {r['rows']:>10,} rows: RSS {r['rss_before_mb']:.0f} MB after construction, peak "
              f"{r['peak_rss_mb']:.0f} MB over {batches:,} batches: growth {r['growth_mb']:.0f} MB")
    print(f"    10M / 1M: peak RSS {large['peak_rss_mb'] / small['peak_rss_mb']:.3f}, "
          f"growth {large['growth_mb'] / small['growth_mb']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", default=str(SAMPLE), help="parquet for (a) and (b)")
    parser.add_argument("--big", help="large parquet (e.g. 10M rows from make_big_parquet.py) for (d)")
    parser.add_argument("--big_1m", help="1M-row parquet to compare memory with (default: written to a temp dir)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=3000, help="batches iterated for the memory figures")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe(args.probe, args.tokenizer, args.batches)))
        return
    with tempfile.TemporaryDirectory(prefix="bench_data_") as scratch:
        tokenizer_dir = Path(scratch) / "tokenizer"
        tokenizer = train_tokenizer([SAMPLE], tokenizer_dir, vocab_size=8000)
        throughput(args.file, tokenizer, args.rounds)
        padding_efficiency(tokenizer)
        packed_throughput(args.file, Path(scratch), args.rounds)
        if args.big:
            big_1m = args.big_1m
            if big_1m is None:
                big_1m = Path(scratch) / "big_1m.parquet"
                make_big_parquet(big_1m, 1_000_000)
            big_file_figures(args.big, big_1m, tokenizer_dir, args.batches)


if __name__ == "__main__":
    main()
