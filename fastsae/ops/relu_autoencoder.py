"""relu_autoencode: a ReLU or JumpReLU SAE from input to reconstruction, with the code's Lp sum and
L0, and no [N, n_latents] tensor at any density.

    pre  = x @ W_enc + b_enc
    code = relu(pre)                          (threshold None)
         = relu(pre) * (pre > threshold)      (JumpReLU; threshold [n] > 0)
    reconstruction = code @ W_dec + b_dec,  lp_sum = sum_j |code_j|^p,  l0 = #(code_j > 0),
    fire_counts = the tokens each latent is active on.

x is [N, d_in] and the reconstruction [N, d_out]: d_out = d_in for an SAE; a transcoder reads one
activation (an MLP's input) and writes another (its output), so its W_dec [n, d_out] and b_dec
[d_out] may be of another width.

The module is longer than most: the op, its reference (the spec, in forward and backward) and
plan's memory model of both paths belong together.

The code itself is never returned: a training step needs only these four, and a ReLU SAE's code
is an [N, n] tensor that is dense at initialisation and 99.9 % zeros later. (E2ESAE.encode still
builds a dense code for a user who asks, with relu_encode.)

Gradients: all of them, with JumpReLU's straight-through estimator as Rajamanoharan et al. 2024
and SAELens train it (rect(u) = 1 for -1/2 < u < 1/2, bandwidth eps):
    d code / d pre = H(pre - theta)         d code / d theta = -(theta / eps) rect((pre - theta) / eps)
    d l0 / d pre = 0                        d l0 / d theta = -(1 / eps) rect((pre - theta) / eps)
A ReLU's l0 has no gradient. The derivative of the code passes where not (pre <= threshold), as
torch.relu's backward (a NaN pre-activation passes its gradient); d |c|^p / d c = p |c|^(p-1) for
c > 0 and 0 at 0, as torch.linalg.vector_norm's backward.

The caller forms the loss terms: the Lp norm is lp_sum ** (1 / p) (a sharded SAE sums lp_sum over
its shards first), the paper's sparsity term its mean over tokens / d_in; decoder_norm="forward"
passes W_dec already scaled (W_dec * scale[:, None]).

The reference below is the spec and the CPU path. Its forward walks the tokens in chunks of
chunk_rows(4 * n_latents) on single-threaded workers (fastsae/ops/_workers.py: cache-sized chunks
whose elementwise ops never wait at an OpenMP barrier) and keeps each token's code in one of two
forms, as the Triton kernels do (kernels/relu_autoencoder.py): a sparse row (at most
reference_capacity(n) held entries: active, and for JumpReLU inside the threshold's band, whose
entries the threshold's gradient needs) as a list of (token, latent, value) entries, decoded and
differentiated entry by entry; a dense row (more entries, or a NaN) by one product, its code kept
for backward among the first kept_code_elements() / n tokens and recomputed from x beyond them.
A fresh SAE's dense step then costs the dense path's five GEMMs at CPU sizes (not six), and its
memory stays bounded at any size. Peak memory: the kept code, the chunk temporaries, the entry
list (at most N * reference_capacity(n)) and parameter-sized gradient accumulators.
memory_estimate() is fastsae plan's model of both paths.

Non-finite inputs: a NaN pre-activation makes its row dense, where the products spread it as the
dense form's do (that token's reconstruction, lp_sum and grad_x; every latent's weight gradients).
The sparse rows form products over their held entries only: 0 * inf with an inf decoder weight
of an inactive latent is not formed, as in any sparse decoder.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastsae.ops._backend import call_kernel, missing_triton, use_triton
from fastsae.ops import _workers, checks
from fastsae.ops.checks import check_same, check_shape, check_tensor, chunk_rows, encoder_operands
from fastsae.ops._sparse import accumulation_dtype

try:  # the Triton kernels: triton is optional, without it the reference runs everywhere
    from fastsae.kernels import relu_autoencoder as kernels
except ImportError as error:
    kernels = missing_triton(error)


class ReLUAutoencodeOutput(NamedTuple):
    """What relu_autoencode returns (leading dimensions [...] are x's)."""

    reconstruction: torch.Tensor  # [..., d_out] in W_dec's dtype
    lp_sum: torch.Tensor  # [...] fp32 (fp64 for fp64 inputs): sum_j |code_j|^p, differentiable
    l0: torch.Tensor  # [...] same dtype: active latents; differentiable in the threshold (JumpReLU)
    fire_counts: torch.Tensor  # [n_latents] int32: the tokens on which each latent is active


# A row is kept as entries when it holds at most this many (the kernels' rule, with their
# capacity kernels.relu_encoder.sparse_capacity); a denser one is recomputed in backward.
REFERENCE_CAPACITY_FRACTION = 1 / 256
REFERENCE_MIN_CAPACITY = 64


def reference_capacity(n_latents: int) -> int:
    return max(1, min(n_latents, max(REFERENCE_MIN_CAPACITY, int(n_latents * REFERENCE_CAPACITY_FRACTION))))


# The kernels' dense-row workspaces ([N, W], two in backward) hold at most this many elements
# each: 4 x CHUNK_ELEMENTS (2^26 by default), read at call time so tests can shrink it.
WORKSPACE_CHUNKS = 4


def workspace_elements() -> int:
    return WORKSPACE_CHUNKS * checks.CHUNK_ELEMENTS


# The reference keeps the dense rows' code from forward to backward up to this many chunks'
# worth of values (2^25, 128 MiB in fp32, by default), and recomputes the rest: half the kernels'
# workspace, so that a ReLU step's peak stays near a TopK step's (measured at 262,144 latents:
# README) while the sizes CPU runs use recompute nothing.
KEPT_CODE_CHUNKS = 2


def kept_code_elements() -> int:
    return KEPT_CODE_CHUNKS * checks.CHUNK_ELEMENTS


def _code_(pre: torch.Tensor, theta: torch.Tensor | None) -> torch.Tensor:
    """The code, written over pre: relu(pre), or relu(pre) * (pre > theta). NaN stays NaN."""
    if theta is None:
        return pre.relu_()
    above = pre > theta
    return pre.relu_().mul_(above)


def _in_band(pre: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """rect((pre - theta) / bandwidth) as a bool, as SAELens evaluates it (in at least fp32)."""
    acc = accumulation_dtype(pre.dtype)
    u = (pre.to(acc) - theta.to(acc)).div_(bandwidth)
    return (u > -0.5) & (u < 0.5)


def _abs_pow(v: torch.Tensor, p: float) -> torch.Tensor:
    return v.abs() if p == 1 else v.abs().pow(p)


def _add_lp_grad_(grad_code: torch.Tensor, code: torch.Tensor, grad_lp: torch.Tensor, p: float) -> torch.Tensor:
    """grad_code += grad_lp[:, None] * d|code|^p / d code, in place: p code^(p-1) where code > 0,
    0 at 0, NaN where code is NaN (code >= 0 or NaN; grad_lp [rows])."""
    if p == 1:
        grad_code.add_(torch.where(code > 0, grad_lp[:, None], 0))
    else:
        positive = code > 0
        grad_code.add_(torch.where(positive, code, 1).pow_(p - 1).mul_(p * grad_lp[:, None]).masked_fill_(~positive, 0))
    return grad_code.masked_fill_(code.isnan(), float("nan"))


class _Entries(NamedTuple):
    """The sparse rows' code as a list of entries (global token, latent, value, in the band)."""

    tokens: torch.Tensor  # int64 [E]
    latents: torch.Tensor  # int64 [E]
    values: torch.Tensor  # [E] x's dtype (0 for an entry held only for the threshold's band)
    band: torch.Tensor | None  # bool [E] (JumpReLU)


# The reference's forward chunks: [rows, n] temporaries of a quarter CHUNK_ELEMENTS (16 MiB in
# fp32), cache-sized, on single-threaded workers (fastsae/ops/_workers.py): a chunk's dozen
# elementwise ops never wait at a barrier, so a shared CPU cannot stall them (GUIDE section 3).
def _rows_per_chunk(width: int) -> int:
    return chunk_rows(4 * width)


def _entry_steps(n_entries: int, width: int):
    """Slices of the entry list whose [entries, width] temporaries (up to eight alive at once in
    backward: gathered rows and their products) stay within the chunk budget together; width: the
    wider of d_in and d_out."""
    step = chunk_rows(8 * width)
    return (slice(start, start + step) for start in range(0, n_entries, step))


class _Chunk(NamedTuple):
    """What a forward chunk leaves for the rest of the call."""

    entries: _Entries | None  # its sparse rows' held entries (global token ids)
    fired: torch.Tensor  # int32 [n]: tokens each latent is active on, in this chunk
    dense: torch.Tensor  # int64: its dense rows (global token ids)


class _ReferenceForward:
    """The reference's forward, chunk by chunk on workers (fastsae/ops/_workers.py). Each chunk
    writes its own rows of the outputs; the dense rows among the first kept_rows tokens keep their
    code (and JumpReLU band) in `kept_code` for backward, the later ones are recomputed there.

    A row is sparse when it holds at most reference_capacity(n) entries (active, and for JumpReLU
    inside the threshold's band) and no NaN: its entries are listed and decoded one by one. A dense
    row is decoded by one product."""

    def __init__(self, x, W_enc, b_enc, W_dec, b_dec, theta, bandwidth, p):
        self.x, self.W_enc, self.b_enc, self.W_dec, self.b_dec = x, W_enc, b_enc, W_dec, b_dec
        self.theta, self.bandwidth, self.p = theta, bandwidth, p
        n_tokens = x.shape[0]
        n_latents, d_out = W_dec.shape
        self.acc = accumulation_dtype(x.dtype)
        self.capacity = reference_capacity(n_latents)
        self.reconstruction = torch.empty(n_tokens, d_out, dtype=W_dec.dtype, device=x.device)
        self.lp_sum = torch.empty(n_tokens, dtype=self.acc, device=x.device)
        self.l0 = torch.empty(n_tokens, dtype=self.acc, device=x.device)
        rows = min(_rows_per_chunk(n_latents), max(1, n_tokens))
        self.chunks = _workers.chunk_bounds(n_tokens, rows)
        # Whole chunks only, so that no chunk straddles the kept rows' end.
        self.kept_rows = min(n_tokens, kept_code_elements() // n_latents // rows * rows)
        self.kept_code = torch.empty(self.kept_rows, n_latents, dtype=x.dtype, device=x.device)
        self.kept_band = (None if theta is None else
                          torch.empty(self.kept_rows, n_latents, dtype=torch.bool, device=x.device))
        # [rows, n] buffers for the code and the counts' scratch, one pair per worker
        self.buffers = _workers.BufferPool(lambda: tuple(torch.empty(rows, n_latents, dtype=x.dtype, device=x.device)
                                                         for _ in range(2)))

    def run(self) -> tuple[list[_Chunk], torch.Tensor]:
        chunks = _workers.map_chunks(self._chunk, len(self.chunks), self.x.device)
        fire_counts = torch.zeros(self.W_enc.shape[1], dtype=torch.int32, device=self.x.device)
        for chunk in chunks:
            fire_counts += chunk.fired
        return chunks, fire_counts

    def _chunk(self, index: int) -> _Chunk:
        with self.buffers.borrow() as buffers:
            return self._chunk_with(*self.chunks[index], *buffers)

    def _chunk_with(self, start: int, end: int, code_buf: torch.Tensor, scratch: torch.Tensor) -> _Chunk:
        theta, acc = self.theta, self.acc
        code = torch.addmm(self.b_enc, self.x[start:end], self.W_enc, out=code_buf[: end - start])
        band = None if theta is None else _in_band(code, theta, self.bandwidth)
        code = _code_(code, theta)
        row_sums = code.sum(1, dtype=acc)  # code >= 0: a NaN row sums to NaN; lp_sum at p = 1
        nan_rows = row_sums.isnan()
        if theta is None:
            # Counts from sign(code) (1 active, 0 inactive or NaN): float ops, vectorised; the
            # bool masks and their int reductions cost 5 to 8 times as much on the CPU build.
            counts, fired = _active_counts(code, scratch[: end - start])
            held = None
        else:
            held = code > 0  # active; NaN is not, but makes its row dense below
            counts = held.sum(1, dtype=torch.int32)  # (count_nonzero copies to int64: 7x slower)
            fired = held.sum(0, dtype=torch.int32)
        self.l0[start:end] = counts
        if band is not None:
            held |= band
            counts = held.sum(1, dtype=torch.int32)
        dense = (counts > self.capacity) | nan_rows
        sparse_rows = (~dense).nonzero().squeeze(1)
        entries = None
        if sparse_rows.numel():
            # held: active (or in the band); without a band, the nonzero entries of the finite rows
            support = code if held is None else held
            rows, latents = (support if sparse_rows.numel() == code.shape[0] else support[sparse_rows]).nonzero(
                as_tuple=True)
            rows = sparse_rows[rows]
            values = code[rows, latents]
            entries = _Entries(rows + start, latents, values, None if band is None else band[rows, latents])
            _decode_entries(self.reconstruction, self.lp_sum, sparse_rows, rows, latents, values, start, self.W_dec,
                            self.b_dec, self.p)
        del held
        # The dense rows: one product; their code is copied to kept_code (whose pages a sparse
        # code never touches), or recomputed in backward past the kept rows.
        dense_ids = dense.nonzero().squeeze(1)
        if dense_ids.numel():
            all_dense = dense_ids.numel() == code.shape[0]
            dense_code = code if all_dense else code[dense_ids]
            self.reconstruction[dense_ids + start] = torch.addmm(self.b_dec, dense_code, self.W_dec)
            # code >= 0 (or NaN): |code|^1 is the code itself
            self.lp_sum[dense_ids + start] = (row_sums[dense_ids] if self.p == 1 else
                                              _abs_pow(dense_code.to(acc), self.p).sum(1))
            if end <= self.kept_rows:
                if all_dense:
                    self.kept_code[start:end].copy_(code)
                else:
                    self.kept_code[dense_ids + start] = dense_code
                if band is not None:
                    self.kept_band[dense_ids + start] = band if all_dense else band[dense_ids]
        return _Chunk(entries, fired, dense_ids + start)


class ReLUAutoencodeReference(torch.autograd.Function):
    """The reference. Dense rows keep their code from forward to backward in the first
    kept_code_elements() / n tokens; the rest are recomputed from x in backward. At CPU sizes
    (N * n <= 2^25: N = 1,024 up to 32,768 latents) nothing is recomputed, and a fresh SAE's step
    costs the dense path's five GEMMs, not six."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, W_dec, b_dec, theta, bandwidth, p):
        state = _ReferenceForward(x, W_enc, b_enc, W_dec, b_dec, theta, bandwidth, p)
        chunks, fire_counts = state.run()
        long = torch.zeros(0, dtype=torch.int64, device=x.device)
        parts = [chunk.entries for chunk in chunks if chunk.entries is not None]
        entries = _Entries(torch.cat([e.tokens for e in parts]) if parts else long,
                           torch.cat([e.latents for e in parts]) if parts else long,
                           torch.cat([e.values for e in parts]) if parts else x.new_zeros(0),
                           None if theta is None else
                           torch.cat([e.band for e in parts]) if parts else long.bool())
        dense = torch.cat([chunk.dense for chunk in chunks]) if chunks else long
        kept_dense = dense[dense < state.kept_rows]
        recomputed = dense[dense >= state.kept_rows]
        ctx.save_for_backward(x, W_enc, b_enc, W_dec, theta, recomputed, kept_dense, state.kept_code, state.kept_band,
                              *entries[:3], *(() if entries.band is None else (entries.band,)))
        ctx.bandwidth, ctx.p = bandwidth, p
        ctx.mark_non_differentiable(fire_counts)
        if theta is None:
            ctx.mark_non_differentiable(state.l0)
        return state.reconstruction, state.lp_sum, state.l0, fire_counts

    @staticmethod
    def backward(ctx, grad_recon, grad_lp, grad_l0, _grad_fire_counts):
        (x, W_enc, b_enc, W_dec, theta, recomputed, kept_dense, kept_code, kept_band, tokens, latents, values,
         *band) = ctx.saved_tensors
        jump = theta is not None
        band = band[0] if band else None
        bandwidth, p = ctx.bandwidth, ctx.p
        n_tokens, d_in = x.shape
        n_latents, d_out = W_dec.shape
        acc = accumulation_dtype(x.dtype)
        device = x.device
        grads = _Grads(g=grad_recon.to(acc), grad_lp=grad_lp.to(acc), grad_l0=grad_l0.to(acc) if jump else None,
                       grad_x=torch.zeros(n_tokens, d_in, dtype=acc, device=device),
                       grad_w_enc_t=torch.zeros(n_latents, d_in, dtype=acc, device=device),
                       grad_b_enc=torch.zeros(n_latents, dtype=acc, device=device),
                       grad_w_dec=torch.zeros(n_latents, d_out, dtype=acc, device=device),
                       grad_theta=torch.zeros(n_latents, dtype=acc, device=device) if jump else None)
        W_enc_t = W_enc.t()  # [n, d]: each latent's encoder weights as a row
        g = grads.g

        # Sparse rows: the code's gradient at the held entries only.
        for part in _entry_steps(values.numel(), max(d_in, d_out)):
            t, l = tokens[part], latents[part]
            v = values[part].to(acc)
            g_rows = g[t]
            grad_code = (g_rows * W_dec[l].to(acc)).sum(1)
            _add_lp_grad_(grad_code[:, None], v[:, None], grads.grad_lp[t], p)
            grad_pre = torch.where(v > 0, grad_code, 0).to(x.dtype).to(acc)  # in x's dtype, as the kernel
            grads.grad_x.index_add_(0, t, grad_pre[:, None] * W_enc_t[l].to(acc))
            grads.grad_w_enc_t.index_add_(0, l, grad_pre[:, None] * x[t].to(acc))
            grads.grad_b_enc.index_add_(0, l, grad_pre)
            grads.grad_w_dec.index_add_(0, l, v[:, None] * g_rows)
            if jump:
                term = -(theta[l].to(acc) / bandwidth) * grad_code - grads.grad_l0[t] / bandwidth
                grads.grad_theta.index_add_(0, l, torch.where(band[part], term, 0))
            del g_rows

        # Dense rows, [step, n] blocks on workers: the kept code (in place when it is every row from
        # the first on, as at initialisation; else gathered), or the code recomputed from x. Each
        # block writes its rows of grad_x; the weight gradients add up in block order.
        W_dec_t = W_dec.t().to(acc)
        step = chunk_rows(n_latents)  # [step, n] temporaries: CHUNK_ELEMENTS each
        in_place = kept_dense.numel() and int(kept_dense[-1]) == kept_dense.numel() - 1  # rows 0, 1, ...
        blocks = [(True, i) for i in range(0, kept_dense.numel(), step)]
        blocks += [(False, i) for i in range(0, recomputed.numel(), step)]

        def block_code(kept: bool, i: int):
            if kept:
                rows = kept_dense[i:i + step]
                where = slice(i, i + step) if in_place else rows
                return rows, kept_code[where].to(acc), None if not jump else kept_band[where]
            rows = recomputed[i:i + step]
            code = torch.addmm(b_enc, x[rows], W_enc)
            band_rows = None if not jump else _in_band(code, theta, bandwidth)
            return rows, _code_(code, theta).to(acc), band_rows

        def compute(index: int) -> _DenseBlockGrads:
            rows, code, band_rows = block_code(*blocks[index])
            return _dense_block_grads(grads, rows, code, band_rows, x, W_enc_t, W_dec_t, theta, bandwidth, p)

        order = _workers.InOrder()
        _workers.map_chunks(lambda index: order.run(index, lambda: compute(index),
                                                    lambda block: _accumulate_dense_block(grads, block)),
                            len(blocks), device)
        return (grads.grad_x.to(x.dtype), grads.grad_w_enc_t.t().to(W_enc.dtype), grads.grad_b_enc.to(b_enc.dtype),
                grads.grad_w_dec.to(W_dec.dtype), g.sum(0).to(W_dec.dtype),
                None if theta is None else grads.grad_theta.to(theta.dtype), None, None)


def _active_counts(code: torch.Tensor, scratch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(active latents per row, tokens per latent (int32)) of a ReLU code (>= 0 or NaN). The counts are sums of sign(code), exact in fp32 below 2^24 (torch's
    sign(NaN) is 0, and NaN is not active)."""
    active = torch.sign(code, out=scratch)
    return active.sum(1), active.sum(0).to(torch.int32)


def _decode_entries(reconstruction, lp_sum, sparse_rows, rows, latents, values, start, W_dec, b_dec, p) -> None:
    """The sparse rows of a forward chunk, decoded entry by entry into their rows."""
    acc = accumulation_dtype(values.dtype)
    out = torch.zeros(sparse_rows.numel(), W_dec.shape[1], dtype=acc, device=W_dec.device)
    lp = torch.zeros(sparse_rows.numel(), dtype=acc, device=W_dec.device)
    local = torch.searchsorted(sparse_rows, rows)
    for part in _entry_steps(values.numel(), W_dec.shape[1]):
        v = values[part].to(acc)
        out.index_add_(0, local[part], v[:, None] * W_dec[latents[part]].to(acc))
        lp.index_add_(0, local[part], _abs_pow(v, p))
    reconstruction[sparse_rows + start] = (out + b_dec.to(acc)).to(W_dec.dtype)
    lp_sum[sparse_rows + start] = lp


class _Grads(NamedTuple):
    """Backward's incoming gradients (accumulation dtype) and the accumulators it fills."""

    g: torch.Tensor  # [N, d_out] the reconstruction's gradient
    grad_lp: torch.Tensor
    grad_l0: torch.Tensor | None
    grad_x: torch.Tensor
    grad_w_enc_t: torch.Tensor
    grad_b_enc: torch.Tensor
    grad_w_dec: torch.Tensor
    grad_theta: torch.Tensor | None


class _DenseBlockGrads(NamedTuple):
    """What a dense block adds to the shared weight gradients (the accumulation dtype)."""

    grad_pre: torch.Tensor  # [rows, n]
    x_rows: torch.Tensor  # [rows, d_in]
    code: torch.Tensor  # [rows, n]
    g_rows: torch.Tensor  # [rows, d_out]
    theta_term: torch.Tensor | None  # [n] (JumpReLU)


def _dense_block_grads(grads: _Grads, rows, code, band, x, W_enc_t, W_dec_t, theta, bandwidth, p) -> _DenseBlockGrads:
    """A block of dense rows from their code (accumulation dtype) and band (JumpReLU): writes its
    rows of grad_x and returns what it adds to the weight gradients. The code's gradient passes to
    the pre-activation where code > 0 (pre > threshold) or NaN, as torch.relu's backward:
    aten.threshold_backward, one vectorised pass in place."""
    acc = code.dtype
    all_rows = rows.numel() == x.shape[0]  # the whole batch in order: no gathers
    g_rows = grads.g if all_rows else grads.g[rows]
    x_rows = x if all_rows else x[rows]
    grad_code = g_rows @ W_dec_t
    if theta is None and p == 1 and not bool(code.sum().isnan()):
        # d|c|/dc is 1 exactly where the gradient passes (c > 0): one in-place pass, masked below
        grad_code.add_(grads.grad_lp[rows, None])
    else:
        _add_lp_grad_(grad_code, code, grads.grad_lp[rows], p)
    theta_term = None
    if theta is not None:
        term = (-(theta.to(acc) / bandwidth) * grad_code).sub_(grads.grad_l0[rows, None] / bandwidth)
        theta_term = term.masked_fill_(~band, 0).sum(0)
        del term
    grad_pre = torch.ops.aten.threshold_backward.grad_input(grad_code, code, 0, grad_input=grad_code)
    grad_pre = grad_pre.to(x.dtype).to(acc)  # in x's dtype, as the kernel
    if all_rows:
        torch.mm(grad_pre, W_enc_t.to(acc), out=grads.grad_x)
    else:
        grads.grad_x[rows] = grad_pre @ W_enc_t.to(acc)
    return _DenseBlockGrads(grad_pre, x_rows.to(acc), code, g_rows, theta_term)


def _accumulate_dense_block(grads: _Grads, block: _DenseBlockGrads) -> None:
    grads.grad_w_enc_t.addmm_(block.grad_pre.t(), block.x_rows)
    grads.grad_b_enc.add_(block.grad_pre.sum(0))
    grads.grad_w_dec.addmm_(block.code.t(), block.g_rows)
    if block.theta_term is not None:
        grads.grad_theta.add_(block.theta_term)


class MemoryEstimate(NamedTuple):
    """Bytes one relu_autoencode call holds at its peak beyond the weights and their gradients."""

    code: int  # the code kept from forward to backward, and its per-entry backward temporaries
    workspaces: int  # the dense rows' workspaces (kernels) or the chunk temporaries (reference)


# Per slot of the kernels' compact code (C = kernels.relu_encoder.sparse_capacity(n) slots per
# token, within 16 of reference_capacity): value (s bytes) and int32 id kept from forward to
# backward; in backward the fp32 sampled dots, code and code gradient, a mask, the pre-activation
# gradient (s), the sort by latent (int64 order, three int32 token lists, int32 latents) and two
# sorted weight lists (s each). JumpReLU adds a band flag, the threshold's fp32 terms and their
# sorted copy.
_SLOT_BYTES = 4 + 4 + 4 + 4 + 1 + 8 + 12 + 4
_SLOT_BYTES_JUMP = 1 + 4 + 4 + 4
# The reference's peak besides the kept code: in forward, each worker's two [rows, n] buffers (a
# quarter CHUNK_ELEMENTS each: the chunk's code and the counts' scratch); in backward, each
# worker's dense block's [rows, n] temporaries of CHUNK_ELEMENTS each: the code's gradient
# (JumpReLU: and its Lp term and threshold terms), a fp16 / bf16 code's fp32 copy.
_FORWARD_BUFFERS_PER_WORKER = 2
def memory_estimate(n_tokens: int, n_latents: int, d_in: int, itemsize: int, *, jump: bool = False,
                    d_out: int | None = None) -> MemoryEstimate:
    """What one call holds at its peak (forward and backward), the larger of the Triton path's and
    the reference's, for N = n_tokens: fastsae plan's model of a ReLU / JumpReLU SAE's memory.
    None of it is an [N, n_latents] tensor: the code costs O(N * n / 256), the workspaces a fixed
    budget (4 x CHUNK_ELEMENTS each in the kernels), whatever the density. d_out: the decoder's
    width (a transcoder's), d_in by default."""
    d_out = d_in if d_out is None else d_out
    capacity = reference_capacity(n_latents) + 16
    per_slot = (3 * itemsize + 4 + _SLOT_BYTES + (_SLOT_BYTES_JUMP if jump else 0))
    kernel_code = n_tokens * capacity * per_slot + 13 * n_tokens
    # The reference's entries: token and latent (int64), value, band flag.
    reference_code = n_tokens * reference_capacity(n_latents) * (16 + itemsize + (1 if jump else 0))
    aligned = -(-n_latents // 128) * 128
    width = min(aligned, max(128, workspace_elements() // max(1, n_tokens) // 128 * 128))
    several = width < n_latents  # fp32 sums across the chunks: forward's [N, d_out], backward's [N, d_in]
    # forward: the code's workspace and the reconstruction's sum; backward: the pre-activations'
    # gradient, the code (JumpReLU: the threshold terms) and grad_x's sum
    kernel_forward = n_tokens * width * itemsize + (4 * n_tokens * d_out if several else 0)
    kernel_backward = n_tokens * width * (2 * itemsize + (4 if jump else 0)) + (4 * n_tokens * d_in if several else 0)
    kernel_ws = max(kernel_forward, kernel_backward)
    workers = max(1, torch.get_num_threads())
    forward = workers * _FORWARD_BUFFERS_PER_WORKER * min(_rows_per_chunk(n_latents), n_tokens) * n_latents * itemsize
    live = 1 + (2 if jump else 0) + (1 if itemsize < 4 else 0)
    blocks_at_once = min(workers, max(1, -(-n_tokens // chunk_rows(n_latents))))  # a block per worker
    backward = blocks_at_once * live * min(chunk_rows(n_latents), n_tokens) * n_latents * max(4, itemsize)
    kept = min(n_tokens, kept_code_elements() // n_latents) * n_latents * (itemsize + (1 if jump else 0))
    reference_ws = kept + max(forward, backward) + max(4, itemsize) * n_tokens * d_in  # + the fp32 grad_x
    return MemoryEstimate(max(kernel_code, reference_code), max(kernel_ws, reference_ws))


def _check_positive(name: str, value, *, required: bool) -> float | None:
    if value is None:
        if required:
            raise ValueError(f"{name} is required with a threshold (JumpReLU): the width of the straight-through "
                             "estimator's rectangle, e.g. 0.001 as SAELens")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def relu_autoencode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor,
                    b_dec: torch.Tensor, *, threshold: torch.Tensor | None = None, bandwidth: float | None = None,
                    p: float = 1.0, backend: str | None = None) -> ReLUAutoencodeOutput:
    """A ReLU (or, with ``threshold``, JumpReLU) SAE's reconstruction and code statistics.

    x: [..., d_in]; W_enc: [d_in, n_latents] (E2ESAE's latent-major storage, W_enc.T contiguous, is
    the fast layout; another is copied to it once per call on the Triton path); b_enc: [n_latents];
    W_dec: [n_latents, d_out] (already scaled for decoder_norm="forward"); b_dec: [d_out]; all one
    dtype. d_out = d_in for an SAE; a transcoder's may differ. threshold: [n_latents] >= 0 (JumpReLU; pass exp(log_threshold) so that its gradient
    reaches log_threshold), bandwidth: the estimator's width (required with a threshold that
    requires grad; a fixed threshold may omit it). p > 0: the exponent of lp_sum.

    Returns ReLUAutoencodeOutput(reconstruction [..., d_out], lp_sum [...], l0 [...], fire_counts [n]).
    Differentiable with respect to x, W_enc, b_enc, W_dec, b_dec and threshold.
    """
    check_tensor("x", x, min_ndim=1, float_dtype=True)
    check_tensor("W_enc", W_enc, ndim=2, float_dtype=True)
    check_tensor("b_enc", b_enc, ndim=1, float_dtype=True)
    check_tensor("W_dec", W_dec, ndim=2, float_dtype=True)
    check_tensor("b_dec", b_dec, ndim=1, float_dtype=True)
    d_in, n_latents = W_enc.shape
    if n_latents == 0:
        raise ValueError("W_enc must have at least one latent (shape [d_in, n_latents]), got n_latents=0")
    if x.shape[-1] != d_in:
        raise ValueError(f"x must have last dimension d_in={d_in} (W_enc is {tuple(W_enc.shape)}), "
                         f"got shape {tuple(x.shape)}")
    check_shape("b_enc", b_enc, (n_latents,), "n_latents")
    check_shape("W_dec", W_dec, (n_latents, None), "[n_latents, d_out]: a row per latent of W_enc [d_in, n_latents]")
    d_out = W_dec.shape[1]
    check_shape("b_dec", b_dec, (d_out,), "d_out, W_dec's columns")
    if threshold is not None:
        check_tensor("threshold", threshold, ndim=1, float_dtype=True)
        check_shape("threshold", threshold, (n_latents,), "n_latents")
        # The range check reads the tensor back: only on CPU (on CUDA it would stall the stream).
        if threshold.device.type == "cpu" and threshold.numel() and not bool((threshold >= 0).all()):
            raise ValueError("threshold must be >= 0 everywhere (pass exp(log_threshold)), got "
                             f"min {float(threshold.min())}")
    trained_threshold = threshold is not None and threshold.requires_grad
    bandwidth = _check_positive("bandwidth", bandwidth, required=trained_threshold)
    if threshold is not None and bandwidth is None:
        # A fixed threshold (BatchTopK's inference one) needs no estimator: bandwidth 0 makes the
        # band (|pre - theta| < bandwidth / 2) empty, so no entry is held for it.
        bandwidth = 0.0
    p = _check_positive("p", p, required=True)
    check_same("x", x, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, threshold=threshold)
    leading = x.shape[:-1]
    x2d = x.reshape(-1, d_in)
    tensors = [t for t in (x2d, W_enc, b_enc, W_dec, b_dec, threshold) if t is not None]
    if use_triton("relu_autoencode", kernels, *tensors, backend=backend) and x2d.shape[0] > 0:
        # The kernels read W_enc latent-major and W_dec row-major: other layouts are copied once.
        out = call_kernel(kernels.relu_autoencode_triton, *encoder_operands(x2d, W_enc), b_enc.contiguous(),
                          W_dec.contiguous(), b_dec.contiguous(),
                          None if threshold is None else threshold.contiguous(), bandwidth, p, workspace_elements())
    else:
        out = ReLUAutoencodeReference.apply(x2d, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, p)
    reconstruction, lp_sum, l0, fire_counts = out
    return ReLUAutoencodeOutput(reconstruction.reshape(*leading, d_out), lp_sum.reshape(leading),
                                l0.reshape(leading), fire_counts)
