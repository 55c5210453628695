"""The default optimizer computes the large config's step in about a hundred operators instead of ~3,900, with the
same updates as the plain per-tensor formulas, and its state saves and loads exactly."""
import copy
import sys

import pytest
import torch

from config import T5ModelConfig
from model.t5 import StandInTokenizer, build_model
from tests.cli_helpers import REPO, TINY_MODEL
from training.adafactor import RelativeAdafactor
from training.optim import RECIPES, allocate_state, build_optimizer, parameter_groups, set_learning_rate

sys.path.insert(0, f"{REPO}/bench")
import bench_optimizer_ops as bench  # noqa: E402
from adafactor_per_tensor import PerTensorRelativeAdafactor  # noqa: E402

RATE = RECIPES["adafactor_t5"].rate_per_learn_rate


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    # Two layers a side: several tensors of each shape, so that chunks hold more than one tensor.
    return build_model(T5ModelConfig(**dict(TINY_MODEL, num_layers=2, num_decoder_layers=2)), StandInTokenizer(300))


def give_gradients(model, step: int) -> None:
    generator = torch.Generator().manual_seed(step)
    for parameter in model.parameters():
        parameter.grad = torch.randn(parameter.shape, generator=generator) * 10.0 ** -(step % 4)


def chunked(model, **options) -> RelativeAdafactor:
    return RelativeAdafactor(parameter_groups(model, 0.01, RATE), lr=0.0, **options)


def train(model, optimizer, steps: range) -> None:
    for step in steps:
        give_gradients(model, step)
        set_learning_rate(optimizer, 1e-4 * (1 + step % 3))  # the schedule changes the rate every step
        optimizer.step()


@pytest.mark.parametrize("max_chunk_bytes", [256 * 1024**2, 2048])  # one chunk per shape; a few tensors a chunk
def test_the_chunked_optimizer_updates_every_tensor_as_the_per_tensor_formulas_do(max_chunk_bytes):
    reference, ours = tiny_model(), tiny_model()
    reference_optimizer = PerTensorRelativeAdafactor(parameter_groups(reference, 0.01, RATE), lr=0.0)
    train(reference, reference_optimizer, range(6))
    train(ours, chunked(ours, max_chunk_bytes=max_chunk_bytes), range(6))
    for (name, theirs), mine in zip(reference.named_parameters(), ours.parameters()):
        assert torch.allclose(mine, theirs, rtol=1e-6, atol=0), name
    assert any(not torch.equal(a, b) for a, b in zip(tiny_model().parameters(), ours.parameters()))  # it moved


def test_a_state_saved_mid_run_and_loaded_into_a_new_optimizer_continues_bitwise():
    uninterrupted = tiny_model()
    train(uninterrupted, chunked(uninterrupted, max_chunk_bytes=2048), range(7))
    first = tiny_model()
    optimizer = chunked(first, max_chunk_bytes=2048)
    train(first, optimizer, range(4))
    saved = {"model": {k: v.clone() for k, v in first.state_dict().items()}, "optimizer": copy.deepcopy(optimizer.state_dict())}
    resumed = tiny_model(seed=1)
    resumed.load_state_dict(saved["model"])
    continued = chunked(resumed, max_chunk_bytes=2048)
    continued.load_state_dict(saved["optimizer"])
    train(resumed, continued, range(4, 7))
    for a, b in zip(uninterrupted.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_a_state_of_the_per_tensor_optimizer_loads_and_continues_as_it_would_have():
    """States saved before the chunked form keep resuming."""
    reference = tiny_model()
    reference_optimizer = PerTensorRelativeAdafactor(parameter_groups(reference, 0.01, RATE), lr=0.0)
    train(reference, reference_optimizer, range(3))
    ours = tiny_model(seed=1)
    ours.load_state_dict(reference.state_dict())
    optimizer = chunked(ours)
    optimizer.load_state_dict(copy.deepcopy(reference_optimizer.state_dict()))  # as from disk: not shared
    train(reference, reference_optimizer, range(3, 6))
    train(ours, optimizer, range(3, 6))
    for a, b in zip(reference.parameters(), ours.parameters()):
        assert torch.allclose(a, b, rtol=1e-6, atol=0)


def test_tensors_without_a_gradient_neither_move_nor_age():
    model = tiny_model()
    optimizer = chunked(model)
    frozen = model.shared.weight
    before = frozen.detach().clone()
    give_gradients(model, 0)
    frozen.grad = None
    set_learning_rate(optimizer, 1e-4)
    optimizer.step()
    assert torch.equal(frozen, before) and not optimizer.state[frozen]
    assert optimizer.state[model.encoder.final_layer_norm.weight]["step"] == 1


@pytest.mark.slow
def test_a_large_config_step_of_the_default_optimizer_starts_at_most_150_operators():
    model = bench.large_model()
    optimizer = build_optimizer(model, "adafactor_t5", 0.01)
    set_learning_rate(optimizer, 1e-4)
    bench.with_gradients(model, 0)
    optimizer.step()
    ours = bench.top_level_ops(optimizer.step)
    before = PerTensorRelativeAdafactor(parameter_groups(model, 0.01, RATE), lr=1e-2)
    before.step()
    assert ours <= 150 < 3000 < bench.top_level_ops(before.step), ours


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_the_state_made_before_the_first_step_changes_nothing_of_the_run(name):
    """AdamW's moments exist before the first step (where running out of memory could not be recovered), and the
    run goes on exactly as one whose optimizer made them in its first step."""
    lazy, eager = tiny_model(), tiny_model()
    lazy_optimizer, eager_optimizer = build_optimizer(lazy, name, 0.01), build_optimizer(eager, name, 0.01)
    allocate_state(eager_optimizer)
    assert len(eager_optimizer.state) == sum(1 for _ in eager.parameters()) and not lazy_optimizer.state
    assert all(p.grad is None for p in eager.parameters())
    if name == "adamw":
        assert all(state["exp_avg_sq"].shape == p.shape for p, state in eager_optimizer.state.items())
    for model, optimizer in ((lazy, lazy_optimizer), (eager, eager_optimizer)):
        train(model, optimizer, range(3))
    for a, b in zip(lazy.parameters(), eager.parameters()):
        assert torch.equal(a, b)
