"""`demo`: the embedded task trains end to end through `train`, and BLEU-4 visibly rises."""
import json
import os

from tests.cli_helpers import read_metrics, run_cli


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


def test_the_demo_starts_over_when_run_again_and_checks_its_flags(tmp_path):
    bad = run_cli("demo", {"output_dir": tmp_path, "lern_rate": 1}, check=False)
    assert bad.returncode == 2 and "did you mean --learn_rate?" in bad.stderr
