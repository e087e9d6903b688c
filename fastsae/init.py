"""The inits of an SAE's parameters, by name (E2ESAE's ``init``; see its docstring).

draw_init draws the fp32 parameters from torch's RNG, for the whole SAE or for a block of its
latents (a shard), streaming the whole draw so that a block never needs the whole dictionary.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fastsae.spec import SAESpec

# Latents per chunk when a block of an init is drawn (draw_init with rows=): the whole draw streams
# through memory this many rows at a time (64 MiB of fp32 at d_in = 2,048).
INIT_CHUNK_ROWS = 8192


@torch.no_grad()
def draw_init(spec: SAESpec, *, rows: range | None = None, device=None, out=None,
              chunk_rows: int = INIT_CHUNK_ROWS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fp32 parameters the init of ``spec`` draws from torch's RNG: (W_enc [d_in, n], b_enc [n],
    W_dec [n, d_out], b_dec [d_out]) for the latents in ``rows`` (all of them by default; n = len(rows)).
    (spec.init, spec.decoder_norm and spec.init_encoder_as_decoder_transpose decide the draw; d_out
    = d_in for an SAE. A transcoder's "topk" init, whose decoder cannot be the encoder's
    transpose when d_out != d_in, draws its decoder rows as the encoder's are drawn, [n, d_out],
    unit norm; its skip path, W_skip, starts at zero, as sparsify's and circuit-tracer's.)

    A block (``rows`` given, on the CPU) makes the whole SAE's draws in the same order and keeps
    only its latents, streaming the draws ``chunk_rows`` latents at a time, so a process of a
    sharded run never holds the whole dictionary, and the RNG ends where the whole init leaves it.
    The block is exactly the whole init's rows, except the orthogonal decoder of the "paper" and
    "orthogonal" inits: nn.init.orthogonal_ is the Q of a QR of the whole [n_latents, d_in]
    Gaussian draw A, which a block gets as its rows of A R^-1 with R the Cholesky factor of A^T A
    (accumulated in float64): the same matrix to fp32 rounding.

    The draws run on ``device`` (whose RNG they use); the results are kept on ``out`` (default:
    ``device``), so a block drawn on the CPU for a GPU never sits whole in host memory either.

    Long because it is one sequence of RNG draws whose order defines the init (a block replays the
    whole init's order): kept in one function, that order reads top to bottom.
    """
    init, d_in, d_out, n_latents = spec.init, spec.d_in, spec.d_out, spec.n_latents
    whole = rows is None
    out = device if out is None else out
    rows = range(n_latents) if whole else rows
    start, stop = rows.start, rows.stop
    chunk = n_latents if whole else max(1, chunk_rows)
    encoder_bound = 1.0 / math.sqrt(d_in)  # nn.Linear(d_in, n_latents): U(+-1/sqrt(fan_in))

    def stream(n_rows: int, width: int, draw, keep_rows=None, keep_cols=None, each=None):
        """Draw an [n_rows, width] matrix chunk by chunk (draw(chunk) fills it in place); return its
        rows keep_rows or columns keep_cols, calling each(chunk) on every chunk."""
        kept = []
        step = chunk if keep_cols is None else max(1, chunk * d_in // max(width, 1))
        for r0 in range(0, n_rows, step):
            block = draw(torch.empty(min(step, n_rows - r0), width, device=device))
            if each is not None:
                each(block)
            if keep_rows is not None:
                lo, hi = max(keep_rows.start, r0), min(keep_rows.stop, r0 + len(block))
                if lo < hi:
                    kept.append(block if whole else block[lo - r0:hi - r0].to(out, copy=True))
            else:
                kept.append(block if whole else block[:, keep_cols.start:keep_cols.stop].to(out, copy=True))
        return torch.cat(kept, dim=0) if len(kept) > 1 else kept[0]

    uniform = lambda bound: (lambda t: t.uniform_(-bound, bound))  # noqa: E731
    b_enc = torch.zeros(len(rows), device=out)
    b_dec = torch.zeros(d_out, device=out)
    if init == "topk":
        # encoder = nn.Linear(d_in, n_latents) (weight [n_latents, d_in]); decoder = its rows
        encoder_t = stream(n_latents, d_in, uniform(encoder_bound), keep_rows=rows)
        decoder = encoder_t if d_out == d_in else stream(n_latents, d_out, uniform(1.0 / math.sqrt(d_out)),
                                                         keep_rows=rows)
        decoder = decoder / decoder.norm(dim=1, keepdim=True).clamp_min(1e-8)
        encoder = encoder_t.t()
    else:
        # orthogonal_ on the [n_latents, d_in] matrix, as the paper's code gives it to the
        # transpose of its [d_in, n_latents] decoder weight: orthonormal columns when
        # n_latents >= d_in, so each row has norm ~sqrt(d_in / n_latents).
        if whole or n_latents < d_out:  # (fewer latents than d_out: orthogonal_ works on the transpose)
            decoder = torch.empty(n_latents, d_out, device=device)
            nn.init.orthogonal_(decoder)
            decoder = decoder[start:stop].to(out)
        else:
            gram = torch.zeros(d_out, d_out, dtype=torch.float64, device=device)

            def accumulate(block):  # A^T A: fp32 products per chunk, summed in float64
                gram.add_((block.t() @ block).double())

            draws = stream(n_latents, d_out, lambda t: t.normal_(0, 1), keep_rows=rows, each=accumulate)
            upper = torch.linalg.cholesky(gram, upper=True)  # A = Q R with diag(R) > 0, as orthogonal_'s
            # R is well conditioned (A^T A ~ n_latents * I): solving in fp32 keeps fp32 rounding
            decoder = torch.linalg.solve_triangular(upper.float().to(out), draws, upper=True, left=False)
        encoder = stream(d_in, n_latents, uniform(encoder_bound), keep_cols=rows)
        if init == "paper":  # the nn.Linear biases of the paper's encoder and decoder
            b_enc = stream(1, n_latents, uniform(encoder_bound), keep_cols=rows)[0]
            bound = 1.0 / math.sqrt(n_latents)
            b_dec = torch.empty(d_out, device=device).uniform_(-bound, bound).to(out)
        else:  # "orthogonal": unit-norm directions
            decoder = decoder / decoder.norm(dim=1, keepdim=True).clamp_min(1e-8)
    if spec.init_encoder_as_decoder_transpose:
        encoder = (decoder / decoder.norm(dim=1, keepdim=True).clamp_min(1e-8)).t()
    if spec.decoder_norm == "project":  # the forward pass uses the stored rows: make them unit
        decoder = decoder / decoder.norm(dim=1, keepdim=True).clamp_min(1e-8)
    return encoder, b_enc, decoder, b_dec
