"""`--compile=True`: the training forward through torch.compile, compiled for varying shapes from the first step.

A seq2seq step's encoder and decoder lengths change with every batch, and the batch changes after out-of-memory
recovery or at an epoch's tail. Left to itself, dynamo compiles the first shapes statically and recompiles once for
each dimension that starts to vary (2-4 full compiles of the large model, minutes each). Marking every dimension
of the inputs dynamic before the first call gives one compile for all of them; a batch of one row or token (the
stand-in of an out-of-memory step) may add a second, as dynamo specialises dimensions of size 1. Every compile is
logged with its time, and torch logs what made it recompile.
"""
import functools
import logging
import time

import torch

log = logging.getLogger("trainer")


class DynamicShapes:
    """Calls a `torch.compile`d model with every dimension of its tensor inputs marked dynamic."""

    def __init__(self, model):
        torch._logging.set_logs(recompiles=True)
        log_compilations()
        self.compiled = torch.compile(model)

    def __call__(self, **inputs):
        for value in inputs.values():
            if isinstance(value, torch.Tensor):
                for dim in range(value.ndim):
                    # `maybe_`: a dimension the model itself fixes stays fixed instead of failing the compile.
                    torch._dynamo.maybe_mark_dynamic(value, dim)
        return self.compiled(**inputs)


@functools.cache
def log_compilations() -> None:
    """A log line when dynamo starts compiling a graph of the training forward, and one with its time when done
    (once per process: torch's callbacks are global). A torch without these callbacks logs only its recompiles."""
    try:
        from torch._dynamo.callback import CallbackTrigger, on_compile_end, on_compile_start
    except ImportError:
        return
    started_at = {}

    @on_compile_start
    def started(args) -> None:
        if args.callback_trigger == CallbackTrigger.DYNAMO:
            started_at[args.compile_id] = time.perf_counter()
            log.info("compiling the training forward (graph %s, dynamic shapes) ...", args.compile_id)

    @on_compile_end
    def ended(args) -> None:
        began = started_at.pop(args.compile_id, None)
        if args.callback_trigger == CallbackTrigger.DYNAMO and began is not None:
            log.info("compiled graph %s in %.1f s", args.compile_id, time.perf_counter() - began)
