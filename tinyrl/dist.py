"""torch.distributed for tinyrl: what train.py needs, as functions that do nothing in one process.

    torchrun --nproc_per_node N train.py ...    # NCCL on GPUs, gloo on CPU

Group-parallel (the default under torchrun) splits ONE prompt's |G| completions across ranks and
all-reduces the LoRA gradients, so N GPUs give the paper's update (effective batch 1) N times
faster. Prompt-parallel (`--parallel prompts`) gives each rank its own prompt: an effective batch
of N, Table IV's setting.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


def setup(device: str | None) -> tuple[int, int, str | None]:
    """(rank, world size, device) under torchrun; (0, 1, device) otherwise. Picks cuda:LOCAL_RANK on GPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if use_cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device or "cpu"


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def share(n: int, r: int, w: int) -> int:
    """How many of n items rank r of w takes (the first n % w ranks take one more)."""
    return n // w + (1 if r < n % w else 0)


def gather(items: list) -> list:
    """Every rank's list, concatenated in rank order, on every rank."""
    if world() == 1:
        return list(items)
    out: list = [None] * world()
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]


def broadcast(obj):
    """Rank 0's object on every rank."""
    if world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_grads(params: list[torch.Tensor]) -> None:
    """Sum every rank's gradients: each rank's loss already carries the global normalisation (1/|G|, 1/|U|)."""
    if world() == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)


def total(value: float) -> float:
    """The sum over ranks of a number (a loss, a count)."""
    if world() == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.item()


def any_rank(flag: bool) -> bool:
    """True on every rank if it is True on any (so that all ranks stop at the same step)."""
    return total(1.0 if flag else 0.0) > 0


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def cleanup() -> None:
    """Leave together: a rank that tears down gloo while its peer still works makes the peer abort."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def finish(code: int) -> None:
    """End a torchrun rank with `code`. Gloo's worker threads can still hold tensors when the interpreter
    shuts down, and releasing them then aborts the process (SIGABRT, "terminate called without an active
    exception"; pytorch/pytorch#190489, #179291): about 1 run in 12 here. So a rank leaves the group,
    flushes, and exits without the interpreter's own shutdown. In one process this is plain sys.exit."""
    if not dist.is_initialized():
        sys.exit(code)
    cleanup()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
