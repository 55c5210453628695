"""The CUDA-only branches, run here with `torch.cuda` mocked: device decisions, environment defaults, memory
figures, random states, the fused optimizer; and the refusal to train a GPU launch on CPUs without saying so."""
import os
import weakref
from unittest import mock

import pytest
import torch

from config import TrainConfig, TrainConfigPretrainLarge
from training import memory, runtime, step
from training.optim import build_optimizer
from utils.errors import UserError

GIB = 1024**3


def a_gpu(bf16: bool = True):
    """torch.cuda as on a machine with one GPU (native bf16 on Ampere and newer)."""
    return mock.patch.multiple(torch.cuda, is_available=mock.Mock(return_value=True),
                               is_bf16_supported=mock.Mock(return_value=bf16))


def ram(gib: float):
    return mock.patch.object(runtime.psutil, "virtual_memory", return_value=mock.Mock(total=gib * GIB))


def test_on_a_gpu_machine_with_ample_ram_auto_means_workers_pinned_memory_and_bf16():
    with a_gpu(), ram(64):
        decided = runtime.decide(TrainConfigPretrainLarge())
    assert (decided.mixed_precision, decided.num_workers, decided.pin_memory, decided.ultra_low_mem) == (
        "bf16", 2, True, False)
    assert [note for note in decided.notes if not note.startswith("CUDA allocator: ")] == []


def test_on_the_12_gb_box_auto_means_the_low_memory_settings():
    with a_gpu(), ram(12):
        decided = runtime.decide(TrainConfigPretrainLarge())
    assert (decided.num_workers, decided.pin_memory, decided.ultra_low_mem) == (0, False, True)
    assert any("12.0 GB of RAM" in note for note in decided.notes)


def test_a_gpu_without_native_bf16_trains_in_fp32_and_says_fp16_would_work():
    with a_gpu(bf16=False), ram(64):
        decided = runtime.decide(TrainConfig())
    assert decided.mixed_precision == "no" and "no native bf16" in decided.notes[0] and "fp16" in decided.notes[0]


def test_without_a_gpu_the_note_says_so_instead_of_blaming_bf16():
    with mock.patch.object(torch.cuda, "is_available", return_value=False), ram(64):
        decided = runtime.decide(TrainConfig())
    assert decided.mixed_precision == "no" and decided.notes[0].startswith("mixed_precision=bf16: no GPU here")


ALLOCATOR_VARIABLES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


def test_cuda_defaults_are_set_before_cuda_starts_and_yield_to_the_users_environment(monkeypatch):
    for name in ("NCCL_SHM_DISABLE", "TORCH_NCCL_ASYNC_ERROR_HANDLING") + ALLOCATOR_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NCCL_SHM_DISABLE", "1")
    with a_gpu():
        runtime.set_cuda_defaults()
    assert os.environ["NCCL_SHM_DISABLE"] == "1" and os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"


@pytest.mark.parametrize("version,variable", [("2.8.0+cu128", "PYTORCH_CUDA_ALLOC_CONF"),
                                              ("2.9.1+cu130", "PYTORCH_ALLOC_CONF"),
                                              ("2.13.0", "PYTORCH_ALLOC_CONF")])
def test_expandable_segments_go_into_the_variable_the_running_torch_reads_first(monkeypatch, version, variable):
    for name in ALLOCATOR_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(runtime.torch, "__version__", version)
    with a_gpu():
        runtime.set_cuda_defaults()
    assert {name: os.environ.get(name) for name in ALLOCATOR_VARIABLES} == {
        name: "expandable_segments:True" if name == variable else None for name in ALLOCATOR_VARIABLES}
    assert runtime.describe_allocator() == f"CUDA allocator: expandable segments on ({variable}=expandable_segments:True)"


@pytest.mark.parametrize("users_variable", ALLOCATOR_VARIABLES)
def test_an_allocator_setting_of_the_user_in_either_variable_is_kept_and_reported(monkeypatch, users_variable):
    for name in ALLOCATOR_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(users_variable, "max_split_size_mb:128")
    with a_gpu():
        runtime.set_cuda_defaults()
    assert [os.environ.get(name) for name in ALLOCATOR_VARIABLES].count(None) == 1  # nothing added
    assert runtime.describe_allocator() == \
        f"CUDA allocator: expandable segments off ({users_variable}=max_split_size_mb:128)"


@pytest.mark.parametrize("world_size,use_cpu,fails", [("3", None, True), ("3", "true", False), ("1", None, False)])
def test_a_launch_of_several_processes_without_a_usable_gpu_stops(monkeypatch, world_size, use_cpu, fails):
    monkeypatch.setenv("WORLD_SIZE", world_size)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    if use_cpu:
        monkeypatch.setenv("ACCELERATE_USE_CPU", use_cpu)
    with mock.patch.object(torch.cuda, "is_available", return_value=False):
        if not fails:
            runtime.check_devices()
            return
        with pytest.raises(UserError, match=r"3 processes were launched for GPUs, but torch .* sees no usable CUDA "
                                            r"device; check with: python -c .*torch\.version\.cuda"):
            runtime.check_devices()


def test_the_memory_report_has_the_gpu_figures_of_the_current_device_in_mb():
    figures = {"memory_allocated": 3 * 2**20, "memory_reserved": 5 * 2**20, "max_memory_allocated": 4 * 2**20}
    asked = []
    with a_gpu(), mock.patch.multiple(torch.cuda, current_device=mock.Mock(return_value=2), **{
            name: mock.Mock(side_effect=lambda device, _name=name: asked.append((_name, device)) or figures[_name])
            for name in figures}):
        report = memory.memory_report()
    assert (report["gpu_allocated_mb"], report["gpu_reserved_mb"], report["gpu_peak_mb"]) == (3.0, 5.0, 4.0)
    assert sorted(asked) == sorted((name, 2) for name in figures)  # this process's device, not device 0
    assert report["rss_mb"] >= report["uss_mb"] > 0 and report["workers_uss_mb"] >= 0


def test_memory_cleanup_frees_unreachable_cycles_and_empties_the_cuda_cache_on_a_gpu():
    class Node:
        pass

    node = Node()
    node.cycle = node  # only a collection frees it
    freed = weakref.ref(node)
    del node
    with a_gpu(), mock.patch.object(torch.cuda, "empty_cache") as empty_cache:
        memory.release_memory()
    assert freed() is None
    empty_cache.assert_called_once()


def test_a_retried_step_draws_the_same_random_numbers_on_the_cpu_and_restores_the_cuda_states():
    set_states = mock.Mock()
    with a_gpu(), mock.patch.multiple(torch.cuda, get_rng_state_all=mock.Mock(return_value=["cuda state"]),
                                      set_rng_state_all=set_states):
        snapshot = step.rng_snapshot()
        first = torch.rand(4)
        step.restore_rng(snapshot)
        again = torch.rand(4)
    assert torch.equal(first, again)
    set_states.assert_called_once_with(["cuda state"])


def test_adamw_is_fused_when_its_tensors_are_on_a_gpu():
    model = torch.nn.Linear(4, 4)
    with mock.patch.object(torch.optim, "AdamW") as adamw:
        build_optimizer(model, "adamw", 0.01)
        with mock.patch.object(torch.Tensor, "is_cuda", new_callable=mock.PropertyMock, return_value=True):
            build_optimizer(model, "adamw", 0.01)
    assert [call.kwargs["fused"] for call in adamw.call_args_list] == [None, True]
