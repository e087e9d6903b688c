"""An E2ESAE as SAEBench's custom-SAE contract wants it, for SAEBench's own evals.

SAEBench (sae-bench on PyPI; sae_bench/custom_saes/README.md) asks of an SAE object: encode(),
decode(), forward(); W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in] with unit-norm rows, b_dec;
dtype and device attributes; cfg with d_in, d_sae, hook_name, hook_layer, ... and cfg.to_dict().
Every E2ESAE has all of them (cfg: fastsae.sae_config), and a ReLU or JumpReLU SAE with
decoder_norm="project" meets the contract as it is. Two kinds do not:
- decoder_norm="forward" SAEs (the paper's, fastsae's default) store decoder rows at any norm and
  divide by it in the forward pass; SAEBench's SCR, TPP and absorption evals read W_dec as unit rows.
- TopK (and BatchTopK in training) SAEs encode to a SparseCode, where SAEBench's evals index and
  compare a dense [..., d_sae] code.

    from fastsae.saebench import saebench_sae
    sae_for_saebench = saebench_sae(sae)    # unit decoder rows stored, dense codes: the same function

saebench_sae returns a SAEBenchSAE: an E2ESAE of the same function (reconstruction and code to float
rounding) whose stored decoder rows are unit norm (decoder_norm="project", the rows divided by
their norms as the SAELens export does) and whose encode returns the dense code for every
activation (decode takes it). Memory: the dense code is [tokens, d_sae], as SAEBench's own SAEs give.
"""

from __future__ import annotations

import dataclasses

import torch

from fastsae import ops
from fastsae.activations import SparseCode
from fastsae.formats.record import SAERecord, export_tensors
from fastsae.sae import E2ESAE


class SAEBenchSAE(E2ESAE):
    """An E2ESAE whose encode always returns the dense code and whose decode takes it (see the
    module docstring); built by saebench_sae."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        code = super().encode(x)
        return code.to_dense(self.n_latents) if isinstance(code, SparseCode) else code

    def decode(self, code: torch.Tensor | SparseCode) -> torch.Tensor:
        if isinstance(code, torch.Tensor) and not self.activation_fn.code_is_dense(self):
            if code.shape[-1] != self.n_latents:
                raise ValueError(f"code must have last dimension d_sae={self.n_latents}, got shape {tuple(code.shape)}")
            return self.finish_reconstruction(ops.dense_decode(code, self.normalised_decoder(), self.partial_bias()))
        return super().decode(code)


def saebench_sae(sae: E2ESAE) -> SAEBenchSAE:
    """``sae`` as a SAEBenchSAE: the same function, unit decoder rows stored, dense codes (module
    docstring); on the SAE's device, in its dtype, in eval mode as SAEBench runs SAEs."""
    if not isinstance(sae, E2ESAE):
        raise TypeError(f"sae must be an E2ESAE, got {type(sae).__name__}")
    if sae.shard_count != 1:
        raise ValueError("saebench_sae takes a whole SAE; gather a sharded SAE's blocks first")
    record = sae.to_record()
    tensors = export_tensors(record)  # float64; decoder_norm "forward": the unit rows its forward uses
    spec = dataclasses.replace(record.spec, decoder_norm="project")
    converted = SAERecord(spec, tensors, dict(record.metadata), record.dtype, "saebench_sae")
    return SAEBenchSAE.from_record(converted, device=sae.device, dtype=sae.dtype).eval()
