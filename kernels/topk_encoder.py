"""TopK encoder: values, indices = TopK(ReLU(x @ W_enc + b_enc)), fused, with its sparse backward.

Forward (`_topk_encode_fwd_kernel`). The grid is (row blocks, latent splits). A program owns
BLOCK_M tokens and one contiguous range of latents. It walks that range in tiles of BLOCK_N
latents; each tile of pre-activations is computed with tl.dot (fp32 accumulation) and gets the
bias, then only its entries above the row's current k-th best are candidates. A running top-k per
row (values + latent indices, unsorted, in registers) takes the candidates one round at a time:
each round inserts every row's largest candidate in place of that row's k-th best and drops the
candidates that fell below the raised k-th best. Rounds are data-dependent: k for the first tile,
then as many as the block's busiest row has new entries, which is few once a row has seen a few
thousand latents (for i.i.d. scores, tile t adds about k/t entries per row). This costs a handful
of cheap ops per element per round, where a bitonic merge of every tile (tl.topk) costs
~log2(BLOCK_N)*log2(k) compare-exchange levels of every element of every tile.

Only each program's k candidates are written to global memory ([N, splits, K_PAD], fp32 values +
int32 indices); a torch.topk over those splits * K_PAD candidates per token (tiny) gives the
answer, sorted largest first. The [N, n_latents] pre-activations never exist in global memory.
Selection compares the fp32 pre-activations exactly; ties go to the lower latent index within a
tile and to whichever torch.topk picks across splits. K_PAD = next_power_of_2(k) (Triton shapes
are powers of two); the padding slots hold +inf so they are never the row's minimum.

The ReLU is applied after selection: a token whose pre-activations are all negative still gets its
k largest pre-activations as indices, with values 0 (this is TopKEncodeReference's semantics).
A NaN pre-activation is ranked first and returned as NaN, as torch.topk does (the selection ranks
keys where NaN -> +inf and +inf -> the largest finite float).

Overlap of selection and GEMM. Triton 3.9 software-pipelines the innermost loop: the d loop of
each tile keeps FWD_NUM_STAGES - 1 cp.async loads of x / W_enc tiles in flight behind the
tensor-core MMAs. The selection of tile t runs after tile t's d loop, and the next tile's first
loads are issued after it, so within one program selection and GEMM alternate; Triton offers no
cross-iteration prefetch of an outer loop on sm_90 (warp specialisation of tl.range is for
Blackwell). The overlap comes from the SM running another program's GEMM while one selects:
where registers and shared memory allow two programs per SM (K_PAD = 64: 241 registers x 128
threads, 72 KiB), that happens in hardware.

Backward (from the [N, k] gradient only, never an [N, k, d] or [N, n] tensor), with
grad_pre = grad_values * (values > 0):
- grad_x[t] = sum_j grad_pre[t, j] * W_enc[:, idx[t, j]]: `gather_latents_kernel`. E2ESAE stores
  W_enc as an [n_latents, d_in] buffer (the public [d_in, n_latents] Parameter is its transpose),
  so each selected latent is one contiguous, vectorised row read.
- grad_W_enc, grad_b_enc: the (token, slot) pairs are sorted by latent (one torch.argsort of N*k
  ints), so each block of BLOCK_L consecutive latents owns one contiguous run of entries.
  `latent_segment_grad_kernel` reduces that run with a tensor-core product
  onehot^T @ x[tokens], where onehot[e, l] = grad_pre[e] if entry e belongs to latent l: no
  atomics, deterministic, fp32 accumulation, and every tile of grad_W_enc (including the all-zero
  ones of latents nobody picked) is written once, coalesced, in W_enc's own layout. A token whose x
  row is not finite stays out of the product (0 * NaN would reach every latent of the tile) and
  is added to its own latents alone, as the reference's scatter (accumulate_latent_segment).

Matmul precision: fp32 operands follow torch.get_float32_matmul_precision() (kernels/_common.py).
tests/compile_cases.py records every launch configuration for the compile check.

The backward's kernels and sparse_encoder_backward, which launches them, live in
kernels/_sparse_code.py: the ReLU encoder, the ReLU autoencoder and the dense-code decoder use them
too. The pre-activation tile (encoder_preactivation_tile) is kernels/_tiles.py's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastsae.kernels._common import gpu_arch, matmul_mode, sm_count
from fastsae.kernels._sparse_code import sparse_encoder_backward
from fastsae.kernels._tiles import encoder_preactivation_tile


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------



# Largest finite fp32: the ranking key of a +inf pre-activation (NaN takes +inf).
FLT_MAX: tl.constexpr = tl.constexpr(3.4028234663852886e38)

@triton.jit
def _topk_encode_fwd_kernel(
    x_ptr, w_ptr, b_ptr, cand_val_ptr, cand_idx_ptr,
    n_tokens, d_in, n_latents, latents_per_split, k,
    stride_xm, stride_xd, stride_wd, stride_wn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, K_PAD: tl.constexpr,
    MATMUL_MODE: tl.constexpr,
):
    # Row blocks vary fastest, so programs running side by side read the same W_enc slice (L2).
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_tokens
    offs_n = tl.arange(0, BLOCK_N)
    slots = tl.arange(0, K_PAD)
    split_start = split * latents_per_split
    split_end = tl.minimum(split_start + latents_per_split, n_latents)

    # Running top-k per row, unsorted. Slots >= k hold +inf so they are never the row's minimum,
    # never replaced, and the minimum over the buffer is exactly the k-th best so far.
    best_val = tl.where(slots[None, :] < k, float("-inf"), float("inf")) + tl.zeros([BLOCK_M, K_PAD], tl.float32)
    best_idx = tl.zeros([BLOCK_M, K_PAD], tl.int32)
    kth_val, kth_slot = tl.min(best_val, axis=1, return_indices=True)

    for tile_start in range(split_start, split_end, BLOCK_N):
        cols = tile_start + offs_n
        col_ok = cols < split_end

        pre = encoder_preactivation_tile(x_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, d_in,
                                         stride_xm, stride_xd, stride_wd, stride_wn,
                                         BLOCK_M, BLOCK_N, BLOCK_D, MATMUL_MODE)
        # Ranking keys: torch.topk ranks NaN above everything, so NaN -> +inf and a true +inf ->
        # the largest finite float (the order NaN > inf > finite survives; an exact FLT_MAX
        # pre-activation would read back as +inf). The keys are mapped back at the store.
        pre = tl.where(pre != pre, float("inf"), tl.where(pre == float("inf"), FLT_MAX, pre))

        # Candidates: entries above the row's current k-th best. After the first tiles they are
        # rare, so the selection loop below runs a few times per tile, not k times.
        cand = tl.where(col_ok[None, :] & (pre > kth_val[:, None]), pre, float("-inf"))
        top_val, top_pos = tl.max(cand, axis=1, return_indices=True)
        while tl.max(top_val, axis=0) > float("-inf"):
            # Insert each row's best candidate in place of the row's k-th best, where it is larger.
            take = top_val > kth_val
            replace = (slots[None, :] == kth_slot[:, None]) & take[:, None]
            best_val = tl.where(replace, top_val[:, None], best_val)
            best_idx = tl.where(replace, (tile_start + top_pos)[:, None], best_idx)
            kth_val, kth_slot = tl.min(best_val, axis=1, return_indices=True)
            # Drop the inserted entry and everything no longer above the raised k-th best: at most
            # k rounds per tile, since candidates leave in descending order.
            keep = (offs_n[None, :] != top_pos[:, None]) & (cand > kth_val[:, None])
            cand = tl.where(keep, cand, float("-inf"))
            top_val, top_pos = tl.max(cand, axis=1, return_indices=True)

    # Outputs: [n_tokens, n_splits, K_PAD]; the padding slots (>= k) are written as -inf. int64:
    # N * n_splits * K_PAD passes 2^31 for a caller-chosen `splits` at large N. Keys back to
    # values: +inf was a NaN, FLT_MAX a +inf (the host merge's torch.topk ranks NaN first too).
    out = (rows.to(tl.int64)[:, None] * n_splits + split) * K_PAD + slots[None, :]
    real = row_ok[:, None] & (slots[None, :] < k)
    value = tl.where(best_val == float("inf"), float("nan"), tl.where(best_val == FLT_MAX, float("inf"), best_val))
    tl.store(cand_val_ptr + out, tl.where(real, value, float("-inf")), mask=row_ok[:, None])
    tl.store(cand_idx_ptr + out, best_idx, mask=row_ok[:, None])


# Block sizes per K_PAD: (BLOCK_M, BLOCK_N, BLOCK_D for 16-bit / fp32 operands, num_warps,
# programs per SM), from the sm_90 compile reports (registers, spills, wgmma, warp layout; not yet
# timed on a GPU). Programs per SM is what the compile facts allow side by side on one SM (65,536
# registers, 227 KiB of shared memory on sm_90): default_splits sizes one wave by it, and
# tests/test_compile.py checks it against the facts of every recorded launch.
# - BLOCK_M = 64 or 128, never 32: a Hopper warpgroup MMA (wgmma) covers 64 rows with 4 warps;
#   smaller row blocks fall back to mma.sync.
# - K_PAD <= 64: BLOCK_M = 16 * num_warps. Triton then lays the wgmma accumulator out with
#   warpsPerCTA = [num_warps, 1]: each warp holds 16 whole rows, so every row reduction of the
#   selection (max / min with index along a row) is in-thread work plus shuffles inside one warp,
#   never a round trip through shared memory.
# - K_PAD <= 64: one warpgroup on 64 x 128, two programs per SM. A program's tile loop is GEMM,
#   then selection (ALU work, with the tensor cores idle); its next tiles' loads are in flight
#   meanwhile (cp.async, 3 stages), but its next MMA waits for the selection. A second resident
#   program runs its MMAs in that gap, so at k <= 64 selection and GEMM overlap across the two
#   (the "two programs per SM"; Triton's pipeliner cannot overlap them inside one program,
#   since the selection reads the MMA's result). Compile facts, sm_90: K_PAD 16 / 32 / 64 use
#   201 / 215 / 241 registers (bf16; TF32 197 / 215 / 241) x 128 threads and 72 KiB of shared
#   memory: two programs take <= 63,488 of 65,536 registers (allocated 8 per thread at a time)
#   and 146 KiB. The cost: a W_enc tile serves 64 rows, not 128, so the L2 -> SM traffic,
#   N*n*d*2 B * (1/64 + 1/128), is 1.5x the 128 x 128 tile's; that tile on 8 warps (220
#   registers) fits once per SM and serialises selection and MMA. gpu_check times both.
# - K_PAD = 128 and 256: the running buffer ([BLOCK_M, K_PAD] fp32 values + int32 indices, 64 /
#   128 KiB at 64 rows) does not fit beside the accumulator in 4 warps' registers (4 warps on 64
#   rows spill at K_PAD = 128; 8 warps at K_PAD = 256 spill too). They take 8 and 16 warps on 64
#   rows, one program per SM: the warpgroups split the columns (warpsPerCTA [4, 2] and [4, 4]),
#   so their row reductions combine 2 or 4 warps through shared memory. Triton cannot keep a row
#   in one warp there without spilling.
FWD_CONFIGS = {
    32: (64, 128, 64, 32, 4, 2),   # K_PAD <= 32
    64: (64, 128, 64, 32, 4, 2),
    128: (64, 64, 64, 32, 8, 1),
    256: (64, 64, 64, 32, 16, 1),
}
# Before Hopper (mma.sync, sm_80 / sm_89) Triton spreads warps over both dimensions of the
# accumulator ([2, 4] at 128 x 128 on 8 warps) whatever the block shape, and no wgmma constrains
# BLOCK_M; the 4-warp configs spill there (K_PAD 64: 40 B of stack), as does the K_PAD 256 one
# (32 B), and are replaced by ones that do not, one program per SM.
FWD_CONFIGS_PRE_HOPPER = {
    **FWD_CONFIGS,
    32: (128, 128, 64, 32, 8, 1),
    64: (64, 128, 64, 32, 8, 1),
    256: (32, 128, 64, 32, 8, 1),
}
# Full-fp32 operands (torch.set_float32_matmul_precision("highest"): "ieee") run tl.dot as CUDA-core
# FMAs, which hold both operand tiles in registers beside the accumulator: the tensor-core configs
# spill there (up to 470 B of stack), this one does not on sm_80 or sm_90 for any K_PAD.
FWD_CONFIG_FMA = (32, 64, 64, 16, 8, 1)
FWD_NUM_STAGES = 3
MAX_FUSED_K = max(FWD_CONFIGS)
# Triton's interpreter (CPU tests) pays per tile, not per element: there, the smallest tile tl.dot
# accepts in rows. The kernel's logic is the same at every tile size.
INTERPRETER_FWD_BLOCK_M = 16


def fwd_config(k_pad: int, dtype: torch.dtype, device: torch.device, arch: int | None = None,
               mode: str | None = None) -> dict:
    """The forward's launch config for K_PAD on ``device`` (the kernel's constexprs and options),
    with ``programs_per_sm`` (not a launch argument: how many run side by side on one SM).
    ``arch`` (e.g. 90) overrides the device's compute capability and ``mode`` the MATMUL_MODE of
    ``dtype``."""
    on_gpu = gpu_arch(device) is not None
    if arch is None:
        arch = gpu_arch(device)
    configs = FWD_CONFIGS if arch is None or arch >= 90 else FWD_CONFIGS_PRE_HOPPER
    block_m, block_n, block_d16, block_d32, num_warps, per_sm = configs[max(32, k_pad)]
    if (mode or matmul_mode(dtype)) == "ieee":
        block_m, block_n, block_d16, block_d32, num_warps, per_sm = FWD_CONFIG_FMA
    if not on_gpu:
        block_m = INTERPRETER_FWD_BLOCK_M
    # fp32 tiles are twice the bytes: half the reduction step keeps shared memory in budget.
    block_d = block_d32 if dtype == torch.float32 else block_d16
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps,
                num_stages=FWD_NUM_STAGES, programs_per_sm=per_sm)


def default_splits(n_tokens: int, n_latents: int, block_m: int, block_n: int, slots: int) -> int:
    """Latent splits for about one wave of programs: splits = floor(slots / row_blocks), in [1, tiles].

    slots: programs the GPU runs at once, SMs x programs per SM (the config's programs_per_sm: 2
    at K_PAD <= 64 on sm_90, else 1). row_blocks * splits <= slots: the floor keeps a partial
    second wave from doubling the time (4,096 tokens in 32 row blocks on 132 slots: 4 splits,
    128 programs, one wave; ceil would give 160 programs, two waves). More splits than that only
    add candidates to merge; fewer leave SMs idle. When the row blocks alone fill the slots
    (N >= slots * BLOCK_M), 1 split. Never a split shorter than a tile. slots = 1 is the
    interpreter's case: it runs programs one after another, so one split is the cheapest.
    """
    row_blocks = max(1, triton.cdiv(n_tokens, block_m))  # N = 0: no row blocks, but no division by 0
    return max(1, min(slots // row_blocks, triton.cdiv(n_latents, block_n)))


def topk_encode_forward(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int, *,
                        splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused forward alone: (values [N, k] in x.dtype, indices [N, k] int64), largest first.

    A NaN pre-activation comes out as torch.topk gives it: ranked first, value NaN. A row with
    fewer than k pre-activations above -inf (latents ablated with a -inf bias) fills its last slots
    with value 0 at index 0, where torch.topk names distinct latents; both code the same zeros.
    """
    n_tokens, d_in = x.shape
    n_latents = W_enc.shape[1]
    b_enc = b_enc.contiguous()  # the kernel reads the bias at unit stride
    k_pad = triton.next_power_of_2(k)
    if k_pad > MAX_FUSED_K:
        return _unfused_forward(x, W_enc, b_enc, k)
    if n_tokens == 0:  # an empty batch: nothing to launch (a 0-sized grid)
        return (torch.empty(0, k, dtype=x.dtype, device=x.device),
                torch.empty(0, k, dtype=torch.int64, device=x.device))
    cfg = fwd_config(k_pad, x.dtype, x.device)
    block_n = cfg["BLOCK_N"]
    per_sm = cfg.pop("programs_per_sm")
    if splits is None:
        splits = default_splits(n_tokens, n_latents, cfg["BLOCK_M"], block_n, sm_count(x.device) * per_sm)
    latents_per_split, splits = _split_bounds(n_latents, splits, block_n)

    cand_val = torch.empty(n_tokens, splits * k_pad, dtype=torch.float32, device=x.device)
    cand_idx = torch.empty(n_tokens, splits * k_pad, dtype=torch.int32, device=x.device)
    grid = (triton.cdiv(n_tokens, cfg["BLOCK_M"]), splits)
    _topk_encode_fwd_kernel[grid](
        x_ptr=x, w_ptr=W_enc, b_ptr=b_enc, cand_val_ptr=cand_val, cand_idx_ptr=cand_idx,
        n_tokens=n_tokens, d_in=d_in, n_latents=n_latents, latents_per_split=latents_per_split, k=k,
        stride_xm=x.stride(0), stride_xd=x.stride(1), stride_wd=W_enc.stride(0), stride_wn=W_enc.stride(1),
        K_PAD=k_pad, MATMUL_MODE=matmul_mode(x.dtype), **cfg,
    )
    # Merge: the k largest of splits * K_PAD candidates per token (tiny), sorted largest first.
    pre, slot = cand_val.topk(k, dim=1)
    indices = cand_idx.gather(1, slot).long()
    return pre.clamp_min(0).to(x.dtype), indices


def _split_bounds(n_latents: int, splits: int, block_n: int) -> tuple[int, int]:
    """(latents per split, splits): boundaries on tile multiples, so only the last tile of the
    last split is ragged."""
    latents_per_split = triton.cdiv(triton.cdiv(n_latents, splits), block_n) * block_n
    return latents_per_split, triton.cdiv(n_latents, latents_per_split)


def _unfused_forward(x, W_enc, b_enc, k):
    """k > MAX_FUSED_K: addmm + torch.topk by token chunks (at most a [chunk, n] fp32 block)."""
    n_tokens, n_latents = x.shape[0], W_enc.shape[1]
    values = torch.empty(n_tokens, k, dtype=x.dtype, device=x.device)
    indices = torch.empty(n_tokens, k, dtype=torch.int64, device=x.device)
    step = max(1, (1 << 24) // n_latents)
    for start in range(0, n_tokens, step):
        pre = torch.addmm(b_enc.float(), x[start:start + step].float(), W_enc.float())
        top = pre.topk(k, dim=1)
        values[start:start + step] = top.values.clamp_min(0).to(x.dtype)
        indices[start:start + step] = top.indices
    return values, indices



# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------


class TopKEncodeTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, k, splits=None):
        values, indices = topk_encode_forward(x, W_enc, b_enc, k, splits=splits)
        ctx.save_for_backward(x, W_enc, values, indices)
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx, grad_values, _grad_indices):
        x, W_enc, values, indices = ctx.saved_tensors
        # ReLU: a latent whose value was clamped to 0 passes no gradient.
        grad_pre = torch.where(values > 0, grad_values, torch.zeros_like(grad_values)).to(x.dtype)
        grad_x, grad_w, grad_b = sparse_encoder_backward(
            grad_pre, indices, x, W_enc, *ctx.needs_input_grad[:3])
        return grad_x, grad_w, grad_b, None, None


def topk_encode_triton(x2d: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int, *,
                       splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused TopK encoder on validated 2-D inputs: (values [N, k] x.dtype, indices [N, k] int64).

    ``splits`` (latent ranges per row block) is chosen from the device when None.
    """
    return TopKEncodeTriton.apply(x2d, W_enc, b_enc, k, splits)
