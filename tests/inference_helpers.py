"""Models for the tests of generate's decoding, chat and serve, each made once per session (conftest.py shares
these fixtures), and a server started as a subprocess that stops by itself (fixture teardown, and `timeout`
around it). Heavy imports stay inside the functions: conftest imports this module for every test."""
import os
import signal
import subprocess
import sys
import time

import pytest

# One epoch of the demo (~10-20 s on one core): half-right, varied answers, and it repeats itself ("水水水..."),
# which the repetition penalty tests need. The demo's answers are at most 24 tokens (its max_seq_len).
SHORT_DEMO = dict(epochs=1, valid_rows=60, eval_batch_size=60)
MAX_NEW_TOKENS = 24
# A prompt this model answers by repeating one character until the token limit: a long-running request.
ENDLESS_PROMPT = "叠字：日月"
SERVER_LIFETIME_S = 600  # a server outlives no test session by more than this, whatever happens to pytest


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory) -> dict:
    """The demo model and its validation prompts."""
    import pyarrow.parquet as pq

    from tests.cli_helpers import run_cli

    root = tmp_path_factory.mktemp("inference_demo")
    run_cli("demo", dict(SHORT_DEMO, output_dir=root / "demo", log_dir=root / "logs"), timeout=600)
    prompts = pq.read_table(root / "demo" / "data" / "valid.parquet").column("prompt").to_pylist()
    return dict(model_dir=str(root / "demo" / "final"), prompts=prompts, root=root)


@pytest.fixture(scope="session")
def demo_engine(demo_model):
    from inference.engines import TransformersEngine

    return TransformersEngine.load(demo_model["model_dir"])


class Server:
    """`python train_low_mem.py serve ...` on a free loopback port, started and waited for."""

    def __init__(self, model_dir: str, **flags):
        from commands.serve import model_id
        from tests.cli_helpers import ENTRY, REPO, as_flags, child_env, free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model_id = model_id(model_dir)
        command = ["timeout", "--kill-after=5", str(SERVER_LIFETIME_S), sys.executable, ENTRY, "serve",
                   *as_flags(dict(model_dir=model_dir, port=self.port, **flags))]
        self.stderr_path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"serve-{self.port}.err")
        self.stderr = open(self.stderr_path, "w+", encoding="utf-8")
        self.process = subprocess.Popen(command, cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                                        stderr=self.stderr, text=True)
        self.banner = self.wait_for_banner()

    def wait_for_banner(self, timeout: float = 120) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            line = self.process.stdout.readline()
            if line.startswith("serving on"):
                return line
            if not line and self.process.poll() is not None:
                break
        self.stop()
        raise AssertionError(f"the server did not start:\n{self.log()}")

    def log(self) -> str:
        self.stderr.flush()
        with open(self.stderr_path, encoding="utf-8") as handle:
            return handle.read()

    def terminate(self, timeout: float = 60) -> int:
        self.process.send_signal(signal.SIGTERM)  # `timeout` passes it on to the server
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()
        self.stderr.close()
        os.remove(self.stderr_path)


@pytest.fixture(scope="session")
def endless_model(demo_model, tmp_path_factory) -> str:
    """An untrained tiny model whose [EOS] and [PAD] are never the likeliest tokens (their embeddings, tied to the
    output projection, are zero: logit 0 against the largest of ~400 random ones): greedy answers run to the limit,
    for requests that take a while (a full batch, a queue, a disconnect, a drain, Ctrl-C)."""
    import torch

    from config import T5ModelConfig
    from model.t5 import build_model
    from model.tokenizer import load_tokenizer
    from tests.cli_helpers import TINY_MODEL

    directory = tmp_path_factory.mktemp("endless") / "model"
    tokenizer = load_tokenizer(demo_model["model_dir"])
    torch.manual_seed(0)
    model = build_model(T5ModelConfig(**TINY_MODEL, dropout_rate=0.0), tokenizer)
    with torch.no_grad():
        model.shared.weight[tokenizer.eos_token_id] = 0
        model.shared.weight[tokenizer.pad_token_id] = 0  # and never [PAD], which decodes to no text
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)
