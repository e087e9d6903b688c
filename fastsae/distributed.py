"""Training on more than one process: data parallel ranks and SAE dictionaries sharded across ranks.

Built on torch.distributed (NCCL on GPUs, gloo on CPU). A run of W processes started by torchrun
is laid out as W = data groups x shards:

    rank = data_rank * shards + shard_rank

- The ranks of one *shard group* (same data_rank; contiguous ranks, so on one node) read the same
  tokens and each holds 1/shards of every SAE's latents: W_enc columns, b_enc entries and W_dec
  rows (b_dec is replicated). No rank ever holds the full W_enc / W_dec or their Adam state.
- The ranks of one *data group* (same shard_rank) hold the same latents and read disjoint token
  shards; their gradients are averaged after backward (``average_gradients``).

This module holds the layout and the collectives; the sharded SAE that uses them is
fastsae.sharded.ShardedE2ESAE:
- selection activations (TopK, BatchTopK in training): each rank keeps its own latents'
  candidates, the candidates are all-gathered and the activation selects among all of them
  (replicated on every rank of the shard group); each rank decodes the winners it owns and the
  partial reconstructions are summed by an all-reduce.
- elementwise activations (ReLU, JumpReLU): each rank encodes and decodes its own latents; the
  partial reconstructions (and the per-token sparsity sums) are summed by an all-reduce.

Backward follows the same split through three autograd Functions over the shard group, in the
Megatron convention (a tensor after an all-reduce is replicated and its gradient is the same on
every rank): ``_CopyToShards`` (identity forward, all-reduce of the gradient backward) where a
replicated tensor enters a rank-local computation, ``_ReduceFromShards`` (all-reduce forward,
identity backward) where rank-local partial sums become replicated, and ``_GatherFromShards``
(all-gather forward, own slice of the gradient backward).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

# ---------------------------------------------------------------------------------------------
# process groups


@dataclass(frozen=True)
class Layout:
    """Where this process sits in a run: rank = data_rank * shards + shard_rank.

    shard_group / data_group are torch.distributed process groups (None when that dimension has
    size 1, so single-process code paths never touch torch.distributed).
    """

    rank: int = 0
    world_size: int = 1
    shards: int = 1
    shard_group: object = None
    data_group: object = None

    @property
    def data_size(self) -> int:
        return self.world_size // self.shards

    @property
    def data_rank(self) -> int:
        return self.rank // self.shards

    @property
    def shard_rank(self) -> int:
        return self.rank % self.shards

    @property
    def is_main(self) -> bool:
        """Rank 0 writes metrics, progress and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


SINGLE = Layout()


def torchrun_world_size() -> int:
    """WORLD_SIZE from the environment torchrun sets (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(shards: int = 1, backend: str | None = None) -> Layout:
    """The Layout of this process, initialising torch.distributed from torchrun's environment
    (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) if it is not initialised yet.

    shards: ranks per shard group (config saes.shards); must divide the world size.
    backend: None picks NCCL when CUDA is available, else gloo. Under NCCL each process uses the
    GPU of its LOCAL_RANK.
    """
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards must be a positive int, got {shards!r}")
    if not dist.is_initialized():
        world = torchrun_world_size()
        if world == 1:
            if shards != 1:
                raise ValueError(f"saes.shards={shards} needs {shards} processes (or a multiple); start the run "
                                 f"with `torchrun --nproc-per-node {shards} -m fastsae train ...`")
            return SINGLE
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % shards:
        raise ValueError(f"saes.shards={shards} must divide the number of processes ({world}): the run is "
                         "laid out as data groups x shards")
    # new_group is collective: every rank creates every group, in the same order.
    shard_group = data_group = None
    for data_rank in range(world // shards):
        group = dist.new_group(list(range(data_rank * shards, (data_rank + 1) * shards)))
        if rank // shards == data_rank:
            shard_group = group
    for shard_rank in range(shards):
        group = dist.new_group(list(range(shard_rank, world, shards)))
        if rank % shards == shard_rank:
            data_group = group
    return Layout(rank, world, shards, shard_group if shards > 1 else None,
                  data_group if world // shards > 1 else None)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _group_ranks(group) -> list[int]:
    return dist.get_process_group_ranks(group)


# ---------------------------------------------------------------------------------------------
# autograd collectives over a shard group


class _CopyToShards(torch.autograd.Function):
    """Forward: identity on a replicated tensor. Backward: sum the ranks' partial gradients."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromShards(torch.autograd.Function):
    """Forward: sum the ranks' partial tensors (replicated result). Backward: identity."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromShards(torch.autograd.Function):
    """Forward: concatenate the ranks' tensors along the last dim, in rank order (replicated
    result). Backward: this rank's slice of the (replicated) gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.width = group, x.shape[-1]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        start = dist.get_rank(ctx.group) * ctx.width
        return grad[..., start:start + ctx.width].contiguous(), None


def copy_to_shards(x: torch.Tensor, group) -> torch.Tensor:
    if group is None or not x.requires_grad:
        return x
    return _CopyToShards.apply(x, group)


def reduce_from_shards(x: torch.Tensor, group) -> torch.Tensor:
    return x if group is None else _ReduceFromShards.apply(x, group)


def gather_from_shards(x: torch.Tensor, group) -> torch.Tensor:
    return x if group is None else _GatherFromShards.apply(x, group)


# ---------------------------------------------------------------------------------------------
# the sharded SAE


def shard_range(n_latents: int, shards: int, shard_rank: int) -> tuple[int, int]:
    """[start, stop) of the latents a shard owns: equal contiguous blocks."""
    if n_latents % shards:
        raise ValueError(f"n_latents={n_latents} must be divisible by saes.shards={shards} "
                         "(each shard holds an equal block of latents)")
    size = n_latents // shards
    return shard_rank * size, (shard_rank + 1) * size


@torch.no_grad()
def gather_latents(tensor: torch.Tensor, dim: int, group) -> torch.Tensor | None:
    """The shards' blocks of a tensor concatenated along dim, in rank order, on the CPU of the
    group's first rank (None on the others). Collective over the group. Blocks travel one at a
    time by send / recv, so no device holds more than one block beyond its own."""
    tensor = tensor.detach().contiguous()
    if group is None:
        return tensor.to("cpu", copy=True)
    ranks = _group_ranks(group)
    leader, me = ranks[0], dist.get_rank()
    if me != leader:
        dist.send(tensor, dst=leader, group=group)
        return None
    parts = [tensor.cpu()]
    for source in ranks[1:]:
        buffer = torch.empty_like(tensor)
        dist.recv(buffer, src=source, group=group)
        parts.append(buffer.cpu())
    return torch.cat(parts, dim)


@torch.no_grad()
def gather_optimizer_state(optimizer: torch.optim.Optimizer, latent_dims: list[int | None], layout: Layout) -> dict | None:
    """optimizer.state_dict() with every per-latent state tensor (Adam's moments) gathered to
    the whole SAE's shape, as the optimizer of an unsharded run would hold it, so a checkpoint
    resumes on any shard count. latent_dims[i]: the dimension along which the optimizer's i-th
    parameter holds latents (None: replicated; E2ESAE.latent_dim). Collective; the whole state on
    the shard group's first rank, None elsewhere."""
    state = optimizer.state_dict()
    if layout.shard_group is None:
        return state
    leader = _group_ranks(layout.shard_group)[0] == dist.get_rank()
    packed = {}
    for index, per_param in state["state"].items():
        dim = latent_dims[index]
        packed[index] = {key: gather_latents(value, dim, layout.shard_group)
                         if dim is not None and torch.is_tensor(value) and value.ndim > 0 else value
                         for key, value in per_param.items()}
    return {**state, "state": packed} if leader else None


def shard_optimizer_state(state: dict, latent_dims: list[int | None], blocks: list[tuple[int, int]]) -> dict:
    """The inverse of gather_optimizer_state on one rank: each whole state tensor cut to this
    shard's block. blocks[i]: [start, stop) of the latents this rank holds of the optimizer's i-th
    parameter's SAE."""
    packed = {}
    for index, per_param in state["state"].items():
        dim, (start, stop) = latent_dims[index], blocks[index]
        packed[index] = {key: value.narrow(dim, start, stop - start).clone()
                         if dim is not None and torch.is_tensor(value) and value.ndim > 0 else value
                         for key, value in per_param.items()}
    return {**state, "state": packed}


def all_gather(x: torch.Tensor, group) -> list[torch.Tensor]:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return parts


# ---------------------------------------------------------------------------------------------
# gradients across ranks


@torch.no_grad()
def average_gradients(saes, layout: Layout) -> None:
    """After backward: average the SAE gradients over the data group (ranks holding the same
    latents, different tokens). Parameters that hold no latents (b_dec) are replicated across a
    shard group: their gradient is averaged there too, so the replicas never drift apart by
    rounding."""
    if not layout.distributed:
        return
    for sae in saes:
        for name, param in sae.named_parameters():
            if param.grad is None:
                continue
            if layout.data_group is not None:
                param.grad.div_(layout.data_size)
                dist.all_reduce(param.grad, group=layout.data_group)
            if sae.latent_dim(name) is None and layout.shard_group is not None:
                param.grad.div_(layout.shards)
                dist.all_reduce(param.grad, group=layout.shard_group)


@torch.no_grad()
def clip_grad_norm_(saes, max_norm: float, layout: Layout) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over the whole SAEs: the shards' squared norms are summed
    over the shard group (replicated parameters, b_dec, counted once). Call after average_gradients."""
    sharded, replicated = [], []
    for sae in saes:
        for name, param in sae.named_parameters():
            if param.grad is not None:
                replicated_param = sae.latent_dim(name) is None or layout.shard_group is None
                (replicated if replicated_param else sharded).append(param.grad)
    device = (sharded or replicated)[0].device
    square = lambda grads: sum((g.float().pow(2).sum() for g in grads), torch.zeros((), device=device))
    total = square(sharded)
    if layout.shard_group is not None:
        dist.all_reduce(total, group=layout.shard_group)
    norm = (total + square(replicated)).sqrt()
    if math.isfinite(max_norm):
        factor = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for grad in sharded + replicated:
            grad.mul_(factor.to(grad.dtype))
    return norm


@torch.no_grad()
def any_across(mask: torch.Tensor, group) -> torch.Tensor:
    """Elementwise OR of a bool tensor over a group (latents that fired on any rank's tokens)."""
    if group is None:
        return mask
    flags = mask.to(torch.uint8)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    return flags.bool()


def all_agree(flag: bool, layout: Layout) -> bool:
    """True on every rank if flag is true on any rank (e.g. a stop signal only some ranks got),
    so that all ranks leave the training loop at the same step."""
    if not layout.distributed:
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        value = value.cuda()
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather_objects(obj, layout: Layout) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (small picklable state such as RNGs)."""
    if not layout.distributed:
        return [obj]
    out = [None] * layout.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(layout: Layout) -> None:
    if layout.distributed:
        dist.barrier()


@torch.no_grad()
def mean_over_data(values: dict[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """Each 0-d tensor averaged over the data group, in one all-reduce that stays on the device
    (the trainer reads metrics asynchronously). Every rank must pass the same keys."""
    if layout.data_group is None or not values:
        return values
    keys = sorted(values)
    stacked = torch.stack([torch.as_tensor(values[k]).detach().float().reshape(()) for k in keys])
    dist.all_reduce(stacked, group=layout.data_group)
    stacked /= layout.data_size
    return dict(zip(keys, stacked.unbind()))


@torch.no_grad()
def sum_over_shards(count: torch.Tensor, layout: Layout) -> torch.Tensor:
    """A per-shard count (dead or alive latents) summed to the whole SAE's."""
    if layout.shard_group is None:
        return count
    count = count.clone()
    dist.all_reduce(count, group=layout.shard_group)
    return count
