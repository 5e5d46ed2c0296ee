"""Distributed (torchrun / DDP) training of the reproduction suite.

``bgnorm reproduce`` launched by ``torchrun`` (or with ``--distributed``) trains each cell with
DistributedDataParallel over all ranks; see ``docs/distributed.md`` ("Training the suite with
torchrun"). This module holds the pieces:

* :class:`DistEnv` (rank, world size, local rank) read from torchrun's environment variables;
* :func:`init_distributed`: ``init_process_group`` (gloo on CPU, nccl on CUDA) with a bounded
  timeout, so a dead rank makes the others fail with a clear error instead of hanging;
* :func:`local_workers`: how a cell's ``W`` virtual workers are laid out over ``R`` ranks;
* :func:`wrap_model`: optional conversion to synchronized norms, then DDP;
* :func:`shard_batch`: each rank's contiguous slice of the global batch;
* :func:`all_reduce_sum`, :func:`average_buffers`, :func:`barrier`: the few collectives the
  trainer needs.

Worker layout rule (``W`` virtual workers of ``b`` examples per cell, ``R`` ranks): every step
draws the same global batch of ``W * b`` examples on every rank (the batch sources are
deterministic) and rank ``r`` keeps the ``r``-th contiguous slice.

* ``W`` divisible by ``R``: each rank holds ``W / R`` virtual workers of ``b`` examples; the
  per-worker statistics are exactly those of the single-process run.
* ``W == 1`` (the statistics span the whole step's batch) with ``sync_norm``: BN becomes
  ``torch.nn.SyncBatchNorm`` and BGN becomes :class:`bgnorm.SyncBatchGroupNorm`, so the
  statistics are again those of the whole batch, as in the single-process run.
* ``W == 1`` without ``sync_norm``: one worker per rank, each normalizing its own slice of
  ``b / R`` examples (plain DDP behaviour); the result records the layout.
* Otherwise (``W > 1`` not divisible by ``R``) the cell is refused with a clear error.

``sync_norm`` has no effect on cells with ``W > 1``: their statistics are per worker by design.
"""

from __future__ import annotations

import datetime
import inspect
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DistEnv",
    "active",
    "all_reduce_sum",
    "average_buffers",
    "barrier",
    "broadcast_object",
    "env_from_environ",
    "init_distributed",
    "launched_by_torchrun",
    "local_workers",
    "shard_batch",
    "shutdown",
    "unwrap",
    "wrap_model",
]

DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in a distributed run.

    Attributes:
        rank, world_size, local_rank: as torchrun sets them (``RANK``, ``WORLD_SIZE``,
            ``LOCAL_RANK``).
        sync_norm: synchronize the norms' statistics over the ranks (``--sync-norm``).
        timeout_s: the process group's timeout for collectives.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    sync_norm: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that writes files and prints."""
        return self.rank == 0


_ACTIVE: DistEnv | None = None


def launched_by_torchrun() -> bool:
    """True when torchrun's environment variables are set."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def env_from_environ(sync_norm: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistEnv:
    """A :class:`DistEnv` from ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (defaults 0, 1, 0)."""
    return DistEnv(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        sync_norm=bool(sync_norm),
        timeout_s=float(timeout_s),
    )


def active() -> DistEnv | None:
    """The environment set by :func:`init_distributed` (None in a single-process run)."""
    return _ACTIVE


def init_distributed(
    device: torch.device | str = "cpu",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    sync_norm: bool = False,
    env: DistEnv | None = None,
) -> tuple[DistEnv, torch.device]:
    """Join the process group (gloo on CPU, nccl on CUDA) and return ``(env, device)``.

    On CUDA the device becomes ``cuda:LOCAL_RANK``. ``timeout_s`` bounds every collective: when
    a rank dies or stalls the others raise a ``RuntimeError`` (at once for a closed connection,
    else after the timeout). Uses the ``env://`` rendezvous (``MASTER_ADDR``/``MASTER_PORT``).
    """
    global _ACTIVE
    env = env or env_from_environ(sync_norm, timeout_s)
    env = DistEnv(env.rank, env.world_size, env.local_rank, sync_norm, float(timeout_s))
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend, rank=env.rank, world_size=env.world_size,
            timeout=datetime.timedelta(seconds=float(timeout_s)),
        )
    _ACTIVE = env
    return env, device


def shutdown() -> None:
    """Leave the process group (if this module joined one).

    The ranks meet at a barrier first: a rank that tears gloo down while a peer's last
    messages are still in flight can abort the peer ("terminate called without an active
    exception", seen once in a loaded test run). A peer that is already gone makes the
    barrier fail after the group's timeout; the group is destroyed either way."""
    global _ACTIVE
    if _ACTIVE is not None and dist.is_initialized():
        try:
            dist.barrier()
        except RuntimeError:
            pass  # a peer is gone: nothing left to wait for
        dist.destroy_process_group()
    _ACTIVE = None


def local_workers(workers: int, env: DistEnv) -> int:
    """Virtual workers this rank holds for a cell of ``workers`` (see the module docstring)."""
    r = env.world_size
    if workers % r == 0:
        return workers // r
    if workers == 1:
        return 1
    raise ValueError(
        f"a cell with {workers} virtual workers cannot be split over {r} ranks: the number of "
        "workers must be a multiple of the world size (or 1); change --batch-sizes, "
        "--set total_batch=... or --nproc-per-node"
    )


def shard_bounds(n: int, env: DistEnv) -> tuple[int, int]:
    """``[start, stop)`` of this rank's contiguous slice of ``n`` examples (the first
    ``n % R`` ranks get one more)."""
    q, rem = divmod(n, env.world_size)
    start = env.rank * q + min(env.rank, rem)
    return start, start + q + (env.rank < rem)


def shard_batch(
    x: torch.Tensor, y: torch.Tensor, env: DistEnv | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's contiguous slice of the global batch ``(x, y)`` (the whole batch without a
    distributed run)."""
    if env is None or env.world_size == 1:
        return x, y
    a, b = shard_bounds(len(x), env)
    return x[a:b], y[a:b]


def wrap_model(model: nn.Module, env: DistEnv | None, sync_norm: bool = False) -> nn.Module:
    """``model`` in DDP (the model itself without a distributed run).

    With ``sync_norm`` every ``BatchGroupNorm*`` becomes a :class:`bgnorm.SyncBatchGroupNorm`
    and every ``BatchNorm*`` a ``torch.nn.SyncBatchNorm`` on CUDA (torch's is CUDA-only under
    DDP; on CPU ``BatchNorm2d`` becomes a SyncBatchGroupNorm with one group per channel, the
    same statistics) first (in place; parameters and
    buffers are kept, so an optimizer built afterwards or before is unaffected). Buffers are not
    broadcast by DDP: per-worker running statistics are averaged with :func:`average_buffers`.
    """
    if env is None:
        return model
    p = next(model.parameters(), None)
    on_cuda = p is not None and p.device.type == "cuda"
    if sync_norm:
        from ..distributed import SyncBatchGroupNorm

        model = SyncBatchGroupNorm.convert_sync_batchgroupnorm(model)
        if on_cuda:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:  # torch's SyncBatchNorm is CUDA-only under DDP: BN = BGN with G = C
            model = _bn_to_sync_bgn(model)
    if env.world_size == 1 and not dist.is_initialized():
        return model
    device_ids = [p.device.index] if on_cuda else None
    ddp = nn.parallel.DistributedDataParallel
    # No buffer broadcast in the forward: running statistics stay per rank and are averaged by
    # average_buffers (the initial buffers are identical on every rank anyway).
    kw = ({"forward_sync_buffers": False}
          if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters
          else {"broadcast_buffers": False})
    return ddp(model, device_ids=device_ids, **kw)


def _bn_to_sync_bgn(module: nn.Module) -> nn.Module:
    """Every ``BatchNorm2d`` as a :class:`bgnorm.SyncBatchGroupNorm` with one group per channel.

    With G = C each group is one channel over (N, H, W): BatchNorm's statistics, running
    estimates (unbiased variance) and state dict. Parameters and buffers are taken over.
    """
    from ..distributed import SyncBatchGroupNorm

    out = module
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, nn.SyncBatchNorm):
        c = module.num_features
        out = SyncBatchGroupNorm(c, c, module.eps, module.momentum, module.affine,
                                 module.track_running_stats)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        if module.track_running_stats:
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _bn_to_sync_bgn(child))
    return out


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP (``model`` itself otherwise)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _check(what: str, fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except RuntimeError as exc:
        env = _ACTIVE or DistEnv()
        raise RuntimeError(
            f"distributed training failed during {what} on rank {env.rank} of "
            f"{env.world_size}: another rank probably died or stalled (timeout "
            f"{env.timeout_s:g} s, --dist-timeout). Cause: {exc}"
        ) from exc


def all_reduce_sum(t: torch.Tensor, what: str = "an all-reduce") -> torch.Tensor:
    """Sum ``t`` over the ranks in place (no-op without a process group); returns ``t``."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        _check(what, dist.all_reduce, t)
    return t


def average_buffers(model: nn.Module) -> None:
    """Average the floating-point buffers (running statistics) over the ranks, in place.

    Running statistics are exponential averages, linear in the batch statistics, so the average
    of the ranks' estimates is the estimate a single process computes from the average of the
    workers' statistics (the rule of the virtual workers).
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    bufs = [b for b in unwrap(model).buffers() if b.is_floating_point()]
    if not bufs:
        return
    flat = torch.cat([b.detach().reshape(-1).double() for b in bufs])
    _check("averaging running statistics", dist.all_reduce, flat)
    flat /= dist.get_world_size()
    i = 0
    with torch.no_grad():
        for b in bufs:
            n = b.numel()
            b.copy_(flat[i:i + n].view_as(b).to(b.dtype))
            i += n


def barrier(what: str = "a barrier") -> None:
    """Wait for every rank (no-op without a process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        _check(what, dist.barrier)


def broadcast_object(obj: Any, what: str = "a broadcast") -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself without a process group)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    _check(what, dist.broadcast_object_list, box, 0)
    return box[0]
