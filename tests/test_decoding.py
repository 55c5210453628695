"""generate's decoding settings on both engines, and `generate --file`: each setting does what it says (beam search
finds likelier answers than greedy, a seed reproduces a sample, penalties cut repeats), the engines agree where
promised, a file of prompts is answered whole, resumably, in parts, and serve's step decoder (its key/value cache
padded across requests that join and leave at any step) gives generate's answers."""
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from config import DecodingSettings
from tests.cli_helpers import ENTRY, REPO, child_env, run_cli, run_cli_raw
from tests.inference_helpers import MAX_NEW_TOKENS

PROMPTS = 30


def settings(**changes) -> DecodingSettings:
    return DecodingSettings(**{"max_new_tokens": MAX_NEW_TOKENS, **changes})


def normalized_log_prob(engine, prompt: str, answer: list[int]) -> float:
    """log p(answer + [EOS] | prompt) per token: what beam search maximises (length_penalty 1)."""
    import torch

    labels = torch.tensor([answer + [engine.tokenizer.eos_token_id]])
    with torch.no_grad():
        logits = engine.model(**engine.tokenizer([prompt], return_tensors="pt"), labels=labels).logits
    return float(torch.log_softmax(logits.float(), -1)[0].gather(-1, labels[0][:, None]).sum()) / labels.shape[1]


def repeats(answers: list[list[int]], n: int = 1) -> int:
    """n-grams that occur again later in the same answer, summed over the answers."""
    grams = [list(zip(*(answer[i:] for i in range(n)))) for answer in answers]
    return sum(len(g) - len(set(g)) for g in grams)


@pytest.mark.slow
def test_beam_search_finds_likelier_answers_than_greedy(demo_model, demo_engine):
    # Beam search ends once num_beams candidates have ended (CTranslate2's rule, which makes both engines agree):
    # a heuristic, so on a few prompts its answer is less likely than greedy's; over the prompts it wins.
    prompts = demo_model["prompts"][:PROMPTS]
    greedy = demo_engine.answer_ids(prompts, settings())
    beam = demo_engine.answer_ids(prompts, settings(num_beams=4))
    scores = [(normalized_log_prob(demo_engine, p, g), normalized_log_prob(demo_engine, p, b))
              for p, g, b in zip(prompts, greedy, beam)]
    at_least_as_likely = sum(beam_score >= greedy_score - 1e-5 for greedy_score, beam_score in scores)
    likelier = sum(beam_score > greedy_score + 1e-3 for greedy_score, beam_score in scores)
    assert at_least_as_likely >= 0.8 * PROMPTS and likelier >= PROMPTS // 4
    assert sum(b for _, b in scores) > sum(g for g, _ in scores) + 0.02 * PROMPTS


@pytest.mark.slow
def test_a_seed_reproduces_a_sample_and_another_seed_samples_otherwise(demo_model, demo_engine):
    prompts = demo_model["prompts"][:PROMPTS]
    first = demo_engine.answer_ids(prompts, settings(do_sample=True, seed=1))
    assert demo_engine.answer_ids(prompts, settings(do_sample=True, seed=1)) == first
    other = demo_engine.answer_ids(prompts, settings(do_sample=True, seed=2))
    assert sum(a != b for a, b in zip(first, other)) >= PROMPTS // 2
    assert sum(a != b for a, b in zip(first, demo_engine.answer_ids(prompts, settings()))) >= PROMPTS // 2


@pytest.mark.slow
def test_generate_samples_the_same_answer_for_the_same_seed_from_the_command_line(demo_model):
    flags = dict(model_dir=demo_model["model_dir"], prompt=demo_model["prompts"][0], do_sample=True, temperature=1.5,
                 max_new_tokens=MAX_NEW_TOKENS)
    answers = [run_cli("generate", dict(flags, seed=seed)).stdout for seed in (7, 7, 8, 9, 10)]
    assert answers[0] == answers[1] and answers[0].strip()
    assert len(set(answers[1:])) >= 2  # other seeds: other samples


@pytest.mark.slow
def test_a_repetition_penalty_cuts_the_repeats_of_a_model_that_repeats(demo_model, demo_engine):
    prompts = demo_model["prompts"][:PROMPTS]
    plain = repeats(demo_engine.answer_ids(prompts, settings()))
    penalized = repeats(demo_engine.answer_ids(prompts, settings(repetition_penalty=1.3)))
    assert plain >= PROMPTS and penalized <= plain // 4


@pytest.mark.slow
def test_no_repeat_ngram_size_forbids_any_repeated_ngram(demo_model, demo_engine):
    prompts = demo_model["prompts"][:PROMPTS]
    assert repeats(demo_engine.answer_ids(prompts, settings()), n=2) >= PROMPTS // 2
    for size in (2, 3):
        assert repeats(demo_engine.answer_ids(prompts, settings(no_repeat_ngram_size=size)), n=size) == 0


def decode_in_steps(engine, requests: list[tuple[str, DecodingSettings]], join_at: list[int]) -> list[list[int]]:
    """Drive serve's step decoder as its scheduler does: request i joins the batch at step join_at[i] (behind
    those already in it) and leaves once it ends ([EOS] or its max_new_tokens); its answer's ids, without [EOS]."""
    from inference.stepper import Sequence, StepDecoder

    decoder = StepDecoder(engine.model, engine.tokenizer, engine.placement)
    sequences = [Sequence(engine.tokenizer(prompt)["input_ids"], wanted) for prompt, wanted in requests]
    eos, active = engine.tokenizer.eos_token_id, []
    for step in range(10_000):
        joining = [sequence for sequence, at in zip(sequences, join_at) if at == step]
        if joining:
            decoder.join(joining)
        active += joining
        if active:
            decoder.step(active)
        active = [s for s in active if s.generated[-1] != eos and len(s.generated) < s.settings.max_new_tokens]
        if not active and step >= max(join_at):
            break
    return [s.generated[:-1] if s.generated[-1] == eos else s.generated for s in sequences]


@pytest.mark.slow
def test_the_step_decoder_answers_as_generate_with_requests_joining_and_leaving_at_any_step(demo_model,
                                                                                             demo_engine):
    prompts = demo_model["prompts"][:12]
    assert len({len(demo_engine.tokenizer(p)["input_ids"]) for p in prompts}) >= 3  # prompts of several lengths
    kinds = [settings(), settings(repetition_penalty=1.3, no_repeat_ngram_size=2), settings(do_sample=True, seed=5),
             settings(max_new_tokens=3)]
    requests = [(prompt, kinds[index % len(kinds)]) for index, prompt in enumerate(prompts)]
    answers = decode_in_steps(demo_engine, requests, join_at=[0, 0, 1, 2, 2, 3, 5, 5, 6, 8, 9, 13])
    assert answers == [demo_engine.answer_ids([prompt], wanted)[0] for prompt, wanted in requests]
    assert len({len(answer) for answer in answers}) >= 3  # they left at different steps


@pytest.mark.slow
def test_the_step_decoder_keeps_relative_positions_right_in_long_answers_of_unequal_lengths(endless_model):
    # Answers up to 140 tokens, past the largest distance of T5's relative position bias (128), each row's cache
    # left-padded to the longest. The untrained model's position bias is scaled up, and the repetition penalty
    # keeps its answers from repeating one token, so that a row's positions shifted by its padding would change
    # the tokens.
    import torch

    from inference.engines import TransformersEngine

    engine = TransformersEngine.load(endless_model)
    with torch.no_grad():
        engine.model.decoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.mul_(20)
    lengths, prompts = [140, 30, 90, 5, 60, 120], ["叠字：日月", "x", "复述：火人北天南", "y", "倒序：西雪海", "z"]
    requests = [(prompt, settings(max_new_tokens=length, repetition_penalty=2.0))
                for prompt, length in zip(prompts, lengths)]
    answers = decode_in_steps(engine, requests, join_at=[0, 3, 3, 10, 40, 41])
    assert [len(answer) for answer in answers] == lengths  # this model never ends an answer by itself
    assert answers == [engine.answer_ids([prompt], wanted)[0] for prompt, wanted in requests]
    assert len(set(answers[0])) >= 20


@pytest.fixture(scope="module")
def exported(demo_model):
    pytest.importorskip("ctranslate2")  # in requirements-test.txt: skipped only where someone removed it
    from commands.export import export_model
    from inference.engines import CTranslate2Engine

    ct2_dir = str(demo_model["root"] / "ct2")
    export_model(demo_model["model_dir"], ct2_dir)
    return CTranslate2Engine.load(ct2_dir)


@pytest.mark.slow
@pytest.mark.parametrize("changes", [{}, dict(num_beams=2), dict(num_beams=4), dict(repetition_penalty=1.3),
                                     dict(no_repeat_ngram_size=2), dict(num_beams=4, max_new_tokens=3)])
def test_both_engines_give_the_same_greedy_and_beam_answers(demo_model, demo_engine, exported, changes):
    prompts = demo_model["prompts"][:50]
    wanted = settings(**changes)
    expected = demo_engine.answer_ids(prompts, wanted)
    assert len({tuple(answer) for answer in expected}) >= 20  # varied answers: the equality means something
    assert exported.answer_ids(prompts, wanted) == expected


@pytest.mark.slow
def test_ctranslate2_reproduces_its_samples_by_seed(demo_model, exported):
    prompts = demo_model["prompts"][:PROMPTS]
    first = exported.answer_ids(prompts, settings(do_sample=True, seed=3))
    assert exported.answer_ids(prompts, settings(do_sample=True, seed=3)) == first
    assert sum(a != b for a, b in zip(first, exported.answer_ids(prompts, settings(do_sample=True, seed=4)))) >= 5


def test_generate_needs_exactly_one_of_prompt_and_file(tmp_path):
    for extra in ([], ["--prompt=你好", f"--file={tmp_path / 'p.parquet'}"]):
        result = run_cli_raw(["generate", f"--model_dir={tmp_path}", *extra])
        assert result.returncode == 2 and not result.stdout
        assert result.stderr.startswith("error: --prompt is required, or --file (exactly one of them")


def test_sampling_in_beam_search_is_refused_with_ctranslate2_before_anything_loads(tmp_path):
    result = run_cli_raw(["generate", f"--model_dir={tmp_path}", "--prompt=你好", "--engine=ctranslate2",
                          "--do_sample=True", "--num_beams=2"])
    assert result.returncode == 2
    assert result.stderr == ("error: --num_beams=2 with --do_sample=True: CTranslate2 samples one candidate only; "
                             "use --num_beams=1, or --engine=transformers (beam sampling)\n")


@pytest.mark.parametrize("flag,problem", [("--top_p=0", "--top_p=0.0 is below the minimum 0.01"),
                                          ("--num_beams=0", "--num_beams=0 is below the minimum 1"),
                                          ("--temperature=-1", "--temperature=-1.0 is below the minimum 0.01")])
def test_decoding_flags_out_of_range_are_one_error_line(tmp_path, flag, problem):
    result = run_cli_raw(["generate", f"--model_dir={tmp_path}", "--prompt=你好", flag])
    assert result.returncode == 2 and result.stderr == f"error: {problem}\n"


# --- generate --file ---------------------------------------------------------------------------------------------


def prompts_file(path, prompts: list) -> str:
    table = pa.table({"id": pa.array(range(len(prompts)), pa.int64()), "prompt": pa.array(prompts, pa.string())})
    pq.write_table(table, path, row_group_size=7)  # row groups that do not line up with the parts
    return str(path)


def file_flags(model_dir: str, source: str, output: str, **extra) -> dict:
    return dict(model_dir=model_dir, file=source, output=output, batch_size=4, part_rows=10, **extra)


@pytest.mark.slow
def test_generate_file_answers_every_row_keeps_the_columns_and_order(demo_model, demo_engine, tmp_path):
    from inference.engines import answer_texts

    prompts = demo_model["prompts"][:37]
    prompts[5] = None  # a null prompt gets a null answer
    source, output = prompts_file(tmp_path / "prompts.parquet", prompts), str(tmp_path / "out" / "answers.parquet")
    result = run_cli("generate", file_flags(demo_model["model_dir"], source, output))
    table = pq.read_table(output)
    assert table.column_names == ["id", "prompt", "answer"] and table.column("id").to_pylist() == list(range(37))
    expected = answer_texts(demo_engine, [p for p in prompts if p is not None], settings(max_new_tokens=192))
    answers = table.column("answer").to_pylist()
    assert answers[5] is None and [a for i, a in enumerate(answers) if i != 5] == expected
    assert "37 rows answered now" in result.stdout and "answering" in result.stderr and "row/s" in result.stderr
    assert os.listdir(tmp_path / "out") == ["answers.parquet"]  # the parts and temporary files are gone

    again = run_cli("generate", file_flags(demo_model["model_dir"], source, output))
    assert "is complete already" in again.stdout and pq.read_table(output).equals(table)
    other = run_cli("generate", file_flags(demo_model["model_dir"], source, output, num_beams=2), check=False)
    assert other.returncode == 2 and other.stderr.startswith(f"error: --output={output}: holds answers made with "
                                                             "other flags")


def test_generate_file_refuses_an_output_it_did_not_write_and_a_missing_column(tmp_path):
    source = prompts_file(tmp_path / "prompts.parquet", ["你好"])
    (tmp_path / "mine.parquet").write_bytes(b"not ours")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    result = run_cli_raw(["generate", f"--model_dir={model}", f"--file={source}", f"--output={tmp_path / 'mine.parquet'}"])
    assert result.returncode == 2
    assert result.stderr == (f"error: --output={tmp_path / 'mine.parquet'}: exists and was not written by generate "
                             "--file; delete it or give another --output\n")
    result = run_cli_raw(["generate", f"--model_dir={model}", f"--file={source}", f"--output={tmp_path / 'a.parquet'}",
                          "--prompt_column=question"])
    assert result.returncode == 2 and "missing column 'question'" in result.stderr
    assert (tmp_path / "mine.parquet").read_bytes() == b"not ours" and not (tmp_path / "a.parquet").exists()


@pytest.mark.slow
def test_an_interrupted_generate_file_continues_where_it_stopped(demo_model, tmp_path):
    prompts = (demo_model["prompts"] * 4)[:200]
    source = prompts_file(tmp_path / "prompts.parquet", prompts)
    flags = dict(do_sample=True, seed=11, temperature=1.2)  # sampled: the resumed run must seed its parts alike
    uninterrupted = str(tmp_path / "whole.parquet")
    run_cli("generate", file_flags(demo_model["model_dir"], source, uninterrupted, **flags))

    output = str(tmp_path / "resumed.parquet")
    argv = [f"--{k}={v}" for k, v in file_flags(demo_model["model_dir"], source, output, **flags).items()]
    process = subprocess.Popen([sys.executable, ENTRY, "generate", *argv], cwd=REPO, env=child_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts_dir, deadline = output + ".parts", time.time() + 120
    while time.time() < deadline and len([n for n in os.listdir(parts_dir) if n.startswith("part-")]
                                          if os.path.isdir(parts_dir) else []) < 3:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)  # no clean-up of any kind: as a power cut
    process.wait()
    done = sorted(name for name in os.listdir(parts_dir) if name.startswith("part-"))
    assert 3 <= len(done) < 20 and not os.path.exists(output)

    resumed = run_cli("generate", file_flags(demo_model["model_dir"], source, output, **flags))
    assert "continuing" in resumed.stderr
    assert f"{200 - 10 * len(done)} rows answered now" in resumed.stdout
    assert pq.read_table(output).equals(pq.read_table(uninterrupted))
    assert not os.path.exists(parts_dir)


@pytest.mark.slow
def test_an_interrupted_run_is_not_continued_with_other_flags(demo_model, tmp_path):
    source = prompts_file(tmp_path / "prompts.parquet", demo_model["prompts"][:20])
    output = str(tmp_path / "answers.parquet")
    os.makedirs(output + ".parts")
    with open(os.path.join(output + ".parts", "job.json"), "w") as handle:
        handle.write('{"identity": {"input": "elsewhere"}, "base_seed": 1}')
    result = run_cli("generate", file_flags(demo_model["model_dir"], source, output), check=False)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: --output={output}: {output}.parts holds the parts of an interrupted run "
                                    "with other flags")
