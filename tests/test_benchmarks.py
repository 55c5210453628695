"""Every script in bench/ runs as docs/BENCHMARKS.md says, here at tiny sizes (smoke runs); the memory-over-epochs
benchmark also checks its figure: host memory stays flat over 20 epochs."""
import json
import re
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from conftest import shared_file

from tests.cli_helpers import REPO, child_env

pytestmark = pytest.mark.slow


def bench(script: str, *args, timeout: int = 600) -> str:
    result = subprocess.run([sys.executable, f"bench/{script}", *map(str, args)], cwd=REPO, env=child_env(),
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (f"{script}: exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return result.stdout


@pytest.fixture(scope="module")
def big_parquet(tmp_path_factory):
    """What make_big_parquet.py writes for the other benchmarks, at 3,000 rows."""
    shared_file("sample_train_3k.parquet")
    path = tmp_path_factory.mktemp("big") / "big.parquet"
    bench("make_big_parquet.py", "--rows", 3000, "--out", path, "--row_group_size", 500)
    assert pq.ParquetFile(path).metadata.num_rows == 3000
    return path


def test_bench_tokenizer_trains_and_reports_time_and_peak_memory():
    shared_file("sample_train_3k.parquet")
    out = bench("bench_tokenizer.py", "--rows", 2000, "--vocab_size", 500)
    figures = json.loads(out.strip().splitlines()[-1])
    assert figures["rows"] == 2000 and figures["vocab"] == 500
    # The training subprocess's own peak: torch and transformers alone take ~280 MB; 2,000 rows add little.
    assert 200 < figures["peak_rss_mb"] < 1500 and figures["train_seconds"] > 0


def test_bench_data_measures_throughput_padding_and_memory(big_parquet, tmp_path):
    small = tmp_path / "small.parquet"
    pq.write_table(pq.read_table(big_parquet).slice(0, 1000), small, row_group_size=500)
    out = bench("bench_data.py", "--rounds", 1, "--batches", 20, "--big", big_parquet, "--big_1m", small)
    rates = {name.strip(): float(rate.replace(",", "")) for name, rate in
             re.findall(r"^    (\S.*?) +([\d,]+) rows/s", out, re.MULTILINE)}
    assert rates["dataset (parquet -> padded tensors)"] > 0 and len(rates) == 6  # (a)'s four and (e)'s two
    grouped, random = map(float, re.search(r"length-grouped ([\d.]+) +random batches ([\d.]+)", out).groups())
    assert 0 < random < grouped <= 1  # length grouping pads less than random batches
    assert float(re.search(r"inputs \+ targets\): ([\d.]+)", out).group(1)) >= 0.99  # packed text pads nothing
    ratio = float(re.search(r"pipeline/this = ([\d.]+)", out).group(1))
    assert ratio == pytest.approx(rates["packed pipeline (parquet -> corrupted, padded tensors)"]
                                  / rates["backend encode_batch_fast, all documents in one call"], abs=0.01)


def test_bench_train_compares_the_trainer_with_a_bare_loop_over_several_rounds(big_parquet):
    out = bench("bench_train.py", "--rounds", 2, "--steps", 4, "--buffer_size", 200, "--batch_size", 8,
                "--train_file", big_parquet)
    assert "round 2:" in out
    table = dict(re.findall(r"^(\S.*?) {2,}[\d.]+ +[\d.]+ +([\d.]+) ", out, re.MULTILINE))
    assert float(table["bare loop"]) == 1.0  # each contender's steps/s over the bare loop's
    ratio = float(re.search(r"trainer/bare = ([\d.]+)", out).group(1))
    assert 0.2 < ratio < 2 and ratio == float(table[next(name for name in table if name.startswith("trainer ("))])


def assert_peaks_compared(out: str, big: str, small: str) -> None:
    """Both files trained, every rank's peak measured, and the printed ratio is that of the two largest peaks."""
    rows = {name: [float(peak) for peak in peaks.split()] for name, peaks in
            re.findall(r"^(\S+\.parquet) +[\d,]+ +\d+ +[\d.]+ +([\d. ]+?)  (?:met|NOT met)$", out, re.MULTILINE)}
    assert sorted(rows) == sorted([big, small]) and all(len(peaks) == 3 and min(peaks) > 100 for peaks in
                                                        rows.values())  # 2 ranks and the largest of them
    ratio = float(re.search(r"rows = ([\d.]+) \(goal", out).group(1))
    assert ratio == pytest.approx(rows[big][-1] / rows[small][-1], abs=0.002)


def test_bench_scale_trains_two_files_on_two_processes_and_compares_peak_memory(big_parquet, tmp_path):
    small = tmp_path / "small.parquet"
    pq.write_table(pq.read_table(big_parquet).slice(0, 1500), small, row_group_size=500)
    out = bench("bench_scale.py", "--big", big_parquet, "--small", small, "--steps", 3, "--batch_size", 4,
                "--tokenizer_dir", tmp_path / "tokenizer", timeout=900)
    assert_peaks_compared(out, big_parquet.name, small.name)


def test_bench_scale_on_raw_text_counts_tokens_then_trains_and_compares_peak_memory(tmp_path):
    shared_file("sample_train_3k.parquet")
    out = bench("bench_scale.py", "--objective", "span_corruption", "--big", tmp_path / "big.parquet",
                "--small", tmp_path / "small.parquet", "--big_rows", 4000, "--small_rows", 1000, "--steps", 3,
                "--batch_size", 4, "--tokenizer_dir", tmp_path / "tokenizer", timeout=900)
    assert "the token count before training took" in out and "training (span_corruption)" in out
    assert_peaks_compared(out, "big.parquet", "small.parquet")
    assert pq.read_schema(tmp_path / "big.parquet").names == ["text"]


def test_bench_recipe_compares_recipes_on_held_out_loss():
    shared_file("sample_train_3k.parquet")
    out = bench("bench_recipe.py", "--scales", "tiny", "--steps", 10, "--long_steps", 0, "--recipes",
                "ours,original,hf", "--train_rows", 200, "--valid_rows", 50, "--vocab_size", 400, "--threads", 1)
    assert "ours - best other recipe at step 10" in out
    table = dict(re.findall(r"^  (ours|original|hf) +([\d. ]+)$", out[out.index("held-out loss"):], re.MULTILINE))
    curves = {name: [float(value) for value in row.split()] for name, row in table.items()}
    assert sorted(curves) == ["hf", "original", "ours"]
    for name, (*points, lowest, minutes) in curves.items():
        assert all(0 < loss < 10 for loss in points) and lowest == min(points), name  # nats, a 400-token vocabulary
    difference = float(re.search(r"ours - best other recipe at step 10: ([-+][\d.]+)", out).group(1))
    assert difference == pytest.approx(curves["ours"][-3] - min(c[-3] for n, c in curves.items() if n != "ours"),
                                       abs=0.002)


def test_host_memory_stays_flat_over_20_epochs():
    """The suite's version of bench_long_run.py: 20 epochs of 100 steps on 1,000 distinct rows, evaluation and
    saves on. Before the tokenizer was kept for the run, memory grew by ~2 MB with every epoch here."""
    out = bench("bench_long_run.py", "--epochs", 20, "--rows", 1000, "--batch_size", 10, "--memory_every", 50,
                "--max_slope", 0.5)
    slopes = dict(re.findall(r"(\w+) ([-+][\d.]+)", re.search(r"slope after epoch 5 .*MB per epoch: (.*)", out).group(1)))
    assert len(slopes) >= 2 and all(abs(float(slope)) <= 0.5 for slope in slopes.values()), slopes


def test_bench_feed_measures_how_long_the_loop_waits_for_data_with_and_without_the_threads():
    out = bench("bench_feed.py", "--rows", 3000, "--steps", 12, "--step_seconds", 0.02, "--vocab_size", 600)
    shares = dict(re.findall(r"^  (threads \(the trainer\)|inline \(before\)) +([\d.]+)%", out, re.MULTILINE))
    ratio = float(re.search(r"inline / threads = ([\d.]+)x the waiting", out).group(1))
    assert len(shares) == 2 and ratio == pytest.approx(float(shares["inline (before)"])
                                                       / max(float(shares["threads (the trainer)"]), 1e-9), rel=0.1)


def test_bench_export_compares_transformers_with_ctranslate2_fp32_and_int8_on_two_models():
    pytest.importorskip("ctranslate2")
    out = bench("bench_export.py", "--smoke")
    assert out.startswith("SMOKE RUN (tiny sizes: not figures)")
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith(("| demo", "| large shape"))]
    assert [(row[1], row[2]) for row in rows] == [(batch, engine) for batch in ("8", "1") for engine in (
        "transformers", "ctranslate2 fp32", "ctranslate2 int8")] * 2
    # The large-shape model answers exactly 4 tokens per prompt with every engine: 8 prompts, then 2 one by one.
    assert [row[3] for row in rows[6:]] == ["32"] * 3 + ["8"] * 3


def test_gpu_check_runs_on_a_python_without_fire_termcolor_and_nltk_from_wheels_installed_offline(tmp_path):
    """As on a fresh clone on an offline GPU box: no ../shared is read, and the packages such images lack come from
    the wheels gpu_wheels.sh downloaded elsewhere (here they are hidden from this interpreter by a sitecustomize)."""
    wheels = tmp_path / "wheels"
    download = subprocess.run(["bash", "bench/gpu_wheels.sh", str(wheels)], cwd=REPO, capture_output=True, text=True,
                              timeout=300)
    if download.returncode != 0:
        pytest.skip(f"no package index to download the wheels from: {download.stderr[-300:]}")
    assert sorted(path.name.split("-")[0] for path in wheels.glob("*.whl")) == ["fire", "nltk", "termcolor"]
    env = child_env(PYTHONPATH=f"{REPO}/tests/without_extras:{REPO}", TMPDIR=str(tmp_path))
    command = ["bash", "bench/gpu_check.sh", "--smoke", "--steps", "6", "--out", str(tmp_path)]
    without = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert without.returncode == 2 and "error: these packages do not import here: fire termcolor nltk" in \
        without.stderr and "bash bench/gpu_wheels.sh DIR" in without.stderr
    result = subprocess.run(command + ["--wheels", str(wheels)], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=1500)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "NOT GPU figures" in result.stdout
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["versions"]["installed_from_wheels"] == "fire termcolor nltk"
    assert not [name for name, part in report.items() if isinstance(part, dict) and "error" in part], report
    eager, compiled = report["step_eager"], report["step_compiled"]
    assert (eager["compile"], compiled["compile"]) == (False, True)
    assert eager["samples_per_s"] > 0 and compiled["samples_per_s"] > 0
    train, resumed = report["train"], report["resume"]
    assert (train["exit"], resumed["exit"]) == (0, 0)
    assert resumed["resumed_from_step"] == 6 and resumed["steps_logged"] == [9]
    assert [step for step, _ in resumed["evaluations"]] == [3, 6, 9] and len(resumed["best_models"]) == 2
    assert list(report["seconds"]) == ["versions", "data", "step_eager", "step_compiled", "train", "resume",
                                       "out_of_memory"]


def test_gpu_check_tunes_the_train_parts_model_on_preference_pairs_when_asked(tmp_path):
    result = subprocess.run(["bash", "bench/gpu_check.sh", "--smoke", "--steps", "6", "--only", "dpo", "--out",
                             str(tmp_path)], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(report["seconds"]) == ["data", "train", "dpo"]  # what dpo needs first, in order
    dpo = report["dpo"]
    assert dpo["exit"] == 0 and dpo["reference_pass_s"] > 0 and dpo["steps_logged"] == [6]
    assert [step for step, _ in dpo["reward_accuracy"]] == [0, 3, 6] and dpo["reward_accuracy"][0][1] == 0.0


def test_gpu_check_writes_its_report_after_every_part_so_a_part_out_of_time_costs_only_its_own(tmp_path):
    """A part that runs past its limit is recorded as such, and the parts before it keep their figures (here the
    smoke run's data part gets 0.1 s, through the module's own table of limits)."""
    script = (f"import sys; sys.path[:0] = [{str(REPO)!r}, {REPO + '/bench'!r}]; import gpu_check; "
              "gpu_check.PARTS[1] = gpu_check.Part('data', 1, 0.1); sys.argv = ['gpu_check.py', '--smoke', "
              f"'--only', 'versions,data', '--out', {str(tmp_path)!r}]; gpu_check.main()")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=child_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["versions"]["torch"] and report["data"]["error"] == "timed out after its limit of 0.1 s"


def test_bench_chunk_shuffle_compares_documents_per_step_in_both_orders():
    shared_file("sample_train_3k.parquet")
    out = bench("bench_chunk_shuffle.py", "--books", 8, "--book_tokens", 4000, "--max_seq_len", 64,
                "--batch_size", 16, "--vocab_size", 600)
    figures = json.loads(out.strip().splitlines()[-1])
    assert figures["documents"] == 8 and figures["steps"] > 10
    assert figures["consecutive"] < 1.5 < 5 < figures["shuffled"] <= 8


def test_bench_dpo_reports_held_out_reward_accuracy_from_the_starting_model_on_and_both_models_bleu():
    shared_file("sample_train_3k.parquet")
    out = bench("bench_dpo.py", "--sft_steps", 20, "--dpo_steps", 6, "--valid_pairs", 20, "--vocab_size", 600,
                "--threads", 1)
    rows = [line.split() for line in out[out.index("held-out pairs"):].splitlines()[1:] if line.startswith("   ")]
    assert [int(row[0]) for row in rows] == [0, 2, 4, 6]
    assert rows[0][1:] == ["0.000", "0.000", "0.6931"]  # the starting model is the reference
    assert all(0 <= float(row[1]) <= 1 for row in rows)
    scores = re.search(r"BLEU-4 fine-tuned ([\d.]+), after DPO ([\d.]+); the references' loss fine-tuned ([\d.]+), "
                       r"after DPO ([\d.]+)", out)
    assert scores and all(0 <= float(value) for value in scores.groups()) and float(scores.group(3)) > 0
