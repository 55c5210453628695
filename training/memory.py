"""Memory hygiene: periodic cleanup and memory reports, each deciding its own timing from the step number."""
import gc
import logging

import psutil
import torch

MB = 1024**2
log = logging.getLogger("trainer")


def memory_report() -> dict:
    """This process's RSS and USS, its DataLoader workers' USS, available RAM, and allocated / reserved / peak
    memory of the GPU, in MB.

    USS (pages only this process holds) is what a process really costs a 12 GB host: forked workers share most
    of their parent's pages, so adding RSS would count those pages once per worker.
    """
    process = psutil.Process()
    report = {
        "rss_mb": round(process.memory_info().rss / MB, 1),
        "uss_mb": round(process.memory_full_info().uss / MB, 1),
        "workers_uss_mb": round(sum(uss(child) for child in process.children(recursive=True)) / MB, 1),
        "available_ram_mb": round(psutil.virtual_memory().available / MB, 1),
    }
    if torch.cuda.is_available():
        device = torch.cuda.current_device()
        report.update(
            gpu_allocated_mb=round(torch.cuda.memory_allocated(device) / MB, 1),
            gpu_reserved_mb=round(torch.cuda.memory_reserved(device) / MB, 1),
            gpu_peak_mb=round(torch.cuda.max_memory_allocated(device) / MB, 1),
        )
    return report


def uss(process: psutil.Process) -> int:
    try:
        return process.memory_full_info().uss
    except psutil.Error:  # a worker that ended between listing and reading
        return 0


def freeze_startup_objects() -> None:
    """Exempt every object alive now from later collections: a full gc.collect scans every tracked object, and
    start-up leaves ~400k of them (mostly the modules transformers and torch import), which made each periodic
    cleanup cost ~170 ms for nothing, and each full collection in `serve` stop every request for as long. They
    live as long as the process; what it allocates afterwards is still collected."""
    gc.collect()  # garbage of the start-up itself is freed, not frozen
    gc.freeze()


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class MemoryHygiene:
    """Every `cleanup_steps`: gc + CUDA cache release. Every `log_steps`: a memory line (log and metrics)."""

    def __init__(self, cleanup_steps: int, log_steps: int, metrics):
        self.cleanup_steps = cleanup_steps
        self.log_steps = log_steps
        self.metrics = metrics

    def after_step(self, step: int) -> None:
        if self.cleanup_steps and step % self.cleanup_steps == 0:
            release_memory()
        if self.log_steps and step % self.log_steps == 0:
            report = memory_report()
            log.info("memory at step %d: %s", step, ", ".join(f"{k}={v}" for k, v in report.items()))
            self.metrics.write("memory", step=step, **report)
