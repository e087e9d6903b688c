"""ReLU: code = relu(x @ W_enc + b_enc), the paper's SAE (Braun et al. 2024; e2e_sae).

Elementwise with no threshold: trained through fastsae.ops.relu_autoencode (paths.elementwise_pass),
the sparsity term is the Lp norm of the code (loss.sparsity_p) over d_in. SAELens calls it "standard" (also 5.x files
with activation_fn "relu"); sparsify has no ReLU SAEs.
"""

from __future__ import annotations

import torch

from fastsae.activations import paths
from fastsae.activations.base import Activation


class ReLU(Activation):
    name = "relu"
    default_init = "paper"
    saelens_architectures = ("standard",)

    @classmethod
    def reads_saelens(cls, config: dict) -> bool:
        legacy_fn = config.get("activation_fn_str", config.get("activation_fn"))
        return config.get("architecture", "standard") == "standard" and legacy_fn in (None, "relu")

    def dense_forward(self, pre, sae, training):
        code = torch.relu(pre)
        return code, (code > 0).sum(-1, dtype=pre.dtype)

    def training_forward(self, sae, x, settings):
        return self.finish_pass(sae, paths.elementwise_pass(sae, x, settings.p, None, None), None, settings)

    def encode(self, sae, x):
        return paths.elementwise_encode(sae, x, None)

    def memory(self, n_tokens, n_local, d_in, itemsize, shards, d_out=None):
        return paths.elementwise_memory(n_tokens, n_local, d_in, itemsize, jump=False, d_out=d_out)

    def to_saelens(self, tensors) -> tuple[str, dict, dict]:
        return "standard", {}, {}
