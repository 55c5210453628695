"""One optimizer step (training/step.py) on its own: what an abandoned attempt leaves behind, and fp16 loss scaling."""
import pytest
import torch
from accelerate import Accelerator

from config import T5ModelConfig
from data_pipeline.batch import MicroBatch, StepBatch
from model.t5 import StandInTokenizer, build_model
from training.optim import build_optimizer
from training.step import StepRunner

VOCAB = 64
RATE = 1e-2
MODEL = T5ModelConfig(d_model=16, d_ff=32, num_heads=2, d_kv=8, num_layers=1, num_decoder_layers=1, dropout_rate=0.1)


@pytest.fixture
def accelerator():
    accelerator = Accelerator(cpu=True)
    yield accelerator
    accelerator.gradient_accumulation_steps = 1  # the Accelerator's state is shared by the whole test process
    accelerator.scaler = None


def prepared_stepper(accelerator, accumulation: int = 1) -> StepRunner:
    torch.manual_seed(0)
    model = build_model(MODEL, StandInTokenizer(VOCAB))
    model, optimizer = accelerator.prepare(model, build_optimizer(model, "adamw", 0.01))
    accelerator.gradient_accumulation_steps = accumulation
    return StepRunner(accelerator, model, optimizer, max_grad_norm=1.0)


def step_of(micro_batches: int, rows: int = 2, length: int = 6) -> StepBatch:
    generator = torch.Generator().manual_seed(micro_batches)
    batches = [MicroBatch.of(torch.randint(4, VOCAB, (rows, length), generator=generator),
                          torch.ones(rows, length, dtype=torch.long),
                          torch.randint(4, VOCAB, (rows, length), generator=generator)) for _ in range(micro_batches)]
    return StepBatch(batches, epoch=0, end_sample=micro_batches * rows, step_tokens=micro_batches * rows * length,
                     skipped=0)


def weights(stepper: StepRunner) -> dict:
    return {name: p.detach().clone() for name, p in stepper.model.named_parameters()}


def test_an_out_of_memory_in_the_middle_of_accumulation_leaves_no_gradient_behind(accelerator):
    bundle = step_of(4)
    stepper = prepared_stepper(accelerator, accumulation=4)
    clean_forward, calls = stepper.forward, []

    def out_of_memory_on_the_third_micro_batch(batch):
        calls.append(1)
        return (None, stepper.no_stats, True) if len(calls) == 3 else clean_forward(batch)

    stepper.forward = out_of_memory_on_the_third_micro_batch
    assert stepper.run(bundle, RATE).out_of_memory
    assert all(p.grad is None for p in stepper.model.parameters())
    stepper.forward = clean_forward
    retried = stepper.run(bundle, RATE)

    reference = prepared_stepper(accelerator, accumulation=4)
    once = reference.run(bundle, RATE)
    assert retried.loss == once.loss and retried.grad_norm == once.grad_norm
    for name, value in weights(stepper).items():
        assert torch.equal(value, weights(reference)[name]), name


def test_fp16_overflow_steps_are_skipped_by_the_loss_scaler_and_training_goes_on(accelerator, monkeypatch):
    # What Accelerate sets up for fp16 on a GPU, on the CPU: a GradScaler in backward, unscale before clipping, and
    # the scaler's step/update in optimizer.step. A first scale of 2^127 overflows; after it the scale is 2^7.
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-120)
    monkeypatch.setattr(accelerator, "native_amp", True)
    monkeypatch.setattr(accelerator.state, "_mixed_precision", "fp16")
    stepper = prepared_stepper(accelerator)
    before = weights(stepper)
    outcomes = [stepper.run(step_of(1), RATE) for _ in range(3)]
    assert [outcome.finite for outcome in outcomes] == [False, True, True]
    assert accelerator.scaler.get_scale() == 2.0**7  # the scaler saw the overflow and lowered its scale
    assert any(not torch.equal(value, before[name]) for name, value in weights(stepper).items())


def test_a_training_step_builds_no_key_value_cache(accelerator):
    """A cache serves generation; in a training forward every decoder layer would concatenate one for nothing."""
    stepper = prepared_stepper(accelerator)
    caches = []
    stepper.bare_model.register_forward_hook(lambda module, args, output: caches.append(output.past_key_values))
    outcome = stepper.run(step_of(micro_batches=2), RATE)
    assert outcome.finite and len(caches) == 2
    assert caches == [None, None]
    # The same model asked for a cache builds one: the hook sees it when there is one.
    stepper.bare_model(**step_of(1).micro_batches[0].as_dict(), use_cache=True)
    assert caches[-1] is not None
