"""Decisions every rank must take alike. Each rank reading the machine for itself could decide differently (the
system we replace let replicas drift apart that way), so one rank decides, or all ranks count together."""
import torch
from accelerate.utils import broadcast_object_list


def decided_by_main(state, decide):
    """`decide()` run on the main process only, its answer handed to every rank (`state`: the Accelerator or its
    PartialState): one decision for the whole run, never one per rank."""
    answer = [decide() if state.is_main_process else None]
    if state.num_processes > 1:
        broadcast_object_list(answer, from_process=0)
    return answer[0]


def ranks_where(accelerator, flag: bool) -> int:
    """How many ranks have `flag` true: the same count on every rank, so they all take the same branch."""
    if accelerator.num_processes == 1:
        return int(flag)
    return int(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum").item())
