"""Shared test fixtures: the shared sample data, a parquet writer, and a tiny trained tokenizer."""

import random
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import settings

# No example database: the tests leave nothing in the repository (.hypothesis/), and every run draws the same way.
settings.register_profile("repository", database=None)
settings.load_profile("repository")

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # so `import model...` works however pytest is started

SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

TINY_VOCAB_SIZE = 1500


SHARED_DATA_SKIP = ("needs the shared sample rows in {folder} (real Chinese Q&A rows of the original project, "
                    "Apache-2.0; README: Tests)")


def shared_file(name: str) -> Path:
    """Path of a file in the shared sample data; skips the test where that folder is absent."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(SHARED_DATA_SKIP.format(folder=SHARED_DATA))
    return path


def sample_rows(name: str = "sample_train_3k.parquet") -> tuple[list[str], list[str]]:
    """Chinese Q&A rows for tests that need some, not these: the shared sample's where present, else 3,000
    generated ones, so that such tests run on every clone."""
    path = SHARED_DATA / name
    if not path.is_file():
        return tiny_corpus_rows(3000, seed=3)
    table = pq.read_table(path, columns=["prompt", "response"])
    return table.column("prompt").to_pylist(), table.column("response").to_pylist()


def pytest_terminal_summary(terminalreporter):
    """Why tests skipped, once per reason, at the end of the run (`-q` alone prints only their number)."""
    reasons = Counter(report.longrepr[2].removeprefix("Skipped: ") for report in terminalreporter.stats.get("skipped", [])
                      if isinstance(report.longrepr, tuple))
    for reason, count in reasons.items():
        terminalreporter.write_line(f"{count} skipped: {reason}")


def write_parquet(path, prompts, responses, row_group_size=None) -> Path:
    """Writes a `prompt`/`response` parquet (None allowed for nulls) and returns its path."""
    table = pa.table({"prompt": pa.array(prompts, pa.string()), "response": pa.array(responses, pa.string())})
    pq.write_table(table, path, row_group_size=row_group_size)
    return Path(path)


_CHINESE_PHRASES = (
    "今天天气很好", "我们一起去公园散步", "这个问题的答案是什么", "请问怎么学习编程", "多喝水，早点休息",
    "建议去医院做个检查", "北京是中国的首都", "人工智能正在改变世界", "他说：“明天见！”", "《红楼梦》很经典",
    "价格大约是１２０元", "注意身体健康", "谢谢你的帮助", "周末有什么安排？", "学习需要坚持",
)
_ENGLISH_PHRASES = (
    "Hello, world!", "The quick brown fox jumps over the lazy dog.", "Python 3.11 is fast",
    "e.g. use pip install", "It's 42 degrees", "T5 model (small)", "see https://example.com/a?b=1",
)
_EXTRAS = ("😀", "👍", "～", "、", "……", "\n", "\t", "  ", "2024-05-01", "3.1415", "ＡＢＣ", "①")


def tiny_corpus_rows(count: int = 300, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic mixed Chinese/English Q&A rows for training small tokenizers."""
    rng = random.Random(seed)
    pieces = _CHINESE_PHRASES * 3 + _ENGLISH_PHRASES + _EXTRAS

    def text(parts: int) -> str:
        return "".join(rng.choice(pieces) for _ in range(parts))

    prompts = [text(rng.randint(1, 3)) + rng.choice("？?") for _ in range(count)]
    responses = [text(rng.randint(2, 8)) for _ in range(count)]
    return prompts, responses


def raw_documents(count: int, seed: int = 0) -> list:
    """Documents of very different lengths (a phrase to a few hundred characters), one null and one empty among
    them, for span corruption."""
    rng = random.Random(seed)
    pieces = _CHINESE_PHRASES * 3 + _ENGLISH_PHRASES + _EXTRAS
    documents = ["".join(rng.choice(pieces) for _ in range(rng.choice((1, 2, 5, 10, 40)))) for _ in range(count)]
    documents[count // 3], documents[count // 2] = None, ""
    return documents


def write_text_parquet(path, documents, row_group_size=None, column="text") -> Path:
    """A parquet of raw documents in one text column (and an unrelated column, as real corpora have)."""
    table = pa.table({"id": pa.array(range(len(documents)), pa.int64()), column: pa.array(documents, pa.string())})
    pq.write_table(table, path, row_group_size=row_group_size)
    return Path(path)


@pytest.fixture(scope="session")
def text_task(tmp_path_factory):
    """Raw-text train and validation files (400 and 60 documents) and a tokenizer with sentinels trained on them."""
    from model.tokenizer import train_tokenizer

    directory = tmp_path_factory.mktemp("text_task")
    data = {"train_file": str(write_text_parquet(directory / "train.parquet", raw_documents(400, seed=1),
                                                 row_group_size=50)),
            "validation_file": str(write_text_parquet(directory / "valid.parquet", raw_documents(60, seed=2)))}
    train_tokenizer(data["train_file"], directory / "tokenizer", vocab_size=600, text_column="text")
    return data, str(directory / "tokenizer")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    from model.tokenizer import train_tokenizer

    directory = tmp_path_factory.mktemp("tiny_tokenizer")
    corpus = write_parquet(directory / "corpus.parquet", *tiny_corpus_rows())
    train_tokenizer(corpus, directory / "tokenizer", vocab_size=TINY_VOCAB_SIZE)
    return directory / "tokenizer"


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from model.tokenizer import load_tokenizer

    return load_tokenizer(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def task_tokenizer_dir(tmp_path_factory) -> str:
    """A tokenizer for the learnable demo task (copy / reverse / double Chinese phrases) used by training tests."""
    from commands.demo import write_demo_parquet
    from model.tokenizer import train_tokenizer

    directory = tmp_path_factory.mktemp("task_tokenizer")
    corpus = write_demo_parquet(str(directory / "corpus.parquet"), 2000, seed=0)
    train_tokenizer(corpus, directory / "tokenizer", vocab_size=400)
    return str(directory / "tokenizer")


@pytest.fixture(scope="session")
def task(tmp_path_factory, task_tokenizer_dir):
    """The learnable task's train and validation files (256 and 32 rows) and its tokenizer directory."""
    from tests.cli_helpers import make_task_data

    return make_task_data(tmp_path_factory.mktemp("task_data")), task_tokenizer_dir


# The trained demo model, its engine and the never-ending model of the decoding, chat and serve tests: defined once
# here so that every test module shares one of each per session.
from tests.inference_helpers import demo_engine, demo_model, endless_model  # noqa: E402,F401
