"""Multi-process retrofit: one process per GPU under `torchrun`, the model sharded with FSDP2.

The training loop (`train.py`) is the same code in one process and in many; what differs lives here:
which process this is, how the model is sharded, how per-process figures are summed, and how a full
state dict is gathered for saving. Started without `torchrun` (no RANK in the environment) everything
here is the single-process identity: rank 0 of 1, no sharding, sums of one.

On CPU the group uses gloo (that is how the tests run two processes on a laptop); on GPUs nccl, with
each process on `cuda:LOCAL_RANK`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world > 1


SINGLE_PROCESS = Dist()


def init_from_env() -> Dist:
    """Join the process group `torchrun` describes in the environment; rank 0 of 1 without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return Dist(rank=rank, world=world, device=device)


def shutdown(d: Dist) -> None:
    if d.sharded and dist.is_initialized():
        dist.destroy_process_group()


def shard_model(model: nn.Module, d: Dist) -> nn.Module:
    """FSDP2: each decoder layer is its own unit (all-gathered just before it runs), then the root.

    Parameter names do not change, so `dms_parameter_names` and checkpoints work as unsharded. On one
    process the model is only moved to the device.
    """
    if not d.sharded:
        return model.to(d.device)
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)  # embeddings, final norm, head; moves every shard to the group's device
    return model


def all_sum(values: list[float], d: Dist) -> list[float]:
    """Sum of each value over all processes (every process gets the sums)."""
    if not d.sharded:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


def rank_slice(rows: torch.Tensor, d: Dist) -> torch.Tensor:
    """This process's equal share of `rows` (forward passes are collective under FSDP: every process
    must run the same number of them, so a remainder that does not split evenly is dropped)."""
    per = len(rows) // d.world
    if per == 0:
        raise ValueError(f"{len(rows)} held-out rows cannot be shared by {d.world} processes")
    return rows[d.rank * per : (d.rank + 1) * per]


def full_state_dict(model: nn.Module, d: Dist) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict on CPU on rank 0; {} elsewhere. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if d.is_main else {}
