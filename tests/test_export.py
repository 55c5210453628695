"""`export`: a saved model becomes a CTranslate2 model that gives the same greedy answers as transformers, and
`generate --engine=ctranslate2` answers with it; every mistake is one `error:` line (exit 2) and touches nothing."""
import os
import shutil

import pyarrow.parquet as pq
import pytest

from tests.cli_helpers import REPO, run_cli, run_cli_raw



def needs_ctranslate2() -> None:
    """Skip a test that converts or runs a model when ctranslate2 is absent (it is in requirements-test.txt); the
    tests of the errors found before conversion, and of its absence, run without it."""
    pytest.importorskip("ctranslate2")

# One epoch of the demo (188 steps, ~10 s on one core): BLEU-4 ~0.1, so its answers are varied, half-right
# strings of the task's characters, unlike a model of a few steps, which answers every prompt alike.
SHORT_DEMO = dict(epochs=1, valid_rows=60, eval_batch_size=60)
BARELY_TRAINED_DEMO = dict(train_rows=200, valid_rows=60, epochs=2, eval_batch_size=60)
PROMPTS = 50
MAX_NEW_TOKENS = 24  # the demo's max_seq_len: the longest answer it was trained to give


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A demo model, its validation prompts, and its export (fp32), each made through the real CLI."""
    needs_ctranslate2()
    root = tmp_path_factory.mktemp("export")
    run_cli("demo", dict(SHORT_DEMO, output_dir=root / "demo", log_dir=root / "logs"), timeout=600)
    model_dir, ct2_dir = str(root / "demo" / "final"), str(root / "exported" / "fp32")
    exported = run_cli("export", {"model_dir": model_dir, "output_dir": ct2_dir})
    prompts = pq.read_table(root / "demo" / "data" / "valid.parquet").column("prompt").to_pylist()[:PROMPTS]
    return dict(model_dir=model_dir, ct2_dir=ct2_dir, prompts=prompts, stdout=exported.stdout)


@pytest.fixture(scope="module")
def barely_trained(tmp_path_factory) -> dict:
    """A demo model of 14 steps, which answers most prompts with [EOS] at once, and its export."""
    needs_ctranslate2()
    from commands.export import export_model

    root = tmp_path_factory.mktemp("barely")
    run_cli("demo", dict(BARELY_TRAINED_DEMO, output_dir=root / "demo", log_dir=root / "logs"))
    model_dir, ct2_dir = str(root / "demo" / "final"), str(root / "ct2")
    export_model(model_dir, ct2_dir)
    prompts = pq.read_table(root / "demo" / "data" / "valid.parquet").column("prompt").to_pylist()[:PROMPTS]
    return dict(model_dir=model_dir, ct2_dir=ct2_dir, prompts=prompts)


@pytest.fixture(scope="module")
def transformers_model(trained):
    from inference.saved_model import load_saved_model

    return load_saved_model(trained["model_dir"])


def transformers_ids(model_and_tokenizer, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    import torch

    model, tokenizer = model_and_tokenizer
    with torch.no_grad():
        output = model.generate(**tokenizer(prompts, return_tensors="pt", padding=True), do_sample=False,
                                num_beams=1, max_new_tokens=max_new_tokens)
    # Column 0 is the decoder's start; the answer ends before its first [EOS] (padding follows it in a batch).
    # A [PAD] before it is a token the model chose, and stays: a barely trained model repeats it.
    rows = [row[1:] for row in output.tolist()]
    return [row[:row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row for row in rows]


def ctranslate2_ids(ct2_dir: str, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    from inference.ctranslate2 import greedy_ids, load_translator

    translator, tokenizer = load_translator(ct2_dir, threads=1)
    return greedy_ids(translator, tokenizer, prompts, max_new_tokens)


@pytest.mark.slow
def test_export_writes_a_self_contained_model_and_says_how_to_use_it(trained):
    assert sorted(os.listdir(trained["ct2_dir"])) == ["config.json", "model.bin", "shared_vocabulary.json",
                                                      "tokenizer.json", "tokenizer_config.json"]
    # The model was written under a temporary name and renamed: nothing else is left beside it.
    assert os.listdir(os.path.dirname(trained["ct2_dir"])) == ["fp32"]
    assert f"to {trained['ct2_dir']} (CTranslate2, fp32 weights" in trained["stdout"]
    assert f"generate --engine=ctranslate2 --model_dir={trained['ct2_dir']}" in trained["stdout"]


@pytest.mark.slow
@pytest.mark.parametrize("max_new_tokens", [MAX_NEW_TOKENS, 3])  # 3: most answers are cut before their [EOS]
def test_ctranslate2_gives_the_same_greedy_answers_as_transformers(trained, transformers_model, max_new_tokens):
    expected = transformers_ids(transformers_model, trained["prompts"], max_new_tokens)
    answers = ctranslate2_ids(trained["ct2_dir"], trained["prompts"], max_new_tokens)
    assert len(answers) == len(expected) == PROMPTS
    assert len({tuple(answer) for answer in expected}) >= 20  # varied answers: the equality below means something
    assert [index for index in range(PROMPTS) if answers[index] != expected[index]] == []


@pytest.mark.slow
def test_an_answer_that_begins_with_eos_is_empty_with_ctranslate2_too(barely_trained):
    from inference.saved_model import load_saved_model

    expected = transformers_ids(load_saved_model(barely_trained["model_dir"]), barely_trained["prompts"],
                                MAX_NEW_TOKENS)
    assert len(expected) == PROMPTS and sum(answer == [] for answer in expected) >= PROMPTS // 2
    assert ctranslate2_ids(barely_trained["ct2_dir"], barely_trained["prompts"], MAX_NEW_TOKENS) == expected
    result = run_cli("generate", {"model_dir": barely_trained["ct2_dir"], "engine": "ctranslate2",
                                  "prompt": barely_trained["prompts"][0]})
    assert result.stdout == "\n" and result.stderr.startswith("(the answer is empty: the model's first token")


@pytest.mark.slow
def test_generate_with_ctranslate2_prints_the_same_answer_as_generate(trained):
    flags = {"prompt": trained["prompts"][0], "max_new_tokens": MAX_NEW_TOKENS}
    plain = run_cli("generate", dict(flags, model_dir=trained["model_dir"]))
    fast = run_cli("generate", dict(flags, model_dir=trained["ct2_dir"], engine="ctranslate2"))
    assert plain.stdout.strip() and fast.stdout == plain.stdout
    assert "Loading weights" not in fast.stderr and "%|" not in fast.stderr, fast.stderr


@pytest.mark.slow
def test_an_int8_export_is_a_quarter_of_the_size_loads_and_answers_like_fp32(trained, tmp_path):
    from inference.ctranslate2 import ctranslate2_answers

    int8_dir = str(tmp_path / "int8")
    result = run_cli("export", {"model_dir": trained["model_dir"], "output_dir": int8_dir, "quantization": "int8"})
    assert "int8 weights" in result.stdout
    size = os.path.getsize(os.path.join(int8_dir, "model.bin"))
    assert size < 0.3 * os.path.getsize(os.path.join(trained["ct2_dir"], "model.bin"))
    int8 = ctranslate2_answers(int8_dir, trained["prompts"], MAX_NEW_TOKENS)
    fp32 = ctranslate2_answers(trained["ct2_dir"], trained["prompts"], MAX_NEW_TOKENS)
    # This half-trained model's top tokens are close: int8 rounding changes some answers (40 of 50 stay equal).
    assert len(int8) == PROMPTS and sum(a == b for a, b in zip(int8, fp32)) >= PROMPTS // 2


@pytest.mark.slow
def test_a_failed_conversion_leaves_nothing_behind(trained, tmp_path):
    from commands.export import export_model
    from utils.errors import UserError

    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(trained["model_dir"]):
        if name.endswith(".json"):
            shutil.copy(os.path.join(trained["model_dir"], name), broken)
    (broken / "model.safetensors").write_bytes(b"\0" * 100)  # a weights file cut short
    with pytest.raises(UserError, match=f"^--model_dir={broken}: the model does not convert: "):
        export_model(str(broken), str(tmp_path / "out" / "ct2"))
    assert os.listdir(tmp_path / "out") == []  # neither the model nor its temporary directory


def fake_saved_model(directory) -> str:
    """A directory that passes export's first check (it holds a config.json), for errors found before conversion."""
    directory.mkdir()
    (directory / "config.json").write_text("{}")
    return str(directory)


def test_export_refuses_a_non_empty_output_dir_and_leaves_it_as_it_was(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep me")
    result = run_cli_raw(["export", f"--model_dir={fake_saved_model(tmp_path / 'model')}",
                          f"--output_dir={tmp_path / 'out'}"])
    assert result.returncode == 2
    assert result.stderr == (f"error: --output_dir={tmp_path / 'out'}: {tmp_path / 'out'} is not empty; export "
                             "deletes nothing, so give a new or empty directory\n")
    assert os.listdir(tmp_path / "out") == ["notes.txt"] and (tmp_path / "out" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("flags,problem", [
    (["--output_dir=OUT"], "error: --model_dir is required (see --help)\n"),
    (["--model_dir=MISSING", "--output_dir=OUT"],
     "error: --model_dir=MISSING: no saved model there (expected a best/ or final/ directory)\n"),
])
def test_export_without_a_saved_model_is_one_error_line_and_writes_nothing(tmp_path, flags, problem):
    paths = {"OUT": str(tmp_path / "out"), "MISSING": str(tmp_path / "missing")}
    result = run_cli_raw(["export"] + [flag.replace("OUT", paths["OUT"]).replace("MISSING", paths["MISSING"])
                                       for flag in flags])
    assert result.returncode == 2
    assert result.stderr == problem.replace("MISSING", paths["MISSING"])
    assert os.listdir(tmp_path) == []


def test_export_without_ctranslate2_says_how_to_install_it(tmp_path):
    fake = tmp_path / "site" / "ctranslate2"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named ctranslate2')\n")
    result = run_cli_raw(["export", f"--model_dir={fake_saved_model(tmp_path / 'model')}",
                          f"--output_dir={tmp_path / 'out'}"],
                         env={"PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), REPO])})
    assert result.returncode == 2
    assert result.stderr == "error: ctranslate2 is not installed (it is optional): pip install ctranslate2\n"
    assert not (tmp_path / "out").exists()


def test_generate_with_ctranslate2_on_a_saved_model_says_to_export_it_first(tmp_path):
    model_dir = fake_saved_model(tmp_path / "final")
    result = run_cli_raw(["generate", "--engine=ctranslate2", f"--model_dir={model_dir}", "--prompt=你好"])
    assert result.returncode == 2
    assert result.stderr == (f"error: --model_dir={model_dir}: not a model written by export (no model.bin or "
                             f"tokenizer.json); run `python train_low_mem.py export --model_dir={model_dir} "
                             f"--output_dir={model_dir}-ct2` first\n")


def test_an_exported_model_given_to_the_transformers_engine_names_the_right_engine(tmp_path):
    model_dir = fake_saved_model(tmp_path / "ct2")
    (tmp_path / "ct2" / "model.bin").write_bytes(b"")
    result = run_cli_raw(["generate", f"--model_dir={model_dir}", "--prompt=你好"])
    assert result.returncode == 2
    assert result.stderr == (f"error: --model_dir={model_dir}: a CTranslate2 model written by export, not a saved "
                             "model (generate reads it with --engine=ctranslate2)\n")


def test_export_and_generate_help_list_the_new_flags():
    export_help = run_cli_raw(["export", "--help"]).stdout
    assert all(f"--{name}" in export_help for name in ("model_dir", "output_dir", "quantization"))
    assert "int8 = 4x smaller, faster on CPU, answers may differ slightly" in export_help
    assert "--engine='transformers'" in run_cli_raw(["generate", "--help"]).stdout
