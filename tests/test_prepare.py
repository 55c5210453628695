"""`prepare`: every input format and compression, every cleaning rule, exact and near deduplication against planted
duplicates of known Jaccard, the split after deduplication, seeded determinism, resuming after a kill, and the
errors a user can fix. Most tests run the command in-process (fast); the end-to-end ones run the real CLI."""
import csv
import gzip
import io
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from cli_helpers import ENTRY, REPO, TINY_MODEL, child_env, run_cli, run_cli_raw, tiny_run_flags
from commands.prepare import prepare_command
from commands.options import PrepareFlags
from config import TrainConfig, with_resolved_paths
from data_pipeline.parquet import expand_paths
from preparation import layout
from preparation.candidates import bucket_pairs
from preparation.formats import Opened, read_rows, source_of
from preparation.minhash import optimal_banding, shingle_hashes

COMMON_CHARACTERS = [chr(code) for code in range(0x4E00, 0x4E00 + 3000)]


def random_text(rng: random.Random, length: int) -> str:
    """Chinese-looking text whose 5-grams no other random text shares (Jaccard ~0 between two of them)."""
    return "".join(rng.choice(COMMON_CHARACTERS) for _ in range(length))


def shingles(text: str, n: int = 5) -> set:
    return {text[i:i + n] for i in range(max(1, len(text) - n + 1))}


def jaccard(first: str, second: str) -> float:
    a, b = shingles(first), shingles(second)
    return len(a & b) / len(a | b)


def substitute(text: str, rng: random.Random, count: int) -> str:
    """`count` characters replaced, spread evenly (each change touches its own 5 shingles)."""
    chars = list(text)
    for k in range(count):
        position = (k + 1) * len(chars) // (count + 1)
        chars[position] = rng.choice([c for c in COMMON_CHARACTERS[:50] if c != chars[position]])
    return "".join(chars)


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    return str(path)


def run_prepare(tmp_path, inputs, name="out", **flags):
    """prepare in-process; returns (report, train rows, valid rows) with rows as tuples of the output columns."""
    output_dir = tmp_path / name
    settings = dict(valid_rows=0, dedup="none", min_chars=1)
    settings.update(flags)
    prepare_command(PrepareFlags(input=",".join(map(str, inputs)), output_dir=str(output_dir), **settings))
    with open(output_dir / layout.REPORT_FILE, encoding="utf-8") as handle:
        report = json.load(handle)
    return report, read_rows_of(output_dir / layout.TRAIN_FILE), read_rows_of(output_dir / layout.VALID_FILE)


def read_rows_of(path) -> list[tuple]:
    if not os.path.exists(path):
        return []
    table = pq.read_table(path)
    return list(zip(*(table.column(name).to_pylist() for name in table.column_names)))


# -- inputs -------------------------------------------------------------------------------------------------------
ROWS = [{"prompt": "你好吗", "response": "我很好，谢谢"}, {"prompt": "第二个问题", "response": "第二个回答\n两行"},
        {"prompt": "引号\"和,逗号", "response": "没问题"}]


def write_format(directory, fmt: str, compression: str | None) -> str:
    """ROWS in `fmt` (text: one document per line), compressed or not."""
    ending = {"gzip": ".gz", "zstd": ".zst", None: ""}[compression]
    path = os.path.join(directory, f"rows.{ {'text': 'txt'}.get(fmt, fmt) }{ending}")
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(ROWS), path)
        return path
    buffer = io.StringIO()
    if fmt == "jsonl":
        buffer.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in ROWS))
    elif fmt == "json":
        json.dump(ROWS, buffer, ensure_ascii=False, indent=2)
    elif fmt in ("csv", "tsv"):
        writer = csv.DictWriter(buffer, ["prompt", "response"], delimiter="," if fmt == "csv" else "\t")
        writer.writeheader()
        writer.writerows(ROWS)
    else:
        buffer.write("".join(row["prompt"] + row["response"].replace("\n", " ") + "\n" for row in ROWS))
    data = buffer.getvalue().encode("utf-8")
    data = gzip.compress(data) if compression == "gzip" else \
        zstandard.ZstdCompressor().compress(data) if compression == "zstd" else data
    with open(path, "wb") as out:
        out.write(data)
    return path


@pytest.mark.parametrize("compression", [None, "gzip", "zstd"])
@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "tsv", "text"])
def test_each_row_format_reads_every_row_plain_and_compressed(tmp_path, fmt, compression):
    path = write_format(tmp_path, fmt, compression)
    source = source_of(path)
    assert (source.format, source.compression) == (fmt, compression)
    opened = Opened(source)
    records = list(read_rows(opened, source, text_blocks=False))
    opened.close()
    if fmt == "text":
        assert [r.fields["text"] for r in records] == [row["prompt"] + row["response"].replace("\n", " ")
                                                       for row in ROWS]
    else:
        assert [r.fields for r in records] == ROWS


def test_every_format_together_gives_the_same_rows(tmp_path):
    paths = [write_format(tmp_path, fmt, compression)
             for fmt, compression in [("parquet", None), ("jsonl", "gzip"), ("json", "zstd"), ("csv", None),
                                      ("tsv", "gzip")]]
    report, train, _ = run_prepare(tmp_path, paths, collapse_whitespace=False)
    assert sorted(train) == sorted([(row["prompt"], row["response"]) for row in ROWS] * 5)
    assert [entry["rows"] for entry in report["inputs"]] == [3] * 5


def test_plain_text_blocks_are_documents_separated_by_blank_lines(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("第一段第一行\n第一段第二行\n\n\n第二段\n", encoding="utf-8")
    _, per_block, _ = run_prepare(tmp_path, [path], objective="span_corruption", text_blocks=True)
    _, per_line, _ = run_prepare(tmp_path, [path], name="lines", objective="span_corruption")
    assert sorted(per_block) == [("第一段第一行\n第一段第二行",), ("第二段",)]
    assert sorted(per_line) == [("第一段第一行",), ("第一段第二行",), ("第二段",)]


def test_conversation_and_alpaca_fields_are_mapped_to_prompt_and_response(tmp_path):
    chatml = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "system", "content": "你是助手"}, {"role": "user", "content": "一加一"},
        {"role": "assistant", "content": "等于二"}]}])
    sharegpt = write_jsonl(tmp_path / "share.jsonl", [{"conversations": [
        {"from": "human", "value": "天空什么颜色"}, {"from": "gpt", "value": "蓝色"}]}])
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "翻译", "input": "hello", "output": "你好"}])
    custom = write_jsonl(tmp_path / "custom.jsonl", [{"q": "问", "a": "答"}])
    _, train, _ = run_prepare(tmp_path, [chatml, sharegpt, alpaca], name="auto")
    assert sorted(train) == sorted([("你是助手\n一加一", "等于二"), ("天空什么颜色", "蓝色"), ("翻译\nhello", "你好")])
    _, train, _ = run_prepare(tmp_path, [custom], name="flags", prompt_column="q", response_column="a")
    assert train == [("问", "答")]


def test_rows_that_cannot_be_parsed_are_counted_with_file_and_line(tmp_path, capsys):
    jsonl = tmp_path / "mixed.jsonl"
    jsonl.write_bytes(b'{"prompt": "\xe5\xa5\xbd", "response": "\xe5\xa5\xbd\xe7\x9a\x84"}\n{broken\n'
                      b'\xff\xfe not utf-8\n[1, 2]\n{"prompt": "\xe6\xb2\xa1\xe6\x9c\x89"}\n')
    table = tmp_path / "short.csv"
    table.write_text("prompt,response\n问题,回答\n只有一个字段\n", encoding="utf-8")
    report, train, _ = run_prepare(tmp_path, [jsonl, table])
    assert sorted(train) == sorted([("问题", "回答"), ("好", "好的")])
    bad = {(example["file"], example["line"]): example["reason"] for example in report["read"]["bad_row_examples"]}
    assert set(bad) == {(str(jsonl), 2), (str(jsonl), 3), (str(jsonl), 4), (str(jsonl), 5), (str(table), 3)}
    assert bad[str(jsonl), 2].startswith("not JSON") and bad[str(jsonl), 3].startswith("not UTF-8")
    assert bad[str(jsonl), 4] == "not a JSON object" and bad[str(jsonl), 5] == "no field 'response'"
    assert report["read"]["bad_rows"] == 5
    assert f"{jsonl}:2: not JSON" in capsys.readouterr().out


def test_a_damaged_json_array_counts_one_bad_row_at_its_line(tmp_path):
    path = tmp_path / "array.json"
    path.write_text('[\n {"prompt": "甲", "response": "乙"},\n {"prompt": oops}\n]', encoding="utf-8")
    report, train, _ = run_prepare(tmp_path, [path])
    assert train == [("甲", "乙")]
    assert report["read"]["bad_row_examples"][0]["line"] == 3


def test_a_json_file_of_one_object_per_line_is_read_as_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "rows.json", ROWS)
    report, train, _ = run_prepare(tmp_path, [path], collapse_whitespace=False)
    assert sorted(train) == sorted((row["prompt"], row["response"]) for row in ROWS)
    assert report["inputs"][0]["format"] == "json" and report["read"]["bad_rows"] == 0


# -- cleaning -----------------------------------------------------------------------------------------------------
def clean_rows(tmp_path, texts, name, **flags):
    path = write_jsonl(tmp_path / f"{name}.jsonl", [{"text": text} for text in texts])
    report, train, _ = run_prepare(tmp_path, [path], name=name, objective="span_corruption", **flags)
    return report["cleaning"], sorted(row[0] for row in train)


def test_nfc_composes_and_nfkc_also_folds_full_width_punctuation(tmp_path):
    texts = ["cafe\u0301里", "你好，世界！"]
    counts, rows = clean_rows(tmp_path, texts, "nfc")
    assert rows == sorted(["café里", "你好，世界！"]) and counts["changed"]["normalization"] == 1
    counts, rows = clean_rows(tmp_path, texts, "nfkc", normalization="NFKC")
    assert rows == sorted(["café里", "你好,世界!"]) and counts["changed"]["normalization"] == 2
    counts, rows = clean_rows(tmp_path, texts, "none", normalization="none")
    assert "cafe\u0301里" in rows and counts["changed"]["normalization"] == 0


def test_invisible_and_control_characters_are_removed_unless_turned_off(tmp_path):
    texts = ["零\u200b宽\ufeff字\x07符", "干净的行"]
    counts, rows = clean_rows(tmp_path, texts, "on")
    assert rows == sorted(["零宽字符", "干净的行"]) and counts["changed"]["remove_invisible"] == 1
    _, rows = clean_rows(tmp_path, texts, "off", remove_invisible=False)
    assert "零\u200b宽\ufeff字\x07符" in rows


def test_whitespace_is_collapsed_keeping_single_blank_lines(tmp_path):
    counts, rows = clean_rows(tmp_path, ["  两个   空格\t\t和制表符  \n\n\n\n下一段 ", "无需改动"], "ws")
    assert rows == sorted(["两个 空格 和制表符\n\n下一段", "无需改动"]) and counts["changed"]["collapse_whitespace"] == 1


def test_traditional_chinese_becomes_simplified_when_asked(tmp_path):
    counts, rows = clean_rows(tmp_path, ["漢字轉換測試", "简体不变"], "t2s", traditional_to_simplified=True)
    assert rows == sorted(["汉字转换测试", "简体不变"]) and counts["changed"]["traditional_to_simplified"] == 1
    _, rows = clean_rows(tmp_path, ["漢字轉換測試"], "kept")
    assert rows == ["漢字轉換測試"]


def test_each_dropping_rule_drops_and_counts_its_own_rows(tmp_path):
    texts = ["  \u200b ", "短", "刚好够长的行", "这一行实在是太长了超过了上限", "abcde中"]
    counts, rows = clean_rows(tmp_path, texts, "drop", min_chars=3, max_chars=10, min_cjk_share=0.5)
    assert rows == ["刚好够长的行"]
    assert counts["dropped"] == {"empty": 1, "too_short": 1, "too_long": 1, "low_cjk_share": 1}


# -- deduplication ------------------------------------------------------------------------------------------------
def planted_corpus(count: int = 300, seed: int = 0):
    """Distinct base texts, plus copies: exact ones, near ones (1 change: substitution, insertion or deletion,
    Jaccard > 0.9) and far ones (12 substitutions, Jaccard < 0.5). Returns (rows, {kind: [(original, copy)]})."""
    rng = random.Random(seed)
    bases = [random_text(rng, 150) for _ in range(count)]
    pairs = {"exact": [], "near": [], "far": []}
    rows = list(bases)
    for index, base in enumerate(bases[:60]):
        kind = ("exact", "near", "far")[index % 3]
        if kind == "exact":
            copy = base
        elif kind == "far":
            copy = substitute(base, rng, 12)
        else:
            position = 40 + index
            copy = [substitute(base, rng, 1), base[:position] + "插" + base[position:],
                    base[:position] + base[position + 1:]][(index // 3) % 3]
        pairs[kind].append((base, copy))
        rows.append(copy)
    order = list(range(len(rows)))
    rng.shuffle(order)
    return [rows[i] for i in order], pairs


def test_planted_exact_and_near_duplicates_are_found_and_far_ones_kept(tmp_path):
    rows, pairs = planted_corpus()
    assert all(jaccard(a, b) > 0.9 for a, b in pairs["near"])
    assert all(jaccard(a, b) < 0.5 for a, b in pairs["far"])
    path = write_jsonl(tmp_path / "planted.jsonl", [{"text": text} for text in rows])
    report, train, _ = run_prepare(tmp_path, [path], objective="span_corruption", dedup="near")
    kept = {row[0] for row in train}
    dedup = report["dedup"]
    assert dedup["exact_dropped"] == 20 and dedup["near_dropped"] == 20 and dedup["near_clusters"] == 20
    for original, copy in pairs["near"]:
        # exactly one of each near pair survives: the one read first
        assert (original in kept) != (copy in kept)
        first = original if rows.index(original) < rows.index(copy) else copy
        assert first in kept
    assert all(a in kept and b in kept for a, b in pairs["far"])
    assert len(kept) == len(rows) - 40
    example = dedup["examples"][0]
    assert jaccard(example["kept"]["text"], example["removed"]["text"]) > 0.9
    assert example["estimated_jaccard"] >= 0.8 and example["kept"]["line"] < example["removed"]["line"]


def test_the_threshold_decides_which_near_duplicates_are_found(tmp_path):
    rng = random.Random(5)
    bases = [random_text(rng, 150) for _ in range(40)]
    # Three substitutions: Jaccard ~0.82 (a "few characters changed"), found at 0.7, not at 0.95.
    copies = [substitute(base, rng, 3) for base in bases]
    truths = [jaccard(a, b) for a, b in zip(bases, copies)]
    assert 0.78 < min(truths) and max(truths) < 0.86
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": text} for text in bases + copies])
    low, _, _ = run_prepare(tmp_path, [path], name="low", objective="span_corruption", dedup="near",
                            dedup_threshold=0.7)
    high, _, _ = run_prepare(tmp_path, [path], name="high", objective="span_corruption", dedup="near",
                             dedup_threshold=0.95)
    assert low["dedup"]["near_dropped"] == 40
    assert high["dedup"]["near_dropped"] == 0


def test_no_validation_row_equals_or_near_duplicates_a_training_row(tmp_path):
    rows, _ = planted_corpus(count=400, seed=1)
    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": text[:30], "response": text[30:]} for text in rows])
    report, train, valid = run_prepare(tmp_path, [path], dedup="near", valid_rows=100)
    assert len(valid) == 100 and report["rows_out"] == {"train": len(train), "valid": 100}
    train_texts = ["\n".join(row) for row in train]
    for row in valid:
        text = "\n".join(row)
        assert text not in train_texts
        assert max(jaccard(text, other) for other in train_texts) < 0.8


def test_exact_dedup_alone_keeps_near_duplicates(tmp_path):
    rows, _ = planted_corpus()
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": text} for text in rows])
    report, train, _ = run_prepare(tmp_path, [path], objective="span_corruption", dedup="exact")
    assert report["dedup"]["exact_dropped"] == 20 and "near_dropped" not in report["dedup"]
    assert len(train) == len(rows) - 20


def test_bucket_pairs_link_every_member_to_its_first_and_previous_row():
    keys = np.array([1, 1, 1, 1, 5, 7, 7], dtype=np.uint64)
    rows = np.array([2, 4, 9, 11, 3, 0, 8], dtype=np.uint32)
    first, second = bucket_pairs(keys, rows)
    assert sorted(zip(first.tolist(), second.tolist())) == [(0, 8), (2, 4), (2, 9), (2, 11), (4, 9), (9, 11)]


def test_shingles_never_cross_from_one_text_into_the_next():
    hashes, offsets = shingle_hashes(["甲乙丙丁戊己", "庚"], 5)
    alone, _ = shingle_hashes(["甲乙丙丁戊己"], 5)
    short, _ = shingle_hashes(["庚"], 5)
    assert offsets.tolist() == [0, 2, 3]
    assert hashes[:2].tolist() == alone.tolist() and hashes[2:].tolist() == short.tolist()


def test_the_banding_proposes_pairs_above_the_threshold_and_rarely_below():
    banding = optimal_banding(0.8, 128)
    assert banding.bands * banding.rows <= 128
    assert banding.candidate_probability(0.9) > 0.99 and banding.candidate_probability(0.5) < 0.05


# -- split, determinism, layout -------------------------------------------------------------------------------------
def test_seeded_output_is_identical_across_runs_and_changes_with_the_seed(tmp_path):
    rows, _ = planted_corpus()
    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": text[:20], "response": text[20:]} for text in rows])
    outputs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        run_prepare(tmp_path, [path], name=name, dedup="near", valid_rows=30, seed=seed)
        outputs.append({file: (tmp_path / name / file).read_bytes() for file in (layout.TRAIN_FILE, layout.VALID_FILE)})
    assert outputs[0] == outputs[1]
    assert outputs[0][layout.TRAIN_FILE] != outputs[2][layout.TRAIN_FILE]


def test_outputs_have_row_groups_of_5000_and_a_fraction_split(tmp_path):
    rng = random.Random(2)
    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": f"问题{i}", "response": random_text(rng, 12)}
                                                 for i in range(12_500)])
    report, train, valid = run_prepare(tmp_path, [path], valid_fraction=0.1, valid_rows=PrepareFlags.valid_rows)
    assert (len(train), len(valid)) == (11_250, 1_250)
    metadata = pq.ParquetFile(tmp_path / "out" / layout.TRAIN_FILE).metadata
    assert [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)] == [5000, 5000, 1250]
    assert report["lengths"]["train"]["prompt"]["rows"] == 11_250
    assert os.path.getsize(tmp_path / "out" / layout.HISTOGRAM_FILES["train"]) > 10_000


def test_a_prepared_directory_stands_for_its_train_and_valid_files(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": f"问题{i}", "response": "回答"} for i in range(50)])
    run_prepare(tmp_path, [path], valid_rows=10)
    directory = str(tmp_path / "out")
    assert expand_paths(directory) == [os.path.join(directory, layout.TRAIN_FILE)]
    cfg = with_resolved_paths(TrainConfig(train_file=directory, validation_file=directory))
    assert cfg.validation_file == os.path.join(directory, layout.VALID_FILE)
    assert expand_paths(str(tmp_path)) == [str(tmp_path)]  # any other directory is left as it is


def test_a_rerun_with_the_same_flags_does_nothing_and_other_flags_need_overwrite(tmp_path, capsys):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": f"问题{i}", "response": "回答"} for i in range(50)])
    run_prepare(tmp_path, [path])
    before = (tmp_path / "out" / layout.TRAIN_FILE).stat().st_mtime_ns
    run_prepare(tmp_path, [path])
    assert "nothing to do" in capsys.readouterr().out
    assert (tmp_path / "out" / layout.TRAIN_FILE).stat().st_mtime_ns == before
    with pytest.raises(Exception, match="--overwrite=True"):
        run_prepare(tmp_path, [path], seed=9)
    _, train, _ = run_prepare(tmp_path, [path], seed=9, overwrite=True)
    assert len(train) == 50


# -- the real CLI ---------------------------------------------------------------------------------------------------
def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("case", ["unknown_format", "missing_column", "unreadable", "empty_result",
                                  "not_prepares_dir", "compressed_parquet"])
def test_bad_inputs_exit_2_naming_the_file_and_the_fix(tmp_path, case):
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "问题", "response": "回答"}])
    flags = {"output_dir": str(tmp_path / "out")}
    if case == "unknown_format":
        bad = tmp_path / "data.xml"
        bad.write_text("<rows/>")
        expected = [str(bad), "unknown format '.xml'", "--format="]
    elif case == "missing_column":
        bad, flags["prompt_column"] = good, "question"
        expected = [good, "no column 'question'", "--prompt_column=ONE_OF_THEM", "prompt, response"]
    elif case == "unreadable":
        bad = tmp_path / "broken.jsonl.gz"
        bad.write_bytes(b"this is not gzip data at all")
        expected = [str(bad), "cannot read it", "re-download"]
    elif case == "empty_result":
        bad, flags["min_chars"] = good, 100
        expected = [good, "no row", "left after cleaning", "too_short 1", "--min_chars"]
    elif case == "not_prepares_dir":
        bad = good
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "mine.txt").write_text("keep me")
        expected = [str(tmp_path / "out"), "not written by prepare", "nothing was deleted"]
    else:
        bad = tmp_path / "rows.parquet.gz"
        bad.write_bytes(gzip.compress(b"x"))
        expected = [str(bad), "decompress it first", "gunzip"]
    result = run_cli("prepare", {"input": str(bad), **flags}, check=False, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = error_lines(result)
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert all(part in lines[0] for part in expected), lines[0]
    if case == "not_prepares_dir":
        assert (tmp_path / "out" / "mine.txt").read_text() == "keep me"


def test_a_missing_input_or_bad_flag_exits_2():
    result = run_cli_raw(["prepare", "--input=/no/such/file.jsonl", "--dedup_threshold=2"])
    assert result.returncode == 2
    assert any("--dedup_threshold" in line for line in error_lines(result))
    result = run_cli_raw(["prepare", "--input=/no/such/*.jsonl"])
    assert result.returncode == 2 and "no file matches /no/such/*.jsonl" in result.stderr


def big_corpus(path, rows: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    texts = [random_text(rng, 60) for _ in range(rows // 2)]
    return write_jsonl(path, [{"prompt": f"第{i}题", "response": texts[i % len(texts)] if i % 7 else
                               substitute(texts[i % len(texts)], rng, 1)} for i in range(rows)])


@pytest.mark.slow
def test_killed_after_the_first_phase_and_rerun_gives_byte_identical_output(tmp_path):
    source = big_corpus(tmp_path / "rows.jsonl", 40_000)
    flags = ["prepare", f"--input={source}", "--valid_rows=500", "--seed=1"]
    reference = run_cli_raw(flags + [f"--output_dir={tmp_path / 'reference'}"], timeout=300)
    assert reference.returncode == 0, reference.stderr
    interrupted = tmp_path / "interrupted"
    manifest = interrupted / layout.WORK_DIR / "manifest.json"
    process = subprocess.Popen([sys.executable, ENTRY] + flags + [f"--output_dir={interrupted}"], cwd=REPO,
                               env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if "clean" in json.loads(manifest.read_text())["phases"]:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "prepare finished before it could be killed"
    assert not layout.is_prepared_dir(interrupted)  # nothing there looks finished
    assert not (interrupted / layout.TRAIN_FILE).exists()
    resumed = run_cli_raw(flags + [f"--output_dir={interrupted}"], timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout and "clean" in resumed.stdout
    for name in (layout.TRAIN_FILE, layout.VALID_FILE):
        assert (interrupted / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()
    first, second = (json.loads((directory / layout.REPORT_FILE).read_text())
                     for directory in (tmp_path / "reference", interrupted))
    assert first["dedup"] == second["dedup"] and first["cleaning"] == second["cleaning"]
    assert not (interrupted / layout.WORK_DIR).exists()


@pytest.mark.slow
def test_prepared_directory_feeds_train_tokenizer_plan_and_train(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"复述：{text}"}, {"role": "assistant", "content": text}]}
            for text in (random_text(random.Random(i), 8) for i in range(400))]
    source = write_jsonl(tmp_path / "chat.jsonl", rows)
    prepared = str(tmp_path / "prepared")
    result = run_cli("prepare", {"input": source, "output_dir": prepared, "valid_rows": 32})
    assert "wrote 368 training rows and 32 validation rows" in result.stdout
    tokenizer_dir = str(tmp_path / "tokenizer")
    run_cli("train_tokenizer", {"train_file": prepared, "tokenizer_dir": tokenizer_dir, "vocab_size": 600})
    plan = run_cli("plan", {"train_file": prepared, "json": True, "probe": False, "tokenizer_dir": tokenizer_dir,
                            **TINY_MODEL})
    assert json.loads(plan.stdout)["rows"] == 368
    flags = tiny_run_flags(tmp_path, tokenizer_dir, {"train_file": prepared, "validation_file": prepared},
                           max_steps=2, save_steps=2, epochs=1)
    run_cli("train", flags)
    events = [json.loads(line) for line in open(os.path.join(flags["output_dir"], "metrics.jsonl"))]
    assert any(event["event"] == "eval" for event in events)


@pytest.mark.slow
def test_prepared_documents_train_a_tokenizer_with_sentinels(tmp_path):
    documents = tmp_path / "docs.txt.gz"
    documents.write_bytes(gzip.compress("\n".join(random_text(random.Random(i), 40) for i in range(300)).encode()))
    prepared = str(tmp_path / "prepared")
    run_cli("prepare", {"input": str(documents), "output_dir": prepared, "objective": "span_corruption",
                        "valid_rows": 20})
    assert pq.read_schema(os.path.join(prepared, layout.TRAIN_FILE)).names == ["text"]
    result = run_cli("train_tokenizer", {"train_file": prepared, "tokenizer_dir": str(tmp_path / "tokenizer"),
                                         "vocab_size": 600, "text_column": "text"})
    assert "100 of them sentinels" in result.stdout


@pytest.mark.slow
def test_bench_prepare_smoke_reports_speed_memory_recall_and_the_baseline(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench", "bench_prepare.py"), "--smoke",
                             "--work_dir", str(tmp_path)], capture_output=True, text=True, cwd=REPO,
                            env=child_env(), timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    figures = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))[7:])
    size = figures["sizes"][0]
    ours, theirs = size["prepare"], size["datasketch_minhashlsh"]
    assert size["rows"] == 3000 and ours["rows_per_s"] > 0 and 50 < ours["peak_rss_mb"] < 3000
    assert ours["exact_removed"] == ours["exact_planted"] > 0
    assert ours["recall"] > 0.8 and ours["precision"] > 0.8
    assert ours["removed_by_true_jaccard"]["0.90-1.00"]["removed"] > 0.95
    assert ours["removed_by_true_jaccard"]["0.00-0.70"]["removed"] < 0.05
    assert 0 < theirs["recall"] <= 1 and theirs["peak_rss_mb"] > 0
    libraries = size["libraries"]
    assert libraries["rensa_ms_per_1000_rows"] < libraries["datasketch_ms_per_1000_rows"]
    assert libraries["pairs"] == 200 and libraries["accuracy"]["rensa"]["mean_abs_error"] < 0.1
