"""Argument checks shared by the ops (every message names the argument and what was expected),
the operand layouts the kernels read, and the chunk size of the reference paths.

Public: the layers above (activations, train, dashboard) chunk their own temporaries by
CHUNK_ELEMENTS and chunk_rows. Read CHUNK_ELEMENTS as ``checks.CHUNK_ELEMENTS`` at call time (not
``from ... import CHUNK_ELEMENTS`` at import time) where tests should be able to shrink it."""

from __future__ import annotations

import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# Elements of the largest temporary a reference op builds per chunk (16 Mi elements, 64 MiB in
# fp32). The chunk length in tokens is derived from it, so a temporary of [chunk, n_latents] or
# [chunk, d_vocab] stays this size whatever n_latents or d_vocab are.
CHUNK_ELEMENTS = int(os.environ.get("FASTSAE_CHUNK_ELEMENTS", str(1 << 24)))


def chunk_rows(row_width: int) -> int:
    """Rows per chunk so that a [rows, row_width] temporary holds about CHUNK_ELEMENTS."""
    return max(1, CHUNK_ELEMENTS // max(1, row_width))


def check_tensor(name: str, t, *, ndim: int | None = None, min_ndim: int | None = None,
                 float_dtype: bool = False) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(t.shape)}")
    if float_dtype and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float32/bfloat16/float16), got {t.dtype}")


def check_shape(name: str, t: torch.Tensor, expected: tuple, meaning: str) -> None:
    """t's shape is ``expected``; a None there takes any size (a transcoder's d_out, say)."""
    if t.ndim != len(expected) or any(want is not None and got != want for got, want in zip(t.shape, expected)):
        shown = ", ".join("any" if size is None else str(size) for size in expected)
        shown = f"({shown},)" if len(expected) == 1 else f"({shown})"
        raise ValueError(f"{name} must have shape {shown} ({meaning}), got {tuple(t.shape)}")


def check_same(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    """All tensors share the reference's device and dtype (None entries are skipped)."""
    for name, t in others.items():
        if t is None:
            continue
        if t.device != reference.device:
            raise ValueError(f"{name} is on {t.device} but {reference_name} is on {reference.device}; "
                             "move them to one device")
        if t.dtype != reference.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {reference_name} has {reference.dtype}; "
                            "cast them to one dtype")


def check_k(k, n_latents: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= n_latents:
        raise ValueError(f"k must be in [1, n_latents={n_latents}], got k={k}")
    return k


def check_indices(name: str, indices: torch.Tensor, n_latents: int) -> None:
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be int64 or int32, got {indices.dtype}")
    # The range check reads the tensor back: only on CPU (on CUDA it would stall the stream).
    if indices.numel() and indices.device.type == "cpu" and (int(indices.min()) < 0 or int(indices.max()) >= n_latents):
        raise ValueError(f"{name} must lie in [0, {n_latents}), got values in "
                         f"[{int(indices.min())}, {int(indices.max())}]")


class _LatentMajor(torch.autograd.Function):
    """W_enc [d_in, n] copied latent-major; its gradient handed back in W_enc's own layout where
    that layout is dense (so autograd accumulates it into W_enc.grad without another copy)."""

    @staticmethod
    def forward(ctx, W_enc):
        ctx.contiguous = W_enc.is_contiguous()
        return W_enc.t().contiguous().t()

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous() if ctx.contiguous else grad


def encoder_operands(x2d: torch.Tensor, W_enc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x2d contiguous and W_enc [d_in, n] latent-major (W_enc.T contiguous, E2ESAE's storage): the
    layouts the encoder kernels' compiled specialisations read (vector loads of x's rows and of
    W_enc's latent columns in the sparse backward's gathers, where [d_in, n] row-major would make
    every gathered element a scalar load). A caller's other layout is copied once per call (and its
    gradient once back); the usual one passes through without a copy."""
    return x2d.contiguous(), W_enc if W_enc.t().is_contiguous() else _LatentMajor.apply(W_enc)
