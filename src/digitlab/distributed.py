"""Multi-process training with torch.distributed, as launched by `torchrun` (DDP: gloo on CPU, nccl on CUDA).

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a plain `digitlab train` has none
of them and runs as a world of one, with no process group at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import DigitlabError, first_line


class DistributedError(DigitlabError):
    """Another training process failed or could not be reached."""


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def context_from_env() -> DistContext:
    """The process's place in the world, from torchrun's environment variables."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistContext(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def init(ctx: DistContext, device: torch.device, timeout_s: float | None = None) -> None:
    """Join the process group (no-op in a world of one)."""
    if not ctx.enabled or dist.is_initialized():
        return
    # A collective that waits longer than this raises instead of hanging forever when a peer has died.
    timeout = timedelta(seconds=timeout_s or float(os.environ.get("DIGITLAB_DIST_TIMEOUT", "120")))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(ctx.local_rank)
    try:
        dist.init_process_group(backend=backend, timeout=timeout)
    except Exception as exc:  # rendezvous failures come in many types
        raise DistributedError(f"rank {ctx.rank}: could not join the process group ({exc})") from None


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], ctx: DistContext, device: torch.device) -> list[float]:
    """Sum a few numbers over all processes (identity in a world of one)."""
    if not ctx.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    try:
        dist.all_reduce(tensor)
    except Exception as exc:
        raise lost_peer(ctx, exc) from None
    return tensor.tolist()


def any_flag(flag: bool, ctx: DistContext, device: torch.device) -> bool:
    """True on every rank when any rank raised the flag (used to stop all ranks together on Ctrl-C)."""
    if not ctx.enabled:
        return flag
    return all_reduce_sum([1.0 if flag else 0.0], ctx, device)[0] > 0


def lost_peer(ctx: DistContext, exc: BaseException) -> DistributedError:
    return DistributedError(f"rank {ctx.rank}: lost contact with another training process ({first_line(exc)})")


def weight_spread(model: torch.nn.Module, ctx: DistContext, device: torch.device) -> float:
    """Largest difference of any weight between processes: 0.0 when every rank holds the same model."""
    if not ctx.enabled:
        return 0.0
    flat = torch.cat(
        [p.detach().reshape(-1).to(torch.float64) for p in model.state_dict().values() if p.is_floating_point()]
    ).to(device)
    high, low = flat.clone(), flat.clone()
    try:
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
    except Exception as exc:
        raise lost_peer(ctx, exc) from None
    return float((high - low).max())
