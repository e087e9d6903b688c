"""TopK: each token keeps its k largest ReLU pre-activations (OpenAI; EleutherAI's sparsify).

Selection path (fastsae.activations.paths): fastsae.ops.topk_encode keeps a running top k in the
encoder GEMM's epilogue, so only [N, k] values and ids leave the kernel; a sharded SAE gathers each
shard's k candidates and keeps the top k of them. Loss terms: the Lp sparsity term and AuxK
(fastsae.activations.auxk) on the dead latents the trainer gives. SAELens "topk" (and 5.x "standard" files with activation_fn "topk"),
whose rescale_acts_by_decoder_norm is folded into the weights by fastsae.formats.saelens; sparsify
stores exactly this.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastsae.activations import paths
from fastsae.activations.auxk import auxk_term, check_auxk_sharding
from fastsae.activations.base import Activation, SparseCode, check_number


@dataclass(frozen=True)
class TopKParams:
    k: int  # active latents per token

    def validate(self, n_latents: int | None) -> None:
        check_number("k", self.k, integer=True, low=1, high=n_latents)


class TopK(Activation):
    name = "topk"
    Params = TopKParams
    default_init = "topk"
    sparsify_refusal = None
    saelens_architectures = ("topk",)
    example_params = {"k": 4}

    def candidates(self, n_latents: int) -> int:
        """The candidates per token the encoder keeps for select() (paths.select_code)."""
        return self.params.k

    def select(self, values, indices, sae, training) -> SparseCode:
        """The code from each token's candidates (values [N, width] >= 0, each shard's block sorted
        largest first, indices global ids): the k largest."""
        if values.shape[-1] == self.params.k:  # one shard's candidates are the top k already
            return SparseCode(values, indices)
        top, position = values.topk(self.params.k, dim=-1)
        return SparseCode(top, indices.gather(-1, position))

    def training_forward(self, sae, x, settings):
        code = paths.select_code(sae, x, self)
        out = paths.selection_pass(sae, code, settings.p)
        return self.finish_pass(sae, out, code, settings, auxk_term(sae, x, out.reconstruction, settings))

    def encode(self, sae, x):
        return paths.select_code(sae, x, self)

    def code_is_dense(self, sae):
        return False

    def encode_sparse(self, sae, x):
        return self.encode(sae, x)

    def memory(self, n_tokens, n_local, d_in, itemsize, shards, d_out=None):  # the code: d_out plays no part
        return paths.selection_memory(n_tokens, n_local, self.params.k, itemsize, shards)

    def check_run(self, *, shards, coefficients):
        check_auxk_sharding(shards, coefficients)

    def check_shard(self, n_local):
        if self.params.k > n_local:
            raise ValueError(f"k={self.params.k} exceeds the {n_local} latents of one shard")

    def dense_forward(self, pre, sae, training):
        values, indices = torch.relu(pre).topk(self.params.k, dim=-1)
        code = torch.zeros_like(pre).scatter(-1, indices, values)
        return code, (code > 0).sum(-1, dtype=pre.dtype)

    @classmethod
    def reads_saelens(cls, config: dict) -> bool:
        legacy_fn = config.get("activation_fn_str", config.get("activation_fn"))
        return config.get("architecture") == "topk" or (
            config.get("architecture", "standard") == "standard" and legacy_fn == "topk")

    @classmethod
    def from_saelens(cls, config, tensors, where):
        k = config.get("k") if config.get("architecture") == "topk" else (config.get("activation_fn_kwargs") or {}).get("k")
        if isinstance(k, bool) or not isinstance(k, int):
            raise ValueError(f"{where}: a TopK SAE needs an integer k, got {k!r}")
        return {"k": k}, {}

    def to_saelens(self, tensors) -> tuple[str, dict, dict]:
        return "topk", {"k": self.params.k, "rescale_acts_by_decoder_norm": False}, {}

