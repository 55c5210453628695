"""Process set-up: the Accelerator and every machine-dependent decision, made once on the main process and
broadcast (`utils.distributed.decided_by_main`), so every rank uses the same values."""
import datetime
import logging
import os
from dataclasses import dataclass

import psutil
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import InitProcessGroupKwargs, parse_flag_from_env

from utils.distributed import decided_by_main

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
    if precision == "bf16" and not native_bf16():
        notes.append("mixed_precision=bf16 is not supported natively here: training in fp32")
        precision = "no"
    if precision == "fp16" and not torch.cuda.is_available():
        notes.append("mixed_precision=fp16 needs a GPU: training in fp32")
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
    return runtime


def tracker_names(report_to: str) -> list[str]:
    return [name.strip() for name in report_to.split(",") if name.strip() and name.strip() != "none"]


def set_nccl_defaults() -> None:
    """NCCL reads these at communicator creation; they matter only with NCCL, so leave gloo runs untouched."""
    if torch.cuda.is_available():
        os.environ.setdefault("NCCL_SHM_DISABLE", "0")  # the README says when to set it to 1
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a dead rank fails the others, no hang


def start_processes(cfg) -> tuple[PartialState, Runtime]:
    """Initialise the process group (30-minute timeout), decide on the main process, broadcast the decisions."""
    set_nccl_defaults()
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
    return Accelerator(
        cpu=use_cpu(),
        mixed_precision=runtime.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        kwargs_handlers=[process_group_kwargs()],
        log_with=trackers or None,
        project_dir=cfg.output_dir,
    )
