"""JumpReLU (Rajamanoharan et al. 2024, "Jumping Ahead"; Gemma Scope): a learned threshold per latent.

    code_j = relu(pre_j) * (pre_j > theta_j),   theta = exp(log_threshold)

The threshold is stored as its log (always positive, as SAELens's training SAE). Elementwise:
fastsae.ops.relu_autoencode (paths.elementwise_pass) takes theta in the encoder's epilogue and
keeps its sparse backward.
Training uses the paper's straight-through pseudo-derivatives with a rectangle kernel
rect(u) = 1 for |u| < 1/2 of width ``bandwidth`` (eps), exactly as SAELens's JumpReLU and Step:

    d code_j / d pre_j  = H(pre_j - theta_j)                       (no estimator for pre)
    d code_j / d theta_j = -(theta_j / eps) rect((pre_j - theta_j) / eps)
    d L0 / d theta_j     = -(1 / eps) rect((pre_j - theta_j) / eps)

The sparsity term is that L0 (active latents per token, through the estimator above), mean over
tokens, divided by d_in as the paper's Lp term is, so loss.sparsity_coeff keeps its scale across
activations; loss.sparsity_p does not apply. SAELens "jumprelu" files hold theta itself as
`threshold` (theta <= 0 gates nothing beyond the ReLU: stored as log 0 = -inf, the same function);
sparsify has no JumpReLU SAEs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastsae.activations import paths
from fastsae.activations.base import Activation, ExtraTensor, check_number


@dataclass(frozen=True)
class JumpReLUParams:
    bandwidth: float = 0.001  # eps of the straight-through estimator (SAELens jumprelu_bandwidth)
    init_threshold: float = 0.001  # theta of every latent at init (SAELens jumprelu_init_threshold)

    def validate(self, n_latents: int | None) -> None:
        check_number("bandwidth", self.bandwidth, low=0, low_open=True)
        check_number("init_threshold", self.init_threshold, low=0, low_open=True)


class JumpReLU(Activation):
    name = "jumprelu"
    Params = JumpReLUParams
    default_init = "paper"
    extra_tensors = {"log_threshold": ExtraTensor(per_latent=True, trainable=True,
                                                  fill=lambda params: math.log(params.init_threshold))}
    sparsity_uses_p = False
    sparsify_refusal = "sparsify stores TopK SAEs only; a JumpReLU SAE goes to SAELens (format='saelens')"
    saelens_architectures = ("jumprelu",)
    saelens_tensors = ("threshold",)
    # thresholds and a window wide enough that a test's pre-activations fall inside it
    example_params = {"bandwidth": 0.5, "init_threshold": 0.1}

    def threshold(self, sae) -> torch.Tensor:
        """theta [latents held here], differentiable in log_threshold."""
        return sae.log_threshold.exp()

    @property
    def bandwidth(self) -> float:
        return self.params.bandwidth

    def training_forward(self, sae, x, settings):
        out = paths.elementwise_pass(sae, x, settings.p, self.threshold(sae), self.bandwidth)
        return self.finish_pass(sae, out, None, settings)

    def encode(self, sae, x):
        return paths.elementwise_encode(sae, x, self.threshold(sae))

    def memory(self, n_tokens, n_local, d_in, itemsize, shards, d_out=None):
        return paths.elementwise_memory(n_tokens, n_local, d_in, itemsize, jump=True, d_out=d_out)

    def dense_forward(self, pre, sae, training):
        threshold = self.threshold(sae)
        return (_DenseJumpReLU.apply(pre, threshold, self.bandwidth),
                _DenseStep.apply(pre, threshold, self.bandwidth).sum(-1))

    def sparsity_term(self, lp_sum, l0, p, d_in):
        return l0.mean() / d_in

    @classmethod
    def from_saelens(cls, config, tensors, where):
        threshold = tensors.get("threshold")
        if threshold is None or threshold.shape != (config["d_sae"],):
            shape = None if threshold is None else tuple(threshold.shape)
            raise ValueError(f"{where}: a JumpReLU SAE needs a threshold tensor of shape ({config['d_sae']},), "
                             f"got {shape}")
        params = {name: config[key] for name, key in (("bandwidth", "jumprelu_bandwidth"),
                                                      ("init_threshold", "jumprelu_init_threshold")) if key in config}
        return params, {"log_threshold": threshold.clamp_min(0).log()}

    def to_saelens(self, tensors) -> tuple[str, dict, dict]:
        return "jumprelu", {}, {"threshold": tensors["log_threshold"].exp()}


# The naive form (dense_forward): the estimator written out on dense [N, n_latents] tensors, as
# SAELens's JumpReLU and Step functions.

def _window(pre, threshold, bandwidth):
    return (((pre - threshold) / bandwidth).abs() < 0.5).to(pre.dtype)  # rect((pre - theta) / eps)


class _DenseJumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * ((pre > threshold) & (pre > 0))

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * ((pre > threshold) & (pre > 0))
        grad_threshold = (-(threshold / eps) * _window(pre, threshold, eps) * grad).sum(0)
        return grad_pre, grad_threshold, None


class _DenseStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return ((pre > threshold) & (pre > 0)).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        return None, (-(1.0 / eps) * _window(pre, threshold, eps) * grad).sum(0), None
