"""Several processes: grid sharding, and data parallelism for one run (``ddp: true``).

Launchers (``accelerate launch``, ``torchrun``, SLURM) only set environment variables; this
module reads them. Two ways to use N processes:

* **Grid sharding** (default): process ``i`` of ``n`` runs grid points ``i, i + n, ...``
  start to finish on its own device. No process group is created, so the processes never
  wait for each other and a pre-empted one does not stall the rest. ``n`` and ``i`` combine
  a launcher's ``WORLD_SIZE``/``RANK`` with a SLURM array's task id and count, or are set
  explicitly with ``FSCL_SHARD_COUNT``/``FSCL_SHARD_INDEX``.
* **Data parallel** (``ddp: true``): every process takes part in every run. Accelerate's
  :class:`~accelerate.PartialState` creates the process group (NCCL on GPUs, gloo on CPU);
  the CLIP template then encodes a slice of each global batch per rank and gathers the
  features (:func:`gather_batch`), gradients and strategy statistics are averaged
  (:func:`all_reduce_mean`), evaluation (zero-shot and VQA questions) is split by
  :func:`eval_indices` and its counts summed (:func:`all_reduce_sum`). At world size 1 every helper is a no-op.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor
from torch import distributed as dist

from benchmark.config import ConfigError

T = TypeVar("T")


# --------------------------------------------------------------------------- grid sharding
@dataclass(frozen=True)
class Shard:
    """This process's share of a grid: every ``count``-th run from ``index`` (0-based)."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not (self.count >= 1 and 0 <= self.index < self.count):
            raise ValueError(f"invalid shard {self.index}/{self.count}: need 0 <= index < count")

    def select(self, items: Sequence[T]) -> list[T]:
        """The items of this shard, in order (round robin, so long and short runs mix)."""
        return list(items[self.index :: self.count])

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def _env_int(env: dict[str, str], *names: str) -> int | None:
    for name in names:
        if env.get(name, "").strip():
            return int(env[name])
    return None


def grid_shard(env: dict[str, str] | None = None, launcher: bool = True) -> Shard:
    """This process's shard of the grid, from the environment (``os.environ`` by default).

    ``FSCL_SHARD_COUNT`` + ``FSCL_SHARD_INDEX`` win when set. Otherwise a SLURM array
    (``SLURM_ARRAY_TASK_COUNT`` tasks, ``SLURM_ARRAY_TASK_ID`` counted from
    ``SLURM_ARRAY_TASK_MIN``) and a launcher's ``WORLD_SIZE``/``RANK`` combine into
    ``array tasks × world size`` shards: task ``t``'s process ``r`` is shard ``t · world + r``.
    ``launcher=False`` (``ddp: true``: the launched processes share each run) ignores
    ``WORLD_SIZE``/``RANK``.
    """
    env = dict(os.environ if env is None else env)
    count = _env_int(env, "FSCL_SHARD_COUNT")
    if count is not None:
        return Shard(_env_int(env, "FSCL_SHARD_INDEX") or 0, count)
    tasks = _env_int(env, "SLURM_ARRAY_TASK_COUNT") or 1
    task = (_env_int(env, "SLURM_ARRAY_TASK_ID") or 0) - (_env_int(env, "SLURM_ARRAY_TASK_MIN") or 0) if tasks > 1 else 0
    world, rank = (_env_int(env, "WORLD_SIZE") or 1, _env_int(env, "RANK") or 0) if launcher else (1, 0)
    return Shard(task * world + rank, tasks * world)


def local_device(name: str) -> torch.device:
    """The device for config value ``name``, always with an index for CUDA: ``auto`` and ``cuda`` are
    ``cuda:LOCAL_RANK`` (modulo the GPUs there) when CUDA is there (``auto``: else the CPU).
    A device this machine lacks is a :class:`ConfigError` that says what it has."""
    if name == "cpu" or name == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if name in ("auto", "cuda"):
        _require_cuda(name)
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    if name.startswith("cuda:"):
        _require_cuda(name)
        index = name.partition(":")[2]
        count = torch.cuda.device_count()
        if not index.isdigit() or int(index) >= count:
            raise ConfigError(f"device: invalid value {name!r}; allowed: cuda:0 .. cuda:{count - 1} "
                              f"(this machine has {count} GPU(s)), cuda, auto, cpu")
        return torch.device("cuda", int(index))
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError("device: 'mps' is not available on this machine (no Apple GPU, or torch built "
                              "without it); allowed: auto, cpu")
        return torch.device("mps")
    raise ConfigError(f"device: invalid value {name!r}; allowed: auto, cpu, cuda, cuda:N, mps")


def synchronize(device: torch.device) -> None:
    """Wait until ``device`` has done its queued work (CUDA runs asynchronously; other devices do not)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _require_cuda(name: str) -> None:
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}, no GPU visible"
        raise ConfigError(f"device: {name!r} asks for CUDA, which this machine lacks (torch {torch.__version__}: "
                          f"{build}); allowed: auto, cpu")


# --------------------------------------------------------------------------- data parallel
def launched_processes(env: dict[str, str] | None = None) -> int:
    """``WORLD_SIZE`` set by the launcher (1 when started plainly)."""
    return _env_int(dict(os.environ if env is None else env), "WORLD_SIZE") or 1


def init_data_parallel(device: torch.device) -> None:
    """Join the launcher's process group through Accelerate (NCCL for a CUDA ``device``, gloo
    on CPU). A no-op when the process was not launched as one of several."""
    if launched_processes() <= 1 or dist.is_initialized():
        return
    from accelerate import PartialState

    PartialState(cpu=device.type == "cpu")


def check_data_parallel(encoder: torch.nn.Module, name: str) -> None:
    """Refuse an image encoder that ``ddp: true`` cannot train like one process: batch norm
    would normalise each rank's slice with its own statistics (and the ranks' running
    statistics would drift apart)."""
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in encoder.modules()):
        raise ConfigError(f"ddp: backbone '{name}' has batch-norm layers, whose statistics would differ between "
                          f"processes; allowed: ddp: false, or a backbone without batch norm (ViTs)")


def world_size() -> int:
    """Processes in the data-parallel group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the data-parallel group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    """True on rank 0 (and without a group): the process that writes run records."""
    return rank() == 0


def _all_reduce_flat(tensors: Sequence[Tensor], op: dist.ReduceOp) -> None:
    """All-reduce ``tensors`` in place, one flat buffer per dtype (one message, not one per tensor)."""
    for dtype in {t.dtype for t in tensors}:
        group = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        dist.all_reduce(flat, op=op)
        offset = 0
        for t in group:
            t.data.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def all_reduce_mean(tensors: Sequence[Tensor]) -> None:
    """Replace each tensor (in place) by its mean over ranks; no-op at world size 1.

    Strategies call it (through :func:`benchmark.plugins.session_gradients` and the
    template's gradient step) so that every rank builds the same masks from the same scores.
    """
    if world_size() > 1 and tensors:
        _all_reduce_flat(tensors, dist.ReduceOp.SUM)
        for t in tensors:
            t.data.div_(world_size())


def all_reduce_sum(values: Sequence[int | float]) -> list[int | float]:
    """Sums over ranks (e.g. correct / total counts), each of its value's type (a buffer of float64 when any is a
    float); the input at world size 1."""
    if world_size() <= 1:
        return list(values)
    # NCCL only moves GPU tensors
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    dtype = torch.float64 if any(isinstance(v, float) for v in values) else torch.int64
    buf = torch.tensor(list(values), dtype=dtype, device=device)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return [type(v)(total) for v, total in zip(values, buf.tolist())]


def any_rank(flags: Sequence[bool]) -> list[bool]:
    """Element-wise OR of boolean flags over ranks."""
    return [bool(v) for v in all_reduce_sum([int(f) for f in flags])]


def batch_slice(batch_size: int) -> slice:
    """This rank's contiguous part of a global batch of ``batch_size`` (sizes differ by ≤ 1)."""
    return batch_slice_for(batch_size, rank(), world_size())


def batch_slice_for(batch_size: int, r: int, world: int) -> slice:
    """Rank ``r``'s part of a global batch of ``batch_size`` among ``world`` ranks."""
    base, extra = divmod(batch_size, world)
    start = r * base + min(r, extra)
    return slice(start, start + base + (r < extra))


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; gradient multiplied by ``scale`` backward."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad * ctx.scale, None


def gather_batch(local: Tensor, batch_size: int) -> Tensor:
    """The features [batch_size, D] of a whole global batch from each rank's slice [b_r, D].

    Other ranks' rows are plain values; this rank's rows keep their graph with the gradient
    scaled by the world size, so that a loss over the whole batch (the CLIP loss is not a
    sum over samples: every caption is a negative for every image) backpropagates this
    rank's share, and the mean of the ranks' gradients (:func:`all_reduce_mean`) is the
    single-process gradient of that loss. Terms replicated on every rank (e.g. the EWC
    penalty) keep their gradient under that mean. Identity at world size 1.
    """
    world = world_size()
    if world <= 1:
        return local
    sizes = [len(range(batch_size)[batch_slice_for(batch_size, r, world)]) for r in range(world)]
    width = max(sizes)
    padded = local.new_zeros((width, *local.shape[1:]))
    padded[: len(local)] = local.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    parts = [p[:n] for p, n in zip(parts, sizes)]
    parts[rank()] = _ScaleGrad.apply(local, float(world))
    return torch.cat(parts)


def eval_indices(n_items: int) -> range:
    """This rank's share of an evaluation set of ``n_items`` (strided: disjoint, covering)."""
    return range(rank(), n_items, world_size())
