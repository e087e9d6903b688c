"""The training paths a kind calls: the two fused paths and the chunked dense reference.

    elementwise_pass   relu_autoencode: input to reconstruction with the code's Lp sum, L0 and fire
                       counts; the [N, n_latents] code never exists (ReLU, JumpReLU, BatchTopK at
                       inference). elementwise_encode gives the dense code where a user asks.
    select_code        topk_encode's per-token candidates, gathered over shards, and the kind's
                       select(); wider candidates while the kind asks for them (BatchTopK).
    selection_pass     a selection code decoded by sparse_decode (decode_code; or a reconstruction
                       the kind made itself, e.g. Matryoshka's prefix sums), with its sums and fire
                       counts. decode_code(bias=False) gives a partial sum of decoder rows.
    dense_reference_pass   the kind's dense_forward a chunk of tokens at a time, each chunk kept
                       only as its inputs and outputs and recomputed in backward
                       (torch.utils.checkpoint), so the [chunk, n_latents] pre-activations and code
                       of one chunk are the largest temporaries: a kind without a fused path trains
                       on any device from day one.
    sparse_from_dense  a dense code compacted chunk by chunk into a padded SparseCode (analysis).

The SAE is duck-typed: E2ESAE (fastsae.sae) and its sharded block give W_enc, b_enc, W_dec, b_dec,
n_local, latent_offset, shard_count and the few methods that say where the latents are
(encoder_input, gather_candidates, local_code, partial_bias, finish_reconstruction,
sum_over_latents, normalised_decoder, decoder_row_scale). This layer sits below fastsae.sae and
never imports it. These helpers are the only place, with the kinds themselves, where a code path
depends on how a kind encodes.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

from fastsae import ops
from fastsae.ops import checks
from fastsae.activations.code import ActivationMemory, SparseCode, power_sum
from fastsae.ops.relu_autoencoder import memory_estimate


class PassSums(NamedTuple):
    """A path's result: reconstruction [N, d_out]; lp_sum, l0 [N] (summed over every latent, all
    shards); fire_counts int32 [latents held here]; per_token: the extra per-token sums a dense
    pass was asked for (empty elsewhere)."""

    reconstruction: torch.Tensor
    lp_sum: torch.Tensor
    l0: torch.Tensor
    fire_counts: torch.Tensor
    per_token: dict


# ---------------------------------------------------------------------------- elementwise


def elementwise_pass(sae, x: torch.Tensor, p: float, threshold: torch.Tensor | None,
                     bandwidth: float | None) -> PassSums:
    """x [N, d_in] through fastsae.ops.relu_autoencode: no [N, n_latents] code in forward or
    backward. threshold: [latents held here] (None: ReLU), bandwidth: its estimator's width."""
    out = ops.relu_autoencode(sae.encoder_input(x), sae.W_enc, sae.b_enc, sae.normalised_decoder(),
                              sae.partial_bias(), threshold=threshold, bandwidth=bandwidth, p=p)
    return PassSums(sae.finish_reconstruction(out.reconstruction), sae.sum_over_latents(out.lp_sum),
                    sae.sum_over_latents(out.l0), out.fire_counts, {})


def elementwise_encode(sae, x: torch.Tensor, threshold: torch.Tensor | None) -> torch.Tensor:
    """The dense code [N, latents held here]: relu(pre), and 0 where pre <= threshold."""
    acts = ops.relu_encode(sae.encoder_input(x), sae.W_enc, sae.b_enc)
    if threshold is not None:  # relu(pre) > theta exactly where pre > theta (theta >= 0)
        acts = torch.where(acts > threshold, acts, torch.zeros_like(acts))
    return acts


def elementwise_memory(n_tokens: int, n_local: int, d_in: int, itemsize: int, *, jump: bool,
                       d_out: int | None = None) -> ActivationMemory:
    """relu_autoencode's compact code and its workspaces (fastsae.ops.relu_autoencoder.memory_estimate;
    d_out: a transcoder's decoder width, d_in by default)."""
    estimate = memory_estimate(n_tokens, n_local, d_in, itemsize, jump=jump, d_out=d_out)
    return ActivationMemory(estimate.code, estimate.workspaces)


# ---------------------------------------------------------------------------- selection


def select_code(sae, x: torch.Tensor, kind) -> SparseCode:
    """A selection kind's code: each token's kind.candidates(n_local) largest ReLU pre-activations
    from the TopK encoder (every shard's, side by side), then kind.select(), which may ask for
    wider candidates by returning None (see fastsae.activations.batchtopk)."""
    x_in = sae.encoder_input(x)
    while True:
        values, local = ops.topk_encode(x_in, sae.W_enc, sae.b_enc, kind.candidates(sae.n_local))
        values, ids = sae.gather_candidates(values, local + sae.latent_offset)
        code = kind.select(values, ids, sae, sae.training)
        if code is not None:
            return code


def decode_code(sae, code: SparseCode, bias: bool = True) -> torch.Tensor:
    """The reconstruction of a SparseCode: sparse_decode of this module's entries, the decoder rows
    as the forward pass uses them ("forward" norm: the scale folded into the values). bias=False:
    without b_dec (a partial sum of decoder rows, summed over shards)."""
    values, local = sae.local_code(code)
    scale = sae.decoder_row_scale()
    if scale is not None:
        values = values * scale[local]
    if not bias:
        zero = torch.zeros(sae.W_dec.shape[1], dtype=sae.W_dec.dtype, device=sae.W_dec.device)
        return sae.sum_over_latents(ops.sparse_decode(values, local, sae.W_dec, zero))
    return sae.finish_reconstruction(ops.sparse_decode(values, local, sae.W_dec, sae.partial_bias()))


def selection_pass(sae, code: SparseCode, p: float, reconstruction: torch.Tensor | None = None) -> PassSums:
    """A selection code's reconstruction (decoded here unless the kind made it), Lp sum, L0 and
    fire counts."""
    lp_sum = power_sum(code.values, p)
    return PassSums(decode_code(sae, code) if reconstruction is None else reconstruction, lp_sum,
                    (code.values > 0).sum(-1, dtype=lp_sum.dtype), fire_counts(sae, code), {})


@torch.no_grad()
def fire_counts(sae, code: SparseCode) -> torch.Tensor:
    """int32 [n_local]: the tokens on which each of this module's latents is active in ``code``.
    Counted with index_add_, not a bool index (which would wait for the GPU)."""
    local = code.indices - sae.latent_offset
    owned = (code.values > 0) & (local >= 0) & (local < sae.n_local)
    counts = torch.zeros(sae.n_local, dtype=torch.int32, device=code.values.device)
    counts.index_add_(0, torch.where(owned, local, 0).reshape(-1), owned.reshape(-1).to(torch.int32))
    return counts


def selection_memory(n_tokens: int, n_local: int, width: int, itemsize: int, shards: int) -> ActivationMemory:
    """Each shard's candidates (values and int64 ids), gathered, and the selected code, kept for
    backward; the encoder's pre-activation chunk as its workspace."""
    width = min(width, n_local)
    return ActivationMemory(n_tokens * width * (shards + 2) * (itemsize + 8),
                            min(checks.CHUNK_ELEMENTS, n_tokens * n_local) * 4)


# ---------------------------------------------------------------------------- chunked dense reference


def dense_chunk_rows(n_local: int) -> int:
    """Tokens per chunk of the dense reference: a [rows, n_local] temporary holds about
    fastsae.ops.checks.CHUNK_ELEMENTS values (read at call time, so tests can shrink it)."""
    return max(1, checks.CHUNK_ELEMENTS // max(1, n_local))


def dense_reference_pass(sae, x: torch.Tensor, kind, p: float,
                         per_token: Callable | None = None) -> PassSums:
    """kind.dense_forward over x [N, d_in], a chunk of dense_chunk_rows(n_local) tokens at a time.

    Each chunk runs under torch.utils.checkpoint: forward keeps only the chunk's input and its
    per-token outputs, backward recomputes the chunk's pre-activations and code, so the peak is one
    chunk's [rows, n_local] tensors (and their gradients), never [N, n_local]. dense_forward must
    treat tokens independently (a batch selection such as BatchTopK's cannot be chunked: such a
    kind overrides training_forward) and be deterministic (the recomputation must repeat it).
    per_token(pre, code, x_chunk) -> {name: [rows] tensor}: further per-token sums the kind's loss
    terms need (a gated SAE's gate L1 and auxiliary reconstruction, say), differentiable.
    Sharded: each shard runs its latents' block; the partial reconstructions and the per-token sums
    are summed over shards outside the recomputed chunks (collectives never run twice).
    """
    x_in = sae.encoder_input(x)
    training = sae.training

    def chunk_pass(x_chunk):
        pre = x_chunk @ sae.W_enc + sae.b_enc
        code, l0 = kind.dense_forward(pre, sae, training)
        partial = code.to(sae.W_dec.dtype) @ sae.normalised_decoder() + sae.partial_bias()
        extra = per_token(pre, code, x_chunk) if per_token is not None else {}
        return partial, power_sum(code, p), l0, (code.detach() > 0).sum(0, dtype=torch.int32), extra

    pieces = [checkpoint(chunk_pass, x_chunk, use_reentrant=False) if torch.is_grad_enabled() else chunk_pass(x_chunk)
              for x_chunk in x_in.split(dense_chunk_rows(sae.n_local))]
    if not pieces:  # no tokens
        pieces = [chunk_pass(x_in)]
    partial, lp_sum, l0 = (torch.cat([piece[i] for piece in pieces]) for i in range(3))
    counts = torch.stack([piece[3] for piece in pieces]).sum(0, dtype=torch.int32)
    extra = {name: sae.sum_over_latents(torch.cat([piece[4][name] for piece in pieces])) for name in pieces[0][4]}
    return PassSums(sae.finish_reconstruction(partial), sae.sum_over_latents(lp_sum), sae.sum_over_latents(l0),
                    counts, extra)


def dense_reference_memory(n_tokens: int, n_local: int, d_out: int, itemsize: int) -> ActivationMemory:
    """Per chunk, in backward: the recomputed pre-activations and code and their gradients (four
    [rows, n_local] tensors of at least 4 bytes); kept between passes: per token the reconstruction
    partial (d_out wide: the width the SAE writes) and the sums."""
    rows = min(n_tokens, dense_chunk_rows(n_local))
    return ActivationMemory(n_tokens * (d_out * itemsize + 16), 4 * rows * n_local * max(4, itemsize))


# ---------------------------------------------------------------------------- analysis


@torch.no_grad()
def sparse_from_dense(encode_chunk: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                      n_latents: int) -> SparseCode:
    """The active latents of each token of x [N, d_in] as a padded SparseCode [N, width], from a
    dense encoder applied chunk by chunk: width = the largest number of active latents of any
    token, entries in latent order, padding value 0 at index 0. A running count per row places each
    entry (linear in the chunk), so no [N, n_latents] tensor is built."""
    step = max(1, checks.CHUNK_ELEMENTS // max(1, n_latents))
    rows, slots, ids, kept = [], [], [], []
    for start in range(0, x.shape[0], step):
        acts = encode_chunk(x[start:start + step])
        active = acts > 0
        slot = active.cumsum(-1, dtype=torch.int32) - 1  # each active entry's place in its row
        row, col = active.nonzero(as_tuple=True)
        rows.append(row + start)
        slots.append(slot[row, col].long())
        ids.append(col)
        kept.append(acts[row, col])
    rows, slots, ids, kept = (torch.cat(t) for t in (rows, slots, ids, kept))
    width = int(slots.max()) + 1 if slots.numel() else 1
    values = x.new_zeros(x.shape[0], width)
    indices = torch.zeros(x.shape[0], width, dtype=torch.int64, device=x.device)
    values[rows, slots] = kept
    indices[rows, slots] = ids
    return SparseCode(values, indices)
