"""Process set-up: the Accelerator and every machine-dependent decision, made once on the main process and
broadcast (`utils.distributed.decided_by_main`), so every rank uses the same values."""
import datetime
import logging
import os
from dataclasses import dataclass

import psutil
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (DDPCommunicationHookType, DistributedDataParallelKwargs, InitProcessGroupKwargs,
                               parse_flag_from_env)
from torch.torch_version import TorchVersion

from utils.distributed import decided_by_main
from utils.errors import UserError

LOW_RAM_BYTES = 15 * 1024**3  # the user's guide: below 15 GB of RAM use the low-memory data settings
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=30)
log = logging.getLogger("trainer")


@dataclass
class Runtime:
    """Decisions that must be identical on every rank."""

    mixed_precision: str
    ultra_low_mem: bool
    num_workers: int
    pin_memory: bool
    total_ram_gb: float
    notes: list


def native_bf16() -> bool:
    """bf16 only where the hardware does it natively: emulated bf16 on a CPU is slower than fp32."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def decide(cfg) -> Runtime:
    notes = []
    precision = cfg.mixed_precision
    if precision != "no" and not torch.cuda.is_available():
        notes.append(f"mixed_precision={precision}: no GPU here, training in fp32 (16-bit autocast needs a GPU; on a "
                     "CPU it is slower than fp32)")
        precision = "no"
    if precision == "bf16" and not native_bf16():
        notes.append("mixed_precision=bf16: this GPU has no native bf16 (Ampere or newer has it): training in fp32; "
                     "--mixed_precision=fp16 runs 16-bit on it")
        precision = "no"
    ram = psutil.virtual_memory().total
    low_ram = ram < LOW_RAM_BYTES
    auto = lambda value, low, high: (low if low_ram else high) if value == "auto" else value
    runtime = Runtime(
        mixed_precision=precision,
        ultra_low_mem=auto(cfg.ultra_low_mem, True, False),
        # Without a GPU the main process computes on every core; worker processes would only compete with it.
        num_workers=auto(cfg.num_workers, 0, 2 if torch.cuda.is_available() else 0),
        pin_memory=auto(cfg.pin_memory, False, torch.cuda.is_available()),
        total_ram_gb=round(ram / 1024**3, 1),
        notes=notes,
    )
    if low_ram:
        notes.append(f"{runtime.total_ram_gb} GB of RAM (< 15 GB): low-memory data settings for 'auto' flags")
    if torch.cuda.is_available():
        notes.append(describe_allocator())
    return runtime


def tracker_names(report_to: str) -> list[str]:
    return [name.strip() for name in report_to.split(",") if name.strip() and name.strip() != "none"]


def allocator_variable() -> str:
    """The variable the running torch reads its allocator settings from first (2.9 renamed it, keeping the old
    name as a fallback)."""
    return "PYTORCH_ALLOC_CONF" if TorchVersion(torch.__version__) >= "2.9" else "PYTORCH_CUDA_ALLOC_CONF"


def allocator_settings() -> tuple[str, str]:
    """The allocator settings in force: the variable they come from and its value ('' when none is set)."""
    for name in dict.fromkeys((allocator_variable(), "PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")):
        if os.environ.get(name):
            return name, os.environ[name]
    return allocator_variable(), ""


def set_cuda_defaults() -> None:
    """Read when NCCL makes its communicator and when the CUDA allocator starts: set before either (your
    environment wins); they matter only with CUDA, so CPU runs are left untouched."""
    if torch.cuda.is_available():
        os.environ.setdefault("NCCL_SHM_DISABLE", "0")  # the README says when to set it to 1
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a dead rank fails the others, no hang
        # Segments that grow instead of new blocks: less fragmentation, and the periodic empty_cache() releases
        # memory without forcing the allocator to synchronise on every cached block.
        if not allocator_settings()[1]:
            os.environ[allocator_variable()] = "expandable_segments:True"


def describe_allocator() -> str:
    name, value = allocator_settings()
    expandable = "expandable_segments:true" in value.replace(" ", "").lower()
    return (f"CUDA allocator: expandable segments {'on' if expandable else 'off'} "
            f"({name}={value or '(not set)'})")


def check_devices() -> None:
    """A launch of several processes (torchrun, accelerate launch) is a GPU run unless ACCELERATE_USE_CPU=true:
    without a usable GPU it would train on CPU processes in fp32 and only say "device cpu"."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes > 1 and not parse_flag_from_env("ACCELERATE_USE_CPU") and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise UserError(f"{processes} processes were launched for GPUs, but torch {torch.__version__} ({build}) "
                        "sees no usable CUDA device; check with: python -c \"import torch; print(torch.version.cuda, "
                        "torch.cuda.is_available())\" (a CPU-only build needs the CUDA one; a broken driver, "
                        "nvidia-smi). To train on CPU processes on purpose: ACCELERATE_USE_CPU=true")


def start_processes(cfg) -> tuple[PartialState, Runtime]:
    """Initialise the process group (30-minute timeout), decide on the main process, broadcast the decisions."""
    check_devices()
    set_cuda_defaults()
    # Without a GPU (or with ACCELERATE_USE_CPU=true) torchrun ranks must form a gloo group (MULTI_CPU).
    state = PartialState(cpu=use_cpu(), **process_group_kwargs().to_kwargs())
    return state, decided_by_main(state, lambda: decide(cfg))


def use_cpu() -> bool:
    return parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()


def process_group_kwargs() -> InitProcessGroupKwargs:
    return InitProcessGroupKwargs(timeout=PROCESS_GROUP_TIMEOUT)


def build_accelerator(cfg, runtime: Runtime) -> Accelerator:
    """The Accelerator of a run whose processes `start_processes` started (trackers, once the flags are checked)."""
    trackers = tracker_names(cfg.report_to)
    # Gradients that are views into DDP's buckets: no second copy of them (0.7 GiB for the large model).
    ddp = DistributedDataParallelKwargs(
        gradient_as_bucket_view=True,
        comm_hook=DDPCommunicationHookType.BF16 if cfg.ddp_bf16_gradients else DDPCommunicationHookType.NO)
    return Accelerator(
        cpu=use_cpu(),
        mixed_precision=runtime.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        kwargs_handlers=[process_group_kwargs(), ddp],
        log_with=trackers or None,
        project_dir=cfg.output_dir,
    )
