"""Training on more than one process: data parallel ranks and SAE dictionaries sharded across ranks.

Built on torch.distributed (NCCL on GPUs, gloo on CPU). A run of W processes started by torchrun
is laid out as W = data groups x shards:

    rank = data_rank * shards + shard_rank

- The ranks of one *shard group* (same data_rank; contiguous ranks, so on one node) read the same
  tokens and each holds 1/shards of every SAE's latents: W_enc columns, b_enc entries and W_dec
  rows (b_dec is replicated). No rank ever holds the full W_enc / W_dec or their Adam state.
- The ranks of one *data group* (same shard_rank) hold the same latents and read disjoint token
  shards; their gradients are averaged after backward (``average_gradients``).

Sharded forward (``ShardedE2ESAE``):
- TopK: each rank takes the top k of its own latents, the candidates (k per rank) are all-gathered
  and the global top k kept (replicated on every rank of the shard group); each rank decodes the
  winners it owns and the partial reconstructions are summed by an all-reduce.
- ReLU: each rank encodes and decodes its own latents; the partial reconstructions (and the
  partial sparsity sums) are summed by an all-reduce.

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

from fastsae import ops
from fastsae.sae import E2ESAE, SAEOutput, SparseCode, draw_init

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


class ShardedE2ESAE(E2ESAE):
    """One shard of an E2ESAE: the same parameter names, holding this rank's block of latents.

    W_enc [d_in, n_local], b_enc [n_local], W_dec [n_local, d_in]; b_dec [d_in] replicated.
    ``n_latents`` is the whole dictionary's size, ``n_local`` this shard's. forward() returns the
    whole SAE's reconstruction on every rank of the shard group; the code is a SparseCode with
    global indices for TopK (replicated), and for ReLU this shard's [..., n_local] block of the
    dense code (use ``sparsity_loss``, ``l0`` and ``fired_latents`` for whole-SAE values).

    Draw it with ``ShardedE2ESAE.drawn(layout, d_in, n_latents, ...)`` (this rank's block of the
    whole SAE's init, never the whole dictionary), or build it from a whole SAE with
    ``ShardedE2ESAE.from_full(sae, layout)`` (each rank keeps its block); ``gather()`` returns
    the whole E2ESAE on the shard group's first rank (None elsewhere), shard by shard on the CPU.
    """

    def __init__(self, full: E2ESAE, layout: Layout, blocks: tuple | None = None):
        torch.nn.Module.__init__(self)
        self.layout = layout
        self.group = layout.shard_group
        self.d_in, self.n_latents, self.activation, self.k = full.d_in, full.n_latents, full.activation, full.k
        self.decoder_norm = full.decoder_norm
        self.init, self.init_encoder_as_decoder_transpose = full.init, full.init_encoder_as_decoder_transpose
        self.metadata = dict(full.metadata)
        self.start, self.stop = shard_range(full.n_latents, layout.shards, layout.shard_rank)
        self.n_local = self.stop - self.start
        if self.activation == "topk" and self.k > self.n_local:
            raise ValueError(f"k={self.k} exceeds the {self.n_local} latents of one shard "
                             f"(n_latents={self.n_latents} / saes.shards={layout.shards})")
        block = slice(self.start, self.stop)
        with torch.no_grad():
            if blocks is None:
                blocks = (full.W_enc[:, block], full.b_enc[block], full.W_dec[block], full.b_dec.detach())
            W_enc, b_enc, W_dec, b_dec = (t.to(full.dtype) for t in blocks)
            # W_enc latent-major, as E2ESAE stores it (a [d_in, n_local] view of [n_local, d_in] rows)
            self.W_enc = torch.nn.Parameter(W_enc.t().clone(memory_format=torch.contiguous_format).t())
            self.b_enc = torch.nn.Parameter(b_enc.clone())
            self.W_dec = torch.nn.Parameter(W_dec.clone())
            self.b_dec = torch.nn.Parameter(b_dec.clone())

    @classmethod
    def from_full(cls, sae: E2ESAE, layout: Layout) -> "ShardedE2ESAE":
        return cls(sae, layout)

    @classmethod
    def drawn(cls, layout: Layout, d_in: int, n_latents: int, activation: str = "relu", k: int | None = None,
              *, device=None, **kwargs) -> "ShardedE2ESAE":
        """This rank's shard of ``E2ESAE(d_in, n_latents, activation, k, **kwargs)``, on ``device``:
        the parameters the whole SAE's init gives these latents (fastsae.sae.draw_init), drawn on
        the CPU from torch's RNG with the whole draw streamed in chunks, so no process ever holds
        the whole dictionary (host memory: a chunk). Every rank must start from the same RNG state
        (the same seed), as for from_full."""
        spec = E2ESAE(d_in, n_latents, activation, k, **{**kwargs, "device": "meta"})  # the config alone
        spec.metadata["init"] = spec.init
        start, stop = shard_range(n_latents, layout.shards, layout.shard_rank)
        blocks = draw_init(spec.init, d_in, n_latents, rows=range(start, stop), device="cpu", out=device,
                           decoder_norm=spec.decoder_norm,
                           init_encoder_as_decoder_transpose=spec.init_encoder_as_decoder_transpose)
        return cls(spec, layout, blocks)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", latents [{self.start}, {self.stop}) of shard {self.layout.shard_rank}"

    def reset_parameters(self) -> None:
        raise RuntimeError("a ShardedE2ESAE takes its parameters from drawn() or from a whole E2ESAE (from_full)")

    # ------------------------------------------------------------------ forward

    def encode(self, x: torch.Tensor) -> torch.Tensor | SparseCode:
        self._check_input(x)
        x = copy_to_shards(x, self.group)  # the encoders' partial input gradients are summed
        if self.activation == "relu":
            return ops.relu_encode(x, self.W_enc, self.b_enc)
        values, local = ops.topk_encode(x, self.W_enc, self.b_enc, self.k)
        if self.group is None:
            return SparseCode(values, local + self.start)
        candidates = gather_from_shards(values, self.group)  # [..., k * shards], rank order
        candidate_ids = torch.cat(_all_gather(local + self.start, self.group), dim=-1)
        top, position = candidates.topk(self.k, dim=-1)
        return SparseCode(top, candidate_ids.gather(-1, position))

    def decode(self, code: torch.Tensor | SparseCode) -> torch.Tensor:
        scale = self.decoder_row_scale()
        zero_bias = torch.zeros_like(self.b_dec)
        if isinstance(code, SparseCode):
            # this shard decodes the winners it owns (the others as value 0 at local row 0); the
            # replicated values get the sum of the shards' gradients
            values = copy_to_shards(code.values, self.group)
            owned = (code.indices >= self.start) & (code.indices < self.stop)
            local = torch.where(owned, code.indices - self.start, torch.zeros_like(code.indices))
            if scale is not None:
                values = values * scale[local]
            values = torch.where(owned, values, torch.zeros_like(values))
            partial = ops.sparse_decode(values, local, self.W_dec, zero_bias)
        else:
            if self.activation == "topk":
                raise TypeError("this SAE is TopK: decode expects the SparseCode that encode returns")
            W_dec = self.W_dec if scale is None else self.W_dec * scale.unsqueeze(1)
            partial = ops.dense_decode(code, W_dec, zero_bias)
        return reduce_from_shards(partial, self.group) + self.b_dec

    def forward(self, x: torch.Tensor, return_code: bool = False):
        code = self.encode(x)
        reconstruction = self.decode(code)
        return SAEOutput(reconstruction, code) if return_code else reconstruction

    # ------------------------------------------------------------------ whole-SAE statistics of a code

    def sparsity_loss(self, code: torch.Tensor | SparseCode, p: float = 1.0) -> torch.Tensor:
        """The whole SAE's sparsity term (fastsae.train.losses.sparsity_loss): ||code||_p per
        token over all latents, mean over tokens, / d_in; differentiable."""
        if isinstance(code, SparseCode):  # replicated: every rank computes the same value
            return torch.linalg.vector_norm(code.values.float(), ord=p, dim=-1).mean() / self.d_in
        if p == 0 or math.isinf(p):
            raise ValueError(f"sparsity p must be finite and positive for a sharded ReLU SAE, got {p}")
        partial = code.float().abs().pow(p).sum(-1)
        return reduce_from_shards(partial, self.group).pow(1.0 / p).mean() / self.d_in

    @torch.no_grad()
    def l0(self, code: torch.Tensor | SparseCode) -> torch.Tensor:
        if isinstance(code, SparseCode):
            return (code.values > 0).sum(-1, dtype=torch.float32).mean()
        count = (code > 0).sum(-1, dtype=torch.float32)
        return reduce_from_shards(count, self.group).mean()

    @torch.no_grad()
    def fired_latents(self, code: torch.Tensor | SparseCode) -> torch.Tensor:
        """bool [n_local]: this shard's latents active on at least one token."""
        if isinstance(code, SparseCode):
            # counted with index_add_, not a bool index (which waits for the GPU), as losses.fired_latents
            active = (code.values > 0) & (code.indices >= self.start) & (code.indices < self.stop)
            local = torch.where(active, code.indices - self.start, 0).reshape(-1)
            counts = torch.zeros(self.n_local, dtype=torch.int32, device=code.values.device)
            return counts.index_add_(0, local, active.reshape(-1).to(torch.int32)) > 0
        return (code > 0).reshape(-1, self.n_local).any(0)

    # ------------------------------------------------------------------ gathering the whole SAE

    @torch.no_grad()
    def gather(self) -> E2ESAE | None:
        """The whole E2ESAE (on the CPU) on the shard group's first rank, None on the others.

        Collective over the shard group (see gather_latents).
        """
        whole = {name: gather_latents(getattr(self, name).detach(), dim, self.group)
                 for name, dim in LATENT_DIMS.items()}
        if whole["W_enc"] is None:
            return None
        return self._whole(whole["W_enc"], whole["b_enc"], whole["W_dec"])

    def local_block(self, whole: torch.Tensor, name: str) -> torch.Tensor:
        """This shard's block of a whole-SAE tensor shaped like parameter `name` (b_dec: all of it)."""
        if name not in LATENT_DIMS:
            return whole
        return whole.narrow(LATENT_DIMS[name], self.start, self.n_local)

    def _whole(self, W_enc, b_enc, W_dec) -> E2ESAE:
        sae = E2ESAE(self.d_in, self.n_latents, self.activation, self.k, decoder_norm=self.decoder_norm,
                     init=self.init, metadata=self.metadata, dtype=self.dtype, device="meta")
        sae = sae.to_empty(device="cpu")
        for name, value in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", self.b_dec.cpu())):
            getattr(sae, name).data.copy_(value)
        sae.metadata = dict(self.metadata)
        return sae

    def save_pretrained(self, directory):
        """Collective: gathers the whole SAE and writes it from the shard group's first rank, so the
        files load anywhere with E2ESAE.from_pretrained. Returns the directory (None on other ranks)."""
        whole = self.gather()
        return None if whole is None else whole.save_pretrained(directory)


# The dimension along which each sharded parameter holds latents (b_dec is replicated).
LATENT_DIMS = {"W_enc": 1, "b_enc": 0, "W_dec": 0}


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
def gather_optimizer_state(optimizer: torch.optim.Optimizer, names: list[str], layout: Layout) -> dict | None:
    """optimizer.state_dict() with every per-latent state tensor (Adam's moments) gathered to
    the whole SAE's shape, as the optimizer of an unsharded run would hold it, so a checkpoint
    resumes on any shard count. names[i]: the parameter name (W_enc, ...) of the optimizer's
    i-th parameter. Collective; the whole state on the shard group's first rank, None elsewhere."""
    state = optimizer.state_dict()
    if layout.shard_group is None:
        return state
    leader = _group_ranks(layout.shard_group)[0] == dist.get_rank()
    packed = {}
    for index, per_param in state["state"].items():
        dim = LATENT_DIMS.get(names[index])
        packed[index] = {key: gather_latents(value, dim, layout.shard_group)
                         if dim is not None and torch.is_tensor(value) and value.ndim > 0 else value
                         for key, value in per_param.items()}
    return {**state, "state": packed} if leader else None


def shard_optimizer_state(state: dict, names: list[str], saes: list["ShardedE2ESAE"]) -> dict:
    """The inverse of gather_optimizer_state on one rank: each whole state tensor cut to this
    shard's block. saes[i]: the ShardedE2ESAE the optimizer's i-th parameter belongs to."""
    packed = {}
    for index, per_param in state["state"].items():
        name, sae = names[index], saes[index]
        packed[index] = {key: sae.local_block(value, name).clone()
                         if name in LATENT_DIMS and torch.is_tensor(value) and value.ndim > 0 else value
                         for key, value in per_param.items()}
    return {**state, "state": packed}


def _all_gather(x: torch.Tensor, group) -> list[torch.Tensor]:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return parts


# ---------------------------------------------------------------------------------------------
# gradients across ranks


@torch.no_grad()
def average_gradients(saes, layout: Layout) -> None:
    """After backward: average the SAE gradients over the data group (ranks holding the same
    latents, different tokens). b_dec is replicated across a shard group: its gradient is
    averaged there too, so the replicas never drift apart by rounding."""
    if not layout.distributed:
        return
    for sae in saes:
        for name, param in sae.named_parameters():
            if param.grad is None:
                continue
            if layout.data_group is not None:
                param.grad.div_(layout.data_size)
                dist.all_reduce(param.grad, group=layout.data_group)
            if name == "b_dec" and layout.shard_group is not None:
                param.grad.div_(layout.shards)
                dist.all_reduce(param.grad, group=layout.shard_group)


@torch.no_grad()
def clip_grad_norm_(saes, max_norm: float, layout: Layout) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over the whole SAEs: the shards' squared norms are summed
    over the shard group (replicated b_dec counted once). Call after average_gradients."""
    sharded, replicated = [], []
    for sae in saes:
        for name, param in sae.named_parameters():
            if param.grad is not None:
                (replicated if name == "b_dec" or layout.shard_group is None else sharded).append(param.grad)
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
