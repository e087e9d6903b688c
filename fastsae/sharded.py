"""ShardedE2ESAE: one rank's block of an E2ESAE's latents, under torchrun (saes.shards > 1).

The same module as E2ESAE (it is a subclass and runs E2ESAE's forward), holding latents
[start, stop) of the whole dictionary: W_enc [d_in, n_local], b_enc [n_local], W_dec [n_local,
d_out] and the activation's per-latent tensors; b_dec, a skip-transcoder's W_skip [d_in, d_out] and
scalar tensors are replicated (latent_dim None). It overrides only where the latents are (fastsae.sae, "where the latents are"), with the collectives
of fastsae.distributed over the shard group:

- x enters the encoders through copy_to_shards (the shards' input gradients are summed);
- selection activations gather every shard's candidates (gather_from_shards) and select among all
  of them, so the code is the whole SAE's, replicated; each shard decodes the winners it owns;
- per-token sums over latents (the partial reconstruction, the sparsity sums) are summed by
  reduce_from_shards, then b_dec is added.
So forward and training_forward return the whole SAE's reconstruction and statistics on every rank
of the shard group (``fire_counts`` is this shard's latents'). For an elementwise activation, encode()
returns this shard's [..., n_local] block of the dense code.
"""

from __future__ import annotations

import torch
from torch import nn

from fastsae.activations import SparseCode
from fastsae.distributed import Layout, all_gather, copy_to_shards, gather_from_shards, gather_latents, \
    reduce_from_shards, shard_range
from fastsae.formats import SAERecord
from fastsae.init import draw_init
from fastsae.sae import E2ESAE
from fastsae.spec import SAESpec


class ShardedE2ESAE(E2ESAE):
    """Build it with ``ShardedE2ESAE.drawn(layout, spec, ...)`` (this rank's block of the whole SAE's
    init, never the whole dictionary) or ``ShardedE2ESAE.from_full(sae, layout)`` (each rank keeps
    its block of a whole SAE); ``gather()`` returns the whole E2ESAE on the shard group's first rank
    (None elsewhere), shard by shard on the CPU."""

    def __init__(self, spec: SAESpec, layout: Layout, blocks: dict[str, torch.Tensor], *, metadata: dict | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        nn.Module.__init__(self)
        self.layout, self.group = layout, layout.shard_group
        self.start, self.stop = shard_range(spec.n_latents, layout.shards, layout.shard_rank)
        n_local = self.stop - self.start
        self._build(spec, n_local, metadata, dtype, device)
        try:
            self.activation_fn.check_shard(n_local)
        except ValueError as error:
            raise ValueError(f"{error} (n_latents={spec.n_latents} / saes.shards={layout.shards})") from None
        with torch.no_grad():
            for name in self.tensor_names():
                getattr(self, name).copy_(blocks[name])

    @classmethod
    def from_full(cls, sae: E2ESAE, layout: Layout) -> "ShardedE2ESAE":
        start, stop = shard_range(sae.n_latents, layout.shards, layout.shard_rank)
        blocks = {}
        for name in sae.tensor_names():
            dim, tensor = sae.latent_dim(name), getattr(sae, name).detach()
            blocks[name] = tensor if dim is None else tensor.narrow(dim, start, stop - start)
        return cls(sae.spec, layout, blocks, metadata=sae.metadata, dtype=sae.dtype, device=sae.device)

    @classmethod
    def drawn(cls, layout: Layout, spec: SAESpec, *, metadata: dict | None = None, dtype: torch.dtype | None = None,
              device=None) -> "ShardedE2ESAE":
        """This rank's shard of ``E2ESAE.from_spec(spec)``, on ``device``: the parameters the whole
        SAE's init gives these latents (fastsae.init.draw_init), drawn on the CPU from torch's RNG
        with the whole draw streamed in chunks, so no process ever holds the whole dictionary (host
        memory: a chunk). Every rank must start from the same RNG state (the same seed), as for
        from_full."""
        start, stop = shard_range(spec.n_latents, layout.shards, layout.shard_rank)
        drawn = draw_init(spec, rows=range(start, stop), device="cpu", out=device)
        blocks = dict(zip(("W_enc", "b_enc", "W_dec", "b_dec"), drawn))
        if spec.skip:  # a skip-transcoder's W_skip [d_in, d_out]: replicated, and 0 at init as E2ESAE's
            blocks["W_skip"] = torch.zeros(spec.d_in, spec.d_out)
        for name, extra in spec.kind.extra_tensors.items():
            blocks[name] = torch.full((stop - start,) if extra.per_latent else (), extra.fill(spec.params))
        return cls(spec, layout, blocks, metadata=metadata, dtype=dtype, device=device)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", latents [{self.start}, {self.stop}) of shard {self.layout.shard_rank}"

    def reset_parameters(self) -> None:
        raise RuntimeError("a ShardedE2ESAE takes its parameters from drawn() or from a whole E2ESAE (from_full)")

    # ------------------------------------------------------------------ where the latents are

    latent_offset = property(lambda self: self.start)
    shard_count = property(lambda self: self.layout.shards)

    def encoder_input(self, x):
        return copy_to_shards(x, self.group)

    def sum_over_latents(self, partial):
        return reduce_from_shards(partial, self.group)

    def gather_candidates(self, values, ids):
        if self.group is None:
            return values, ids
        return gather_from_shards(values, self.group), torch.cat(all_gather(ids, self.group), dim=-1)

    def local_code(self, code: SparseCode):
        # this shard decodes the winners it owns (the others as value 0 at local row 0); the
        # replicated values get the sum of the shards' gradients
        values = copy_to_shards(code.values, self.group)
        owned = (code.indices >= self.start) & (code.indices < self.stop)
        local = torch.where(owned, code.indices - self.start, torch.zeros_like(code.indices))
        return torch.where(owned, values, torch.zeros_like(values)), local

    def partial_bias(self):
        return torch.zeros_like(self.b_dec)

    def finish_reconstruction(self, partial):
        return reduce_from_shards(partial, self.group) + self.b_dec

    # ------------------------------------------------------------------ the whole SAE

    def local_block(self, whole: torch.Tensor, name: str) -> torch.Tensor:
        """This shard's block of a whole-SAE tensor shaped like tensor `name` (replicated: all of it)."""
        dim = self.latent_dim(name)
        return whole if dim is None else whole.narrow(dim, self.start, self.stop - self.start)

    @torch.no_grad()
    def gather(self) -> E2ESAE | None:
        """The whole E2ESAE (on the CPU) on the shard group's first rank, None on the others.

        Collective over the shard group (see fastsae.distributed.gather_latents).
        """
        whole = {}
        for name in self.tensor_names():
            dim, tensor = self.latent_dim(name), getattr(self, name).detach()
            whole[name] = tensor.cpu() if dim is None else gather_latents(tensor, dim, self.group)
        if any(tensor is None for tensor in whole.values()):
            return None
        return E2ESAE.from_record(SAERecord(self.spec, whole, dict(self.metadata), self.dtype))

    def save_pretrained(self, directory, format: str = "fastsae"):
        """Collective: gathers the whole SAE and writes it from the shard group's first rank, so the
        files load anywhere with E2ESAE.from_pretrained. Returns the directory (None on other ranks)."""
        whole = self.gather()
        return None if whole is None else whole.save_pretrained(directory, format)
