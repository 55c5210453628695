"""Every --optimizer trains on real rows, resumes bitwise, and follows learn_rate the way the guide promises."""
import math

import pytest
import torch
from accelerate.utils import set_seed
from conftest import shared_file

from config import T5ModelConfig
from model.t5 import build_model
from model.tokenizer import load_tokenizer
from tests.cli_helpers import TINY_MODEL, assert_same_weights, final_weights, read_metrics, run_cli, tiny_run_flags
from training.adafactor import RelativeAdafactor
from training.optim import RECIPES

OPTIMIZERS = sorted(RECIPES)
# Real Chinese Q&A rows, a tokenizer trained on the task data (it covers them byte by byte), a few dozen steps.
REAL_RUN = dict(max_seq_len=48, batch_size_per_gpu=16, dataloader_buffer_size=512, eval_max_samples=0,
                keep_latest_n_ckp=0, save_steps=1000, warmup_steps=4, dropout_rate=0.1)


@pytest.fixture(scope="module")
def real_rows():
    return {"train_file": str(shared_file("sample_train_3k.parquet")),
            "validation_file": str(shared_file("sample_valid_1k.parquet"))}


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_lowers_the_loss_on_the_sample_rows(tmp_path, task, real_rows, optimizer):
    _, tokenizer_dir = task
    # AdamW at the guide's 1e-4 needs hundreds of steps to move T5's embedding (docs/BENCHMARKS.md): 10x here.
    learn_rate = 1e-3 if optimizer == "adamw" else 1e-4
    flags = tiny_run_flags(tmp_path, tokenizer_dir, real_rows, optimizer=optimizer, max_steps=40,
                           learn_rate=learn_rate, **REAL_RUN)
    run_cli("train", flags)
    losses = [r["loss"] for r in read_metrics(flags["output_dir"], "train")]
    assert len(losses) == 40 and all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_resumes_bitwise(tmp_path, task, optimizer):
    data, tokenizer_dir = task
    common = dict(optimizer=optimizer, epochs=1, batch_size_per_gpu=4, gradient_accumulation_steps=2, save_steps=5)
    reference = tiny_run_flags(tmp_path / "reference", tokenizer_dir, data, **common)
    run_cli("train", reference)
    resumed = tiny_run_flags(tmp_path / "resumed", tokenizer_dir, data, **common)
    run_cli("train", dict(resumed, max_steps=13))
    run_cli("train", dict(resumed, is_keep_training=True, max_steps=0))
    assert_same_weights(final_weights(resumed["output_dir"]), final_weights(reference["output_dir"]))
    assert [r["loss"] for r in read_metrics(resumed["output_dir"], "train")] == [
        r["loss"] for r in read_metrics(reference["output_dir"], "train")]


def distance_travelled(flags: dict, tokenizer_dir: str) -> float:
    """How far the final weights are from the initial ones (the run's seed builds the same model here)."""
    set_seed(flags["seed"])
    initial = build_model(T5ModelConfig(**TINY_MODEL, dropout_rate=0.1), load_tokenizer(tokenizer_dir)).state_dict()
    final = final_weights(flags["output_dir"])
    return math.sqrt(sum(float((final[name] - initial[name]).double().square().sum()) for name in final))


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_learn_rate_moves_every_optimizer_the_way_the_guide_says(tmp_path, task, optimizer):
    """The guide's 5e-5 ("lower the rate": smaller, steadier steps), 1e-4 and 2e-4 ("raise it"): the weights travel
    further from where they started, in that order, whichever optimizer runs."""
    data, tokenizer_dir = task
    travelled = []
    for rate in (5e-5, 1e-4, 2e-4):
        flags = tiny_run_flags(tmp_path / f"{rate:g}", tokenizer_dir, data, optimizer=optimizer, learn_rate=rate,
                               max_steps=6, warmup_steps=0, eval_max_samples=0, keep_latest_n_ckp=0,
                               weight_decay=0.0)
        run_cli("train", flags)
        travelled.append(distance_travelled(flags, tokenizer_dir))
    assert travelled[0] < travelled[1] < travelled[2], travelled


def test_the_relative_optimizer_moves_each_tensor_by_the_same_fraction_of_its_size():
    """Why the default suits T5: a tensor 100x larger (like the embedding next to attention weights) moves 100x
    further, so both change by the same relative amount per step."""
    torch.manual_seed(0)
    small, large = torch.randn(8, 16) * 0.01, torch.randn(8, 16)
    parameters = [small.clone().requires_grad_(), large.clone().requires_grad_()]
    optimizer = RelativeAdafactor([{"params": parameters, "lr": 1e-2}])
    gradient = torch.randn(8, 16)
    for parameter in parameters:
        parameter.grad = gradient.clone()
    optimizer.step()
    relative = [float((p.detach() - start).norm() / start.norm()) for p, start in zip(parameters, (small, large))]
    assert relative[0] == pytest.approx(relative[1], rel=1e-5)
    assert relative[0] == pytest.approx(1e-2, rel=0.2)  # the rate: each tensor moved by about 1% of its size
