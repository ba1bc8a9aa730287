"""Many processes under torchrun: the process group, FSDP2 sharding, full weights for generation, all-reduce.

The update shards the model with FSDP2 (`fully_shard` per decoder layer, then the root), so each rank holds
1/W of the weights, gradients and optimizer state. Generation is different work on every rank (other
questions, other lengths), so inside `gathered` every rank holds the full parameters once and its forwards
need no collectives. Without torchrun every function here is a no-op for one process.

Left out: tensor and pipeline parallelism, CPU offload, loading a checkpoint directly into shards.
"""
import contextlib
import datetime
import os
import re
import sys

import torch
import torch.distributed as dist


def shard(model, mixed_precision: bool):
    """FSDP2: each decoder layer is one unit, the root holds embeddings, final norm and head. With
    `mixed_precision`, fp32 shards are the master weights and compute runs in bf16 (reduced in fp32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision \
        else MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


@contextlib.contextmanager
def gathered(model):
    """Within the block every rank holds the full parameters and forwards run without collectives (for
    generate and old log-probs, where ranks do different amounts of work); resharded on exit."""
    from torch.distributed.fsdp import FSDPModule
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


def rank_and_size() -> tuple[int, int]:
    """(rank, world size); (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce(value, op: str):
    """Sum or max of a number (or of each value of a dict with the same keys on every rank) over ranks."""
    rank, size = rank_and_size()
    if size == 1:
        return value
    keys = sorted(value) if isinstance(value, dict) else None
    numbers = [value[k] for k in keys] if keys else [value]
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(numbers, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    reduced = tensor.tolist()
    return dict(zip(keys, reduced)) if keys else type(value)(reduced[0])


def start_processes(device: str, timeout_minutes: float) -> tuple[int, int, str]:
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on GPUs, gloo on CPU) and take this
    rank's GPU. Returns (rank, world size, this process's device)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = device.startswith("cuda")
        if cuda:
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
    return (*rank_and_size(), device)


def collective_failure(error: Exception) -> str | None:
    """One line for a collective that timed out or lost a peer (gloo raises a plain RuntimeError); else None."""
    text = str(error)
    if not dist.is_initialized() or not (isinstance(error, dist.DistError) or any(
            mark in text for mark in ("Timed out", "timed out", "Connection closed by peer", "NCCL"))):
        return None
    detail = re.sub(r"^\[[^\]]*\]\s*", "", text.strip().splitlines()[0])  # drop gloo's [source:line] prefix
    rank, size = rank_and_size()
    return (f"error: rank {rank} of {size}: a collective failed ({detail}); another rank is stuck or has died "
            "(see its output); --dist-timeout sets how long a rank waits")


def destroy_processes() -> None:
    """End a finished run's processes (if this one joined a process group), all ranks together.
    A rank that tears down gloo's connections while another still uses them, or whose connection threads are
    still joinable when the interpreter exits, aborts ("terminate called without an active exception"), now
    and then, after the work is done. So every rank waits at a barrier and then leaves at once, without the
    teardown: the run's files are closed by now, and the streams are flushed here."""
    if dist.is_initialized():
        dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
