"""`demo`: the embedded task trains end to end through `train`, and BLEU-4 visibly rises."""
import json
import os

import pytest

from commands.demo import MARKER
from tests.cli_helpers import TINY_MODEL, read_metrics, run_cli

pytestmark = pytest.mark.slow

# A demo of a few seconds: a handful of rows, one epoch, the tests' tiny model.
TINY_DEMO = dict(train_rows=64, valid_rows=16, eval_batch_size=16, epochs=1, **TINY_MODEL)


def test_a_shortened_demo_leaves_every_artefact_and_bleu_rises(tmp_path):
    output_dir = str(tmp_path / "demo")
    result = run_cli("demo", {"output_dir": output_dir, "epochs": 5, "log_dir": tmp_path / "logs"},
                     timeout=600)
    bleu = [r["bleu4"] for r in read_metrics(output_dir, "eval")]
    assert len(bleu) >= 5 and bleu[-1] > max(0.2, bleu[0] + 0.15), bleu
    assert "BLEU-4 on held-out rows" in result.stdout and "->" in result.stdout
    for artefact in ("final/model.safetensors", "final/tokenizer.json", "checkpoints.json", "metrics.jsonl",
                     "tokenizer/tokenizer.json", "data/train.parquet", "data/valid.parquet"):
        assert os.path.exists(os.path.join(output_dir, artefact)), artefact
    with open(os.path.join(output_dir, "checkpoints.json"), encoding="utf-8") as listing:
        best = json.load(listing)["best"]
    assert best[0]["bleu4"] == max(bleu) and len(best) <= 3
    assert os.listdir(tmp_path / "logs")


@pytest.fixture(scope="module")
def demo_run_twice(tmp_path_factory) -> str:
    """A seconds-long demo run twice into one directory, with a stray file left in it between the runs."""
    tmp_path = tmp_path_factory.mktemp("demo_twice")
    flags = dict(TINY_DEMO, output_dir=tmp_path / "demo", log_dir=tmp_path / "logs")
    run_cli("demo", flags)
    (tmp_path / "demo" / "stray.txt").write_text("left by the first run")
    run_cli("demo", flags)
    return str(tmp_path / "demo")


def test_running_the_demo_again_starts_its_own_directory_over(demo_run_twice):
    assert not os.path.exists(os.path.join(demo_run_twice, "stray.txt"))
    assert os.path.isfile(os.path.join(demo_run_twice, MARKER))
    assert os.path.isfile(os.path.join(demo_run_twice, "final", "model.safetensors"))


def test_evaluate_and_generate_on_a_demo_model_print_no_library_progress_bars(demo_run_twice):
    model_dir = os.path.join(demo_run_twice, "final")
    valid = os.path.join(demo_run_twice, "data", "valid.parquet")
    evaluation = run_cli("evaluate", {"model_dir": model_dir, "file": valid, "max_samples": 4, "max_seq_len": 24})
    answer = run_cli("generate", {"model_dir": model_dir, "prompt": "复述：春夏", "max_new_tokens": 8})
    for result in (evaluation, answer):
        assert "Loading weights" not in result.stderr and "%|" not in result.stderr, result.stderr


def test_the_demo_refuses_a_non_empty_directory_it_did_not_create_and_leaves_it_as_it_was(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    result = run_cli("demo", dict(TINY_DEMO, output_dir=tmp_path, log_dir=tmp_path / "logs"), check=False)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: --output_dir={tmp_path}: ") and len(result.stderr.splitlines()) == 1
    assert os.listdir(tmp_path) == ["notes.txt"] and (tmp_path / "notes.txt").read_text() == "keep me"


def test_the_demo_never_writes_its_data_or_tokenizer_over_files_it_did_not_create(tmp_path):
    mine = {"train_file": tmp_path / "train.parquet", "validation_file": tmp_path / "valid.parquet",
            "tokenizer_dir": tmp_path / "tokenizer"}
    for path in (mine["train_file"], mine["validation_file"]):
        path.write_bytes(b"my data")
    mine["tokenizer_dir"].mkdir()
    result = run_cli("demo", dict(TINY_DEMO, output_dir=tmp_path / "demo", log_dir=tmp_path / "logs", **mine),
                     check=False)
    assert result.returncode == 2
    assert [line.split(":")[1] for line in result.stderr.splitlines()] == [f" --{name}" for name in mine]
    assert mine["train_file"].read_bytes() == mine["validation_file"].read_bytes() == b"my data"
    assert not os.listdir(mine["tokenizer_dir"]) and sorted(os.listdir(tmp_path)) == ["tokenizer", "train.parquet",
                                                                                      "valid.parquet"]


def test_the_demo_checks_its_flags_like_train(tmp_path):
    bad = run_cli("demo", {"output_dir": tmp_path, "lern_rate": 1}, check=False)
    assert bad.returncode == 2 and "did you mean --learn_rate?" in bad.stderr
