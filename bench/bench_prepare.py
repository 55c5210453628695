"""Benchmark `prepare` on synthetic rows with planted duplicates of known Jaccard, against the original project's
method (datasketch's in-memory MinHashLSH), and the MinHash libraries against each other.

    python bench/bench_prepare.py --rows 1000000 [--baseline_rows 1000000] [--libraries_rows 20000]
    python bench/bench_prepare.py --rows 10000000 --baseline_rows 0          # prepare alone at 10M
    python bench/bench_prepare.py --smoke                                      # seconds: the suite's version

Rows are recombined from the shared sample rows (../shared/data/sample_train_3k.parquet and sample_valid_1k):
their clauses (split at Chinese and Latin punctuation, ~58k distinct) make new prompts (1-3 clauses) and responses
(4-8), so two base rows share almost no character 5-gram. Then 2% of the rows are exact copies of a base row and
10% near copies with 1-6 edits (substitution, insertion or deletion of a character), whose true Jaccard (on the
5-gram sets of prompt + newline + response, what prepare compares) is computed exactly; copies are placed at random
positions in the file. Truth: the later row of every pair whose true Jaccard reaches the threshold must go.

Measured, each in a fresh process: rows/s and peak RSS (the process's own VmHWM) of `train_low_mem.py prepare`,
near-duplicate recall (by true-Jaccard bin) and precision at the default threshold; the same for the baseline
(datasketch MinHash of the same 5-grams, MinHashLSH(threshold=0.8) queried then filled row by row, keeping the
first); and, on --libraries_rows rows, datasketch vs rensa signatures: seconds per 1,000 rows and the mean absolute
error of the estimated Jaccard on the planted pairs. Prints one JSON line at the end (`RESULT {...}`).
"""
import argparse
import hashlib
import json
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SAMPLES = [REPO.parent / "shared" / "data" / name for name in ("sample_train_3k.parquet", "sample_valid_1k.parquet")]
THRESHOLD, NGRAM, NUM_PERM = 0.8, 5, 128
CHUNK_ROWS = 100_000
BINS = [(0.0, 0.7), (0.7, 0.8), (0.8, 0.85), (0.85, 0.9), (0.9, 1.01)]
FILLERS = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说"


def clauses() -> list[str]:
    found = set()
    for path in SAMPLES:
        table = pq.read_table(path, columns=["prompt", "response"])
        for column in table.columns:
            for text in column.to_pylist():
                found.update(part.strip() for part in re.split(r"[，。！？；：、\n,.!?;:]", text or "")
                             if len(part.strip()) >= 4)
    return sorted(found)


def shingle_set(text: str) -> set:
    return {text[i:i + NGRAM] for i in range(max(1, len(text) - NGRAM + 1))}


def true_jaccard(first: str, second: str) -> float:
    a, b = shingle_set(first), shingle_set(second)
    return len(a & b) / len(a | b)


def edited(text: str, rng: random.Random, edits: int) -> str:
    chars = list(text)
    for _ in range(edits):
        position = rng.randrange(1, len(chars) - 1)
        kind = rng.randrange(3)
        if kind == 0:
            chars[position] = rng.choice(FILLERS)
        elif kind == 1:
            chars.insert(position, rng.choice(FILLERS))
        else:
            del chars[position]
    return "".join(chars)


def key_of(prompt: str, response: str) -> bytes:
    return hashlib.blake2b(f"{prompt}\n{response}".encode(), digest_size=8).digest()


class Rows:
    """Row `index` of the synthetic corpus, made again on demand from its own seed (10M rows are never held)."""

    def __init__(self, rows: int, seed: int, exact_share: float, near_share: float):
        from commands.options import PrepareFlags
        from preparation.cleaning import Cleaner

        self.cleaner, self.pool, self.seed = Cleaner(PrepareFlags(input="-")), clauses(), seed
        self.exact_count, self.near_count = int(rows * exact_share), int(rows * near_share)
        self.base_count = rows - self.exact_count - self.near_count
        chosen = np.random.default_rng(seed + 1).choice(self.base_count, self.exact_count + self.near_count,
                                                        replace=False)
        self.copy_of = dict(zip(range(self.base_count, rows), chosen.tolist()))

    def base(self, index: int) -> tuple:
        rng = random.Random(self.seed * 1_000_003 + index)
        prompt = "，".join(rng.choice(self.pool) for _ in range(rng.randint(1, 3))) + "？"
        response = "，".join(rng.choice(self.pool) for _ in range(rng.randint(4, 8))) + "。"
        return self.cleaner.clean((prompt, response)) or ("问" + prompt, "答" + response)

    def row(self, index: int) -> tuple:
        """(prompt, response, kind) with kind base, exact or near."""
        if index < self.base_count:
            return (*self.base(index), "base")
        base = self.base(self.copy_of[index])
        if index < self.base_count + self.exact_count:
            return (*base, "exact")
        rng = random.Random(-1 - index)
        copy = self.cleaner.clean((base[0], edited(base[1], rng, rng.choice((1, 1, 2, 2, 3, 4, 6))))) or base
        return (*copy, "near")


def generate(path: Path, rows: int, seed: int = 0, exact_share: float = 0.02, near_share: float = 0.10) -> dict:
    """Write the synthetic file, in file order; return its truth: per planted pair (first row, second row, kind,
    true Jaccard), and each row's content digest (to tell which rows prepare kept)."""
    corpus = Rows(rows, seed, exact_share, near_share)
    row_at = np.random.default_rng(seed).permutation(rows)  # file position -> row index
    position_of = np.empty(rows, dtype=np.int64)
    position_of[row_at] = np.arange(rows)
    digests = np.empty(rows, dtype=np.uint64)
    pairs, writer = [], None
    for start in range(0, rows, CHUNK_ROWS):
        chunk = [corpus.row(int(index)) for index in row_at[start:start + CHUNK_ROWS]]
        for offset, (prompt, response, kind) in enumerate(chunk):
            if kind != "base":
                index = int(row_at[start + offset])
                base = corpus.base(corpus.copy_of[index])
                first, second = sorted((int(position_of[corpus.copy_of[index]]), start + offset))
                similarity = 1.0 if kind == "exact" else true_jaccard("\n".join(base), f"{prompt}\n{response}")
                kind = "exact" if tuple(base) == (prompt, response) else kind  # an edit undone by chance
                pairs.append((first, second, kind, similarity))
        table = pa.table({"prompt": [row[0] for row in chunk], "response": [row[1] for row in chunk]})
        writer = writer or pq.ParquetWriter(path, table.schema, compression="zstd")
        writer.write_table(table, row_group_size=CHUNK_ROWS)
        digests[start:start + len(chunk)] = np.frombuffer(b"".join(key_of(p, r) for p, r, _ in chunk),
                                                          dtype=np.uint64)
    writer.close()
    return {"pairs": pairs, "digests": digests}


def score(truth: dict, removed: np.ndarray) -> dict:
    """Recall and precision of the near-duplicate removals (`removed`: per row, dropped) against the truth."""
    pairs = truth["pairs"]
    exact_rows = {second for _, second, kind, _ in pairs if kind == "exact"}
    should = {second for _, second, kind, similarity in pairs if kind == "near" and similarity >= THRESHOLD}
    near_removed = set(np.flatnonzero(removed).tolist()) - exact_rows
    found = len(should & near_removed)
    by_bin = {}
    for low, high in BINS:
        inside = [second for _, second, kind, similarity in pairs if kind == "near" and low <= similarity < high]
        if inside:
            by_bin[f"{low:.2f}-{min(high, 1.0):.2f}"] = {"pairs": len(inside),
                                                         "removed": round(float(removed[inside].mean()), 4)}
    planted_near = {second for _, second, kind, _ in pairs if kind == "near"}
    return {"planted_above_threshold": len(should), "recall": round(found / max(1, len(should)), 4),
            "precision": round(found / max(1, len(near_removed)), 4),
            "precision_any_planted": round(len(near_removed & planted_near) / max(1, len(near_removed)), 4),
            "near_removed": len(near_removed),
            "exact_removed": int(removed[sorted(exact_rows)].sum()) if exact_rows else 0,
            "exact_planted": len(exact_rows), "removed_by_true_jaccard": by_bin}


def removed_rows(truth: dict, output_dir: Path) -> np.ndarray:
    kept = []
    for name in ("train.parquet", "valid.parquet"):
        path = output_dir / name
        if path.exists():
            for batch in pq.ParquetFile(path).iter_batches(batch_size=65536):
                prompts, responses = batch.column("prompt").to_pylist(), batch.column("response").to_pylist()
                kept.append(np.frombuffer(b"".join(map(key_of, prompts, responses)), dtype=np.uint64))
    return ~np.isin(truth["digests"], np.concatenate(kept))


def measured(command: list[str], result_file: Path) -> dict:
    """Run `command` (this script's --child mode) in a fresh process; its seconds and own peak RSS."""
    started = time.perf_counter()
    process = subprocess.run([sys.executable, __file__, "--child", str(result_file), "--"] + command,
                             env=dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"),
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"{command} failed ({process.returncode}):\n{process.stdout[-3000:]}")
    child = json.loads(result_file.read_text())
    return {"seconds": round(seconds, 1), "peak_rss_mb": child["peak_rss_mb"], "stdout": process.stdout}


def own_peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM, the high-water mark of its own address space. (ru_maxrss is
    not: after a fork and exec it starts from the parent's high-water mark, here the benchmark's truth tables.)"""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(result_file: str, command: list[str]) -> None:
    """Run a measured task in this process, then write its peak RSS (the kernel's high-water mark)."""
    code = 0
    try:
        if command[0] == "prepare":
            from commands.cli import main
            from train_low_mem import COMMANDS

            main(COMMANDS, command)
        elif command[0] == "baseline":
            datasketch_baseline(Path(command[1]), Path(command[2]))
    except SystemExit as stop:
        code = stop.code or 0
    Path(result_file).write_text(json.dumps({"peak_rss_mb": round(own_peak_rss_mb(), 1)}))
    sys.exit(code)


def shingles_of(prompt: str, response: str) -> list[str]:
    text = f"{prompt}\n{response}"
    return [text[i:i + NGRAM] for i in range(max(1, len(text) - NGRAM + 1))]


def datasketch_baseline(input_path: Path, removed_path: Path) -> None:
    """The original project's method: a datasketch MinHash per row, one in-memory MinHashLSH, keep the first."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
    template = MinHash(num_perm=NUM_PERM, seed=1)  # permutations made once, not per row (fairer to it)
    removed, row = [], 0
    seen = set()
    for batch in pq.ParquetFile(input_path).iter_batches(batch_size=8192):
        for prompt, response in zip(batch.column("prompt").to_pylist(), batch.column("response").to_pylist()):
            digest = key_of(prompt, response)
            if digest in seen:  # exact duplicates first, as prepare does
                removed.append(row)
            else:
                seen.add(digest)
                signature = MinHash(num_perm=NUM_PERM, permutations=template.permutations, scheme=template.scheme)
                signature.update_batch([shingle.encode() for shingle in shingles_of(prompt, response)])
                if lsh.query(signature):
                    removed.append(row)
                else:
                    lsh.insert(str(row), signature)
            row += 1
    np.save(removed_path, np.array(removed, dtype=np.int64))


def compare_libraries(path: Path, truth: dict, pairs: int) -> dict:
    """datasketch vs rensa on the rows of the first `pairs` planted near pairs: milliseconds per 1,000 rows, and
    the error of the estimated Jaccard against the true one (same 5-grams, 128 permutations)."""
    from datasketch import MinHash

    from preparation.minhash import estimated_jaccard, signatures

    inside = [(a, b, s) for a, b, kind, s in truth["pairs"] if kind == "near"][:pairs]
    positions = np.array([a for a, _, _ in inside] + [b for _, b, _ in inside])
    table = pq.read_table(path).take(pa.array(positions))
    prompts, responses = table.column("prompt").to_pylist(), table.column("response").to_pylist()
    texts = [f"{p}\n{r}" for p, r in zip(prompts, responses)]
    rows = len(texts)
    started = time.perf_counter()
    ours = np.concatenate([signatures(texts[i:i + 8192], NGRAM, NUM_PERM, 1) for i in range(0, rows, 8192)])
    rensa_seconds = time.perf_counter() - started
    started = time.perf_counter()
    theirs, template = [], MinHash(num_perm=NUM_PERM, seed=1)
    for prompt, response in zip(prompts, responses):
        signature = MinHash(num_perm=NUM_PERM, permutations=template.permutations, scheme=template.scheme)
        signature.update_batch([shingle.encode() for shingle in shingles_of(prompt, response)])
        theirs.append(signature.hashvalues.astype(np.uint64))
    datasketch_seconds = time.perf_counter() - started
    theirs = np.array(theirs)
    similarity = np.array([s for _, _, s in inside])
    half = len(inside)
    errors = {}
    for name, matrix in (("rensa", ours), ("datasketch", theirs)):
        estimate = estimated_jaccard(matrix[:half], matrix[half:])
        above = similarity >= THRESHOLD
        reached = estimate >= THRESHOLD
        errors[name] = {"mean_abs_error": round(float(np.abs(estimate - similarity).mean()), 4),
                        "estimate_at_or_above_threshold_when_true_is": round(float(reached[above].mean()), 4),
                        "estimate_at_or_above_threshold_when_true_is_below": round(float(reached[~above].mean()), 4)}
    return {"rows": rows, "pairs": half,
            "rensa_ms_per_1000_rows": round(rensa_seconds / rows * 1e6, 1),
            "datasketch_ms_per_1000_rows": round(datasketch_seconds / rows * 1e6, 1), "accuracy": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--baseline_rows", type=int, default=1_000_000,
                        help="run the datasketch baseline at the sizes up to this (0: never)")
    parser.add_argument("--libraries_rows", type=int, default=20_000,
                        help="rows (both sides of planted near pairs) for the MinHash library comparison")
    parser.add_argument("--work_dir", default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the test suite")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child:
        run_child(args.child, rest[1:] if rest[:1] == ["--"] else rest)
        return
    if args.smoke:
        args.rows, args.baseline_rows, args.libraries_rows = [3000], 3000, 400
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_prepare_"))
    work.mkdir(parents=True, exist_ok=True)
    results = {"date": time.strftime("%Y-%m-%d"), "threshold": THRESHOLD, "sizes": []}
    for rows in args.rows:
        path = work / f"synthetic_{rows}.parquet"
        started = time.perf_counter()
        truth = generate(path, rows)
        print(f"{rows:,} rows generated in {time.perf_counter() - started:.0f} s ({len(truth['pairs']):,} planted "
              f"pairs) -> {path}", flush=True)
        entry = {"rows": rows, "input_mb": round(path.stat().st_size / 1e6, 1)}
        if args.libraries_rows and rows == args.rows[0]:
            entry["libraries"] = compare_libraries(path, truth, args.libraries_rows // 2)
            print("libraries:", json.dumps(entry["libraries"]), flush=True)
        output_dir = work / f"prepared_{rows}"
        run = measured(["prepare", f"--input={path}", f"--output_dir={output_dir}", "--valid_rows=1000",
                        "--overwrite=True"], work / "child.json")
        report = json.loads((output_dir / "prepare_report.json").read_text())
        entry["prepare"] = {"seconds": run["seconds"], "rows_per_s": round(rows / run["seconds"]),
                            "peak_rss_mb": run["peak_rss_mb"], "phase_seconds": report["seconds"],
                            **score(truth, removed_rows(truth, output_dir))}
        # Exact copies share their original's content, so only the report can tell how many went.
        entry["prepare"]["exact_removed"] = report["dedup"]["exact_dropped"]
        print("prepare:", json.dumps(entry["prepare"]), flush=True)
        if rows <= args.baseline_rows:
            removed_path = work / f"baseline_removed_{rows}.npy"
            run = measured(["baseline", str(path), str(removed_path)], work / "child.json")
            removed = np.zeros(rows, dtype=bool)
            removed[np.load(removed_path)] = True
            entry["datasketch_minhashlsh"] = {"seconds": run["seconds"], "rows_per_s": round(rows / run["seconds"]),
                                              "peak_rss_mb": run["peak_rss_mb"], **score(truth, removed)}
            print("datasketch MinHashLSH:", json.dumps(entry["datasketch_minhashlsh"]), flush=True)
        else:
            entry["datasketch_minhashlsh"] = f"not run: {rows:,} rows > --baseline_rows={args.baseline_rows:,}"
        results["sizes"].append(entry)
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
