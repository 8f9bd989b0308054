"""Ranks of a `torchrun` job: rank, world size, sums and maxima across ranks, barriers. One process
without torchrun is world 1 and needs no process group. Backend: NCCL on CUDA, gloo on the CPU;
NEUROKERN_DIST_BACKEND=gloo (EngineSettings.dist_backend) runs GPU ranks over gloo too (ranks that share one GPU, which NCCL
refuses, or a machine without a working NCCL).

Several nodes (torchrun --nnodes N): the same, with every rank's output folder on one shared file
system (engine.writer.check_shared). A rank that has finished its shards waits at a barrier for
the others; NEUROKERN_DIST_TIMEOUT (EngineSettings.dist_timeout_s, default 7200) bounds every wait, where torch's
default (10 minutes under NCCL) would end a 70B merge whose ranks finish minutes apart (a resumed
run whose rank 0 found all its shards done waits for the whole merge of the others)."""
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from neurokern import params
from neurokern.engine.settings import EngineSettings
from neurokern.errors import NeurokernError


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    device: Optional[torch.device] = None  # where collectives run (NCCL: this rank's GPU)
    owns_group: bool = False

    @classmethod
    def setup(cls, device: torch.device, settings: EngineSettings = EngineSettings()) -> "Ranks":
        """From an initialised process group, or torchrun's environment (WORLD_SIZE, RANK, ...)
        with settings' backend and timeout."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), _collective_device(device))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        dist.init_process_group(backend=_backend(device, settings.dist_backend),
                                timeout=timedelta(seconds=settings.dist_timeout_s))
        return cls(dist.get_rank(), dist.get_world_size(), _collective_device(device), owns_group=True)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum_(self, tensor: Tensor) -> Tensor:
        """In-place sum over ranks (exact for integers; float tensors hold disjoint rows)."""
        return self._all_reduce(tensor, dist.ReduceOp.SUM)

    def max_(self, tensor: Tensor) -> Tensor:
        """In-place maximum over ranks."""
        return self._all_reduce(tensor, dist.ReduceOp.MAX)

    def _all_reduce(self, tensor: Tensor, op) -> Tensor:
        if self.world == 1:
            return tensor
        moved = tensor.to(self.device)
        dist.all_reduce(moved, op=op)
        tensor.copy_(moved)
        return tensor

    def barrier(self) -> None:
        if self.world > 1:
            if self.device is not None and self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index or 0])
            else:
                dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _backend(device: torch.device, asked: Optional[str]) -> str:
    """asked (EngineSettings.dist_backend), else NCCL on a GPU and gloo on the CPU."""
    backend = asked or ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise NeurokernError(f"NEUROKERN_DIST_BACKEND={backend!r}: expected 'gloo', or 'nccl' with --device cuda")
    return backend


def _collective_device(device: torch.device) -> torch.device:
    if dist.get_backend() == "nccl":
        return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def local_device(name: Optional[str]) -> torch.device:
    """--device, with torchrun's LOCAL_RANK picking the GPU of each rank."""
    if name is None:
        name = "cpu"
    device = params.device("--device", name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device
