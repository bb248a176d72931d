"""Data-parallel training across processes with torch.distributed, launched by torchrun.

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK in each process it starts. With WORLD_SIZE > 1 the
training loop joins a process group (nccl on CUDA, gloo on CPU), wraps the model in
DistributedDataParallel and gives every rank its own slice of each global batch. Only rank 0 logs to
MLflow and writes checkpoints. Without torchrun (no WORLD_SIZE, or 1) every helper here is a no-op
and training runs in one process as before.
"""

from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# a rank waits this long at a barrier or collective, e.g. while rank 0 builds the data cache
TIMEOUT = datetime.timedelta(minutes=30)


class StoppedByRank0(RuntimeError):
    """Raised on ranks > 0 when rank 0 stopped the run (a pruned trial or a failed callback)."""


# -----------------------------------------------------------------------------
# Ranks from the environment that torchrun sets

def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "")
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"invalid environment variable {name}={text!r}: expected an integer (torchrun sets it)") from None


def world_size() -> int:
    """Return the size of the joined process group, or 1 before init() and without torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    """Return this process's rank in the joined process group, or 0 before init() and without torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def local_rank() -> int:
    """Return this process's rank on its node ($LOCAL_RANK), which selects its CUDA device."""
    return _env_int("LOCAL_RANK", 0)


def is_rank0() -> bool:
    """Return True in the process that logs and checkpoints: rank 0, or the only process (call init() first)."""
    return rank() == 0


def is_distributed() -> bool:
    """Return True when this process has joined a process group of several training processes."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# -----------------------------------------------------------------------------
# Process group lifecycle

def init(device: torch.device) -> torch.device:
    """Join the process group when torchrun started several processes; return the device to train on.

    nccl is used on CUDA, with one GPU per local rank (cuda:LOCAL_RANK); gloo is used on CPU. With
    WORLD_SIZE unset or 1 nothing happens and `device` is returned as given.
    """
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1:
        return device
    if not dist.is_available():
        raise ValueError(f"WORLD_SIZE={size} but this torch build has no torch.distributed support")
    if device.type == "cuda":
        if local_rank() >= torch.cuda.device_count():
            raise ValueError(f"invalid LOCAL_RANK={local_rank()}: only {torch.cuda.device_count()} CUDA devices; "
                             "start at most one process per GPU (torchrun --nproc_per_node)")
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, init_method=_init_method(), rank=_env_int("RANK", 0), world_size=size,
                                timeout=TIMEOUT, **kwargs)
        log.info("joined process group: rank %d of %d, backend %s, device %s", rank(), world_size(), backend, device)
    return device


def _init_method() -> str:
    """Return $HARNESS_DIST_INIT_METHOD (e.g. file:///shared/path), else env:// (MASTER_ADDR:MASTER_PORT).

    env:// reaches the TCP store that torchrun's agent serves on MASTER_PORT. torch 2.13 binds that
    store to all network interfaces, with no option to choose one. A file:// method needs no listening
    socket: the ranks meet through a file that all of them can reach, and the file must not exist
    before the run starts.
    """
    return os.environ.get("HARNESS_DIST_INIT_METHOD") or "env://"


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# Collectives on metrics

def _collective_device() -> torch.device:
    """Return the device that collectives of this backend need: the current GPU for nccl, else CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: list[float]) -> list[float]:
    """Return the element-wise sum of `values` over all ranks (the values themselves in one process)."""
    if not is_distributed():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())  # (n,)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def all_reduce_mean(metrics: dict[str, float]) -> dict[str, float]:
    """Return each metric averaged over all ranks (the metrics themselves in one process)."""
    if not is_distributed():
        return dict(metrics)
    keys = sorted(metrics)
    sums = all_reduce_sum([float(metrics[key]) for key in keys])
    size = world_size()
    return {key: total / size for key, total in zip(keys, sums)}


def any_rank(flag: bool) -> bool:
    """Return True on every rank when `flag` is True on at least one rank."""
    return all_reduce_sum([1.0 if flag else 0.0])[0] > 0


def broadcast_from_rank0(obj):
    """Return rank 0's `obj` on every rank (any picklable object)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_collective_device())
    return box[0]


# -----------------------------------------------------------------------------
# The model wrapper

def wrap_model(model: torch.nn.Module, device: torch.device, find_unused_parameters: bool) -> torch.nn.Module:
    """Wrap the model in DistributedDataParallel when several ranks train; else return it unchanged.

    find_unused_parameters must be True when some step leaves parameters without a gradient: the
    entropy thresholds get none in steps that skip the regularizer (lambda = 0 or before
    entropy.start_step), and DDP otherwise fails at the next step waiting for their gradients.
    """
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Return the module inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)
