"""Decisions every rank must take alike. Each rank reading the machine for itself could decide differently (the
system we replace let replicas drift apart that way), so one rank decides, or all ranks count together."""
import torch
from accelerate.utils import broadcast_object_list


class OneProcess:
    """The process state of a command that runs alone (`plan`): it takes every decision itself."""

    is_main_process, num_processes = True, 1


ONE_PROCESS = OneProcess()


def decided_by_main(state, decide):
    """`decide()` run on the main process only, its answer handed to every rank (`state`: the Accelerator or its
    PartialState): one decision for the whole run, never one per rank."""
    answer = [decide() if state.is_main_process else None]
    if state.num_processes > 1:
        broadcast_object_list(answer, from_process=0)
    return answer[0]


# How a collective fails once another process is gone (gloo's TCP transport; NCCL once the communicator aborts).
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted")


def lost_contact(error: BaseException) -> bool:
    """Whether `error` is a collective that failed because another process stopped (on an error it reports)."""
    return (isinstance(error, RuntimeError) and torch.distributed.is_available() and torch.distributed.is_initialized()
            and any(sign in str(error) for sign in PEER_GONE))


def ranks_where(accelerator, flag: bool) -> int:
    """How many ranks have `flag` true: the same count on every rank, so they all take the same branch."""
    if accelerator.num_processes == 1:
        return int(flag)
    return int(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum").item())
