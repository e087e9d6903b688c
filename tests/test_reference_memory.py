"""The reference ops hold no tensor that grows with n_latents or d_vocab, beyond the weights.

A TorchDispatchMode records the shape of every tensor each aten op allocates during forward
and backward. With the chunk budget fixed, the largest non-weight temporary must stay within the
budget whatever n_latents (or d_vocab) is: the [N, n_latents] pre-activations and the
[N, d_vocab] logits never exist whole.
"""

import pytest
import torch

import fastsae.ops.checks as checks
from fastsae import ops
from tests.helpers_dispatch import AllocationRecorder

BUDGET = 4096  # elements per chunk for this test


def largest_temporary(fn, weight_shapes):
    recorder = AllocationRecorder()
    with recorder:
        fn()
    weights = {tuple(s) for s in weight_shapes}
    sizes = [torch.Size(s).numel() for s in recorder.shapes if s not in weights]
    return max(sizes)


@pytest.fixture(autouse=True)
def budget(monkeypatch):
    monkeypatch.setattr(checks, "CHUNK_ELEMENTS", BUDGET)


@pytest.mark.parametrize("n_latents", [256, 1024, 4096])
def test_topk_encode_and_decode_memory_does_not_grow_with_n_latents(n_latents):
    n_tokens, d, k = 64, 16, 4
    x = torch.randn(n_tokens, d, requires_grad=True)
    W_enc = torch.randn(d, n_latents, requires_grad=True)
    b_enc = torch.zeros(n_latents, requires_grad=True)
    W_dec = torch.randn(n_latents, d, requires_grad=True)
    b_dec = torch.zeros(d, requires_grad=True)

    def step():
        values, indices = ops.topk_encode(x, W_enc, b_enc, k, backend="torch")
        out = ops.sparse_decode(values, indices, W_dec, b_dec, backend="torch")
        out.square().sum().backward()

    largest = largest_temporary(step, [W_enc.shape, W_dec.shape, b_enc.shape, W_enc.t().shape])
    assert n_tokens * n_latents > BUDGET  # the dense form would exceed the budget
    assert largest <= BUDGET, f"a temporary of {largest} elements at n_latents={n_latents}"


@pytest.mark.parametrize("d_vocab", [300, 1200, 4000])
def test_fused_linear_kl_memory_does_not_grow_with_d_vocab(d_vocab):
    n_tokens, d = 48, 16
    h_sae = torch.randn(n_tokens, d, requires_grad=True)
    h_orig, W_U = torch.randn(n_tokens, d), torch.randn(d, d_vocab)

    def step():
        ops.fused_linear_kl(h_sae, h_orig, W_U, backend="torch").backward()

    largest = largest_temporary(step, [W_U.shape])
    assert largest >= d_vocab  # the recording saw the chunks' [rows, d_vocab] buffers
    assert n_tokens * d_vocab > BUDGET
    # A chunk holds both runs' logits of at least one token: 2 * d_vocab where the budget is smaller.
    assert largest <= max(BUDGET, 2 * d_vocab), f"a temporary of {largest} elements at d_vocab={d_vocab}"
