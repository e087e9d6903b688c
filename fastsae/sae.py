"""E2ESAE: the sparse autoencoder module that fastsae splices into a model.

Parameters follow SAELens / TransformerLens conventions so SAEs move between tools:
W_enc [d_in, n_latents], b_enc [n_latents], W_dec [n_latents, d_in], b_dec [d_in], plus the
activation's own tensors (JumpReLU's log_threshold, BatchTopK's inference threshold).

The activation (relu, topk, jumprelu, batchtopk, matryoshka_batchtopk) is a module of
fastsae.activations, and what defines the SAE is one SAESpec (fastsae.spec). The activation owns the
encoding and the training pass (see fastsae.activations.base): it calls a fused path
(fastsae.ops.relu_autoencode, which never builds the [N, n_latents] code in training, or
fastsae.ops.topk_encode and sparse_decode) or the chunked dense reference, and returns its named
loss terms; the SAE holds the parameters and says where its latents are.

A transcoder (Dunefsky et al. 2024; skip-transcoders: Paulo et al. 2025) is the same module with
d_out (the width it writes, e.g. an MLP's output) and optionally skip=True, an affine skip path:
x_hat = code @ W_dec + b_dec + x @ W_skip, W_dec [n_latents, d_out], b_dec [d_out], W_skip
[d_in, d_out]. Its metadata["hook"] is "IN->OUT" (fastsae.spec.hook_in_out): it reads IN and
replaces OUT. The skip is one torch.addmm whose epilogue adds the sparse reconstruction (cuBLAS's
beta = 1 on a GPU), so it costs its GEMM and no further pass over the tokens.

Decoder rows have unit norm, in one of two ways (``decoder_norm``):
- "forward" (default, as in the paper's code): the forward pass uses W_dec's rows divided by
  their norms; the stored weight is never edited, which keeps Adam's moments consistent. The
  division is folded into the code (a sparse code's values) or into a normalized copy of W_dec
  (parameter-sized), never into an [N, n_latents, d_in] tensor.
- "project" (as OpenAI's and EleutherAI's TopK SAEs): the stored rows are kept unit norm. The
  trainer calls ``remove_decoder_parallel_grad_()`` before each optimizer step and
  ``project_decoder_()`` after it; the forward pass uses W_dec as stored.

Files: ``save_pretrained`` / ``from_pretrained`` are facades over fastsae.formats, which reads and
writes every format (fastsae's own, SAELens, sparsify, the paper's e2e_sae) as SAE records.

This file is longer than the house's ~400 lines by its docstrings: the module every user meets
documents its inits, decoder norms and code types where they are used.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from fastsae import formats, ops
from fastsae.activations import SAEForward, SparseCode, TrainingSettings, paths
from fastsae.formats import SAERecord
from fastsae.formats import releases
from fastsae.init import draw_init
from fastsae.sae_config import SAEConfig, hook_layer
from fastsae.spec import DECODER_NORMS, INITS, SAESpec, hook_in_out

__all__ = ["DECODER_NORMS", "INITS", "E2ESAE", "SAEForward", "SAEOutput", "SparseCode", "load_run"]


class SAEOutput(NamedTuple):
    reconstruction: torch.Tensor
    code: torch.Tensor | SparseCode


class E2ESAE(nn.Module):
    """A sparse autoencoder: code = act(x @ W_enc + b_enc), x_hat = code @ W_dec + b_dec.

    Args:
        d_in: width of the activations it reads (d_model for a residual-stream hook).
        n_latents: dictionary size.
        activation: a name in fastsae.activations: "relu" (dense ReLU code), "topk" (the k largest
            ReLU pre-activations per token, a SparseCode), "jumprelu" (ReLU gated by a learned
            per-latent threshold), "batchtopk" (the k x N largest of a batch in training, a
            threshold at inference).
        k: active latents per token, for the activations that have it (topk, batchtopk).
        decoder_norm: "forward" (the paper's choice) or "project"; see the module docstring.
        init: how the parameters start, by name (see ``INITS``); None: the activation's default
            ("paper" for relu / jumprelu, "topk" for topk / batchtopk).

            - "paper" (the paper's code, e2e_sae's SAE class): W_dec [n_latents, d_in] from
              nn.init.orthogonal_ and stored at that scale (rows of norm ~sqrt(d_in / n_latents) when
              n_latents > d_in; the forward pass normalises them), W_enc, b_enc and b_dec uniform
              as the nn.Linear layers they are there: W_enc, b_enc ~ U(+-1/sqrt(d_in)),
              b_dec ~ U(+-1/sqrt(n_latents)). With Adam, whose step size does not depend on the
              weight's scale, the stored scale sets how fast the directions turn.
            - "topk" (OpenAI's sparse_autoencoder and EleutherAI's sparsify): W_enc from
              nn.Linear's uniform init, W_dec its transpose with unit rows, zero biases.
            - "orthogonal" (fastsae's earlier default): orthogonal directions stored at unit norm,
              W_enc ~ U(+-1/sqrt(d_in)), zero biases.

            With decoder_norm="project" the stored rows are made unit norm whatever the init.
        init_encoder_as_decoder_transpose: start W_enc as the transpose of the unit-norm decoder
            directions instead of the init's own encoder.
        d_out: the width it writes (a transcoder); None: d_in.
        skip: a transcoder's affine skip path W_skip [d_in, d_out], starting at zero.
        metadata: JSON-serialisable facts saved with the weights (hook name, model name, ...).
        **params: the activation's other hyperparameters (jumprelu: bandwidth, init_threshold;
            batchtopk: threshold_lr); see its module in fastsae.activations.
    """

    def __init__(self, d_in: int, n_latents: int, activation: str = "relu", k=None, *,
                 decoder_norm: str = "forward", init: str | None = None,
                 init_encoder_as_decoder_transpose: bool = False, d_out: int | None = None, skip: bool = False,
                 metadata: dict | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, **params):
        super().__init__()
        spec = SAESpec.create(d_in, n_latents, activation, k=k, params=params, decoder_norm=decoder_norm,
                              init=init, init_encoder_as_decoder_transpose=init_encoder_as_decoder_transpose,
                              d_out=d_out, skip=skip)
        self._build(spec, spec.n_latents, metadata, dtype, device)
        self.reset_parameters()

    @classmethod
    def from_spec(cls, spec: SAESpec, *, metadata: dict | None = None, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> "E2ESAE":
        """A new SAE of ``spec``, drawn from its init (device "meta": parameters not allocated)."""
        return cls(spec.d_in, spec.n_latents, spec.activation, decoder_norm=spec.decoder_norm, init=spec.init,
                   init_encoder_as_decoder_transpose=spec.init_encoder_as_decoder_transpose, d_out=spec.d_out,
                   skip=spec.skip, metadata=metadata, dtype=dtype, device=device, **spec.hyperparameters())

    def _build(self, spec: SAESpec, n_rows: int, metadata, dtype, device) -> None:
        """The parameters of ``spec`` for ``n_rows`` latents (all of them, or a shard's block)."""
        self.spec = spec
        self.activation_fn = spec.kind(spec.params)
        self.metadata = dict(metadata or {})
        factory = {"dtype": dtype, "device": device}
        # W_enc is stored as an [n_latents, d_in] buffer and exposed as its transpose, the public
        # [d_in, n_latents] Parameter: each latent's weights are one contiguous row, which the
        # encoders' backward gathers (grad_x reads k rows per token) and the forward GEMM reads
        # as its K-major operand. Optimizers, state_dict / load_state_dict, .to() and
        # from_pretrained keep these strides; save_pretrained writes the contiguous SAELens layout.
        self.W_enc = nn.Parameter(torch.empty(n_rows, spec.d_in, **factory).t())
        self.b_enc = nn.Parameter(torch.zeros(n_rows, **factory))
        self.W_dec = nn.Parameter(torch.empty(n_rows, spec.d_out, **factory))
        self.b_dec = nn.Parameter(torch.zeros(spec.d_out, **factory))
        # a skip-transcoder's affine path, replicated on every shard as b_dec is
        self.W_skip = nn.Parameter(torch.zeros(spec.d_in, spec.d_out, **factory)) if spec.skip else None
        for name, extra in self.activation_fn.extra_tensors.items():
            value = torch.empty((n_rows,) if extra.per_latent else (), device=device,
                                dtype=torch.float32 if extra.fp32 else dtype)
            if extra.trainable:
                setattr(self, name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw the parameters of ``self.init`` (see the class docstring) from torch's RNG and set
        the activation's tensors to their initial values.

        Everything is drawn in fp32 and cast, so an init does not depend on the SAE's dtype.
        """
        if self.W_dec.is_meta:  # built on "meta" to be filled in (from_record, to_empty)
            return
        for name, value in zip(("W_enc", "b_enc", "W_dec", "b_dec"), draw_init(self.spec, device=self.W_dec.device)):
            getattr(self, name).copy_(value)
        if self.W_skip is not None:
            self.W_skip.zero_()
        self._fill_extra_tensors()

    @torch.no_grad()
    def _fill_extra_tensors(self) -> None:
        for name, extra in self.activation_fn.extra_tensors.items():
            getattr(self, name).fill_(extra.fill(self.spec.params))

    # ----------------------------------------------------------------------------------------
    # what the spec defines, as attributes

    d_in = property(lambda self: self.spec.d_in)
    d_out = property(lambda self: self.spec.d_out, doc="the width it writes (d_in for an SAE)")
    skip = property(lambda self: self.spec.skip, doc="whether it has a skip-transcoder's affine path")
    n_latents = property(lambda self: self.spec.n_latents)
    activation = property(lambda self: self.spec.activation, doc="the activation's name")
    k = property(lambda self: self.spec.k)
    decoder_norm = property(lambda self: self.spec.decoder_norm)
    init = property(lambda self: self.spec.init)
    init_encoder_as_decoder_transpose = property(lambda self: self.spec.init_encoder_as_decoder_transpose)

    @property
    def hook_in(self) -> str | None:
        """The hook it reads (metadata["hook"]; for a transcoder, its IN), None where not recorded."""
        hook = self.metadata.get("hook")
        return None if hook is None else hook_in_out(hook)[0]

    @property
    def hook_out(self) -> str | None:
        """The hook it writes: hook_in for an SAE, OUT for a transcoder "IN->OUT"."""
        hook = self.metadata.get("hook")
        return None if hook is None else hook_in_out(hook)[1]

    @property
    def is_transcoder(self) -> bool:
        """Whether it writes another activation than it reads: its hooks differ (metadata), or its
        spec says so (d_out != d_in, or a skip path)."""
        return self.spec.is_transcoder or self.hook_in != self.hook_out

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def cfg(self) -> SAEConfig:
        """The config under SAELens's / SAEBench's names (cfg.d_in, cfg.d_sae, cfg.hook_name, ...;
        fastsae.sae_config; a transcoder's as SAELens's TranscoderConfig: hook_name its IN, d_out,
        hook_name_out, hook_layer_out): one object per SAE, its SAE-decided fields refreshed at each read."""
        hook, out = self.hook_in, {}  # a transcoder: hook_name is IN, the *_out fields OUT (TranscoderConfig)
        if self.is_transcoder:
            out = {"d_out": self.d_out, "hook_name_out": self.hook_out, "hook_layer_out": hook_layer(self.hook_out)}
        neuronpedia = (self.metadata.get("release") or {}).get("neuronpedia")
        current = SAEConfig(self.metadata.get("model"), self.d_in, self.n_latents, hook, hook_layer(hook),
                            self.activation, self.spec.hyperparameters(), str(self.dtype).removeprefix("torch."),
                            str(self.device), neuronpedia_id=neuronpedia, **out)
        kept = self.__dict__.get("_saelens_cfg")  # not a module attribute: state_dict never sees it
        if kept is None:
            self.__dict__["_saelens_cfg"] = kept = current
        return kept.refresh(current)

    def extra_repr(self) -> str:
        params = "".join(f", {key}={value!r}" for key, value in self.spec.hyperparameters().items())
        coder = f", d_out={self.d_out}, skip={self.skip}" if self.spec.is_transcoder else ""
        return (f"d_in={self.d_in}, n_latents={self.n_latents}{coder}, activation={self.activation!r}{params}, "
                f"decoder_norm={self.decoder_norm!r}")

    # ----------------------------------------------------------------------------------------
    # where the latents are: all here. ShardedE2ESAE (fastsae.sharded) holds a block of them and
    # overrides these few methods with the collectives; everything else is shared. The training
    # paths (fastsae.activations.paths) read the SAE through them.

    n_local = property(lambda self: self.W_dec.shape[0], doc="the latents this module holds")
    latent_offset = 0  # the global id of its first latent
    shard_count = 1  # modules that together hold the whole dictionary

    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        """x as the encoders read it (a sharded SAE sums the shards' input gradients here)."""
        return x

    def sum_over_latents(self, partial: torch.Tensor) -> torch.Tensor:
        """A per-token sum over latents, from this module's latents to the whole SAE's."""
        return partial

    def gather_candidates(self, values: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Selection candidates of every module holding latents, side by side (rank order)."""
        return values, ids

    def local_code(self, code: SparseCode) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, local ids) of the entries of ``code`` this module decodes."""
        return code.values, code.indices

    def partial_bias(self) -> torch.Tensor:
        """The bias this module's partial reconstruction carries (b_dec; 0 on a shard)."""
        return self.b_dec

    def finish_reconstruction(self, partial: torch.Tensor) -> torch.Tensor:
        """The reconstruction from this module's partial one (with partial_bias added)."""
        return partial

    # ----------------------------------------------------------------------------------------
    # forward pass: the activation (fastsae.activations) owns the encoding and the training pass

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim == 0 or x.shape[-1] != self.d_in:
            raise ValueError(f"x must have last dimension d_in={self.d_in}, got shape {tuple(x.shape)}")
        if x.device != self.device:
            raise ValueError(f"x is on {x.device} but the SAE is on {self.device}; use x.to(sae.device)")
        if x.dtype != self.dtype:
            raise TypeError(f"x has dtype {x.dtype} but the SAE's parameters are {self.dtype}; "
                            "cast one to the other (x.to(sae.dtype) or sae.to(x.dtype))")

    def encode(self, x: torch.Tensor) -> torch.Tensor | SparseCode:
        """x [..., d_in] -> the code: a dense [..., n_latents] tensor for the elementwise
        activations (relu, jumprelu, batchtopk in eval mode), else a SparseCode [..., width]."""
        self._check_input(x)
        code = self.activation_fn.encode(self, x.reshape(-1, self.d_in))
        if isinstance(code, SparseCode):
            return SparseCode(*(t.reshape(*x.shape[:-1], t.shape[-1]) for t in code))
        return code.reshape(*x.shape[:-1], code.shape[-1])

    @torch.no_grad()
    def encode_sparse(self, x: torch.Tensor) -> SparseCode:
        """x [..., d_in] -> the active latents of each token as a SparseCode, for analysis.

        values, indices: [..., width]; a token with fewer active latents than the width is padded
        with value 0 at index 0 (``values > 0`` marks the real entries). Selection activations:
        their code as encode() gives it. Elementwise ones: width = the largest number of active
        latents of any token in x, entries in latent order; the code is compacted chunk by chunk of
        tokens (a running count per row places each entry, linear in the chunk), so no
        [N, n_latents] tensor is built. Not differentiable.
        """
        self._check_input(x)
        code = self.activation_fn.encode_sparse(self, x.reshape(-1, self.d_in))
        return SparseCode(*(t.reshape(*x.shape[:-1], t.shape[-1]) for t in code))

    def decoder_row_scale(self) -> torch.Tensor | None:
        """1 / ||W_dec[j]|| per latent in "forward" mode (differentiable), None in "project" mode."""
        if self.decoder_norm == "project":
            return None
        return self.W_dec.norm(dim=1).clamp_min(1e-8).reciprocal()

    def normalised_decoder(self) -> torch.Tensor:
        """W_dec as the forward pass uses it: rows divided by their norms ("forward"), or as stored."""
        scale = self.decoder_row_scale()
        return self.W_dec if scale is None else self.W_dec * scale.unsqueeze(1)

    def decode(self, code: torch.Tensor | SparseCode) -> torch.Tensor:
        """The code from ``encode`` -> the reconstruction [..., d_out] (a skip-transcoder's skip path
        reads x, which the code does not hold: forward() adds it, as add_skip(x, decode(code)))."""
        if isinstance(code, SparseCode):
            return paths.decode_code(self, code)
        if not isinstance(code, torch.Tensor):
            raise TypeError(f"code must be a tensor or a SparseCode, got {type(code).__name__}")
        if not self.activation_fn.code_is_dense(self):
            raise TypeError(f"this SAE's {self.activation} code is sparse here: decode expects the SparseCode "
                            "that encode returns")
        return self.finish_reconstruction(ops.dense_decode(code, self.normalised_decoder(), self.partial_bias()))

    def forward(self, x: torch.Tensor, return_code: bool = False):
        """The reconstruction of x, shaped like x (so the module drops into any hook).

        With return_code=True returns SAEOutput(reconstruction, code) from the same pass. Training
        uses training_forward(), which never builds a dense code.
        """
        code = self.encode(x)
        reconstruction = self.add_skip(x, self.decode(code))
        return SAEOutput(reconstruction, code) if return_code else reconstruction

    def add_skip(self, x: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """reconstruction + x @ W_skip for a skip-transcoder (else reconstruction as given): one
        addmm, whose GEMM epilogue adds the reconstruction, so no separate pass over the tokens."""
        if self.W_skip is None:
            return reconstruction
        flat = torch.addmm(reconstruction.reshape(-1, self.d_out), x.reshape(-1, self.d_in), self.W_skip)
        return flat.reshape(*x.shape[:-1], self.d_out)

    def training_forward(self, x: torch.Tensor, p: float | None = None, *,
                         settings: TrainingSettings | None = None, target: torch.Tensor | None = None) -> SAEForward:
        """The reconstruction and the loss terms training needs, from the activation's training pass.

        p: the Lp norm of the sparsity term (loss.sparsity_p, default 1), for the activations that use it;
        settings: what the run gives the pass (fastsae.activations.TrainingSettings: p, the loss
        coefficients, the dead latents for AuxK), instead of p.
        target: what the reconstruction must match, [..., d_out], for a transcoder (the output it
        replaces; an SAE's is x): the kinds' own reconstruction terms (AuxK's residual, Matryoshka's
        prefix MSEs) read it, less the skip path. A transcoder's pass without one refuses those
        terms. The pass is the activation's (fastsae.activations): a fused one (relu_autoencode, or topk_encode + sparse_decode) where it
        has one, no [N, n_latents] code in forward or backward, else the chunked dense reference.
        Returns SAEForward (reconstruction shaped like x, mean L0, each latent's active tokens, the
        SparseCode if any, the named loss terms); the activation's new buffer values (its state) are
        written here, after the pass.
        """
        self._check_input(x)
        if settings is not None and p is not None:
            raise ValueError("give p or settings (which holds p), not both")
        settings = settings or TrainingSettings(p=1.0 if p is None else p)
        x2d = x.reshape(-1, self.d_in)
        settings = dataclasses.replace(settings, target=self._residual_target(x, x2d, target))
        out = self.activation_fn.training_forward(self, x2d, settings)
        if out.state:
            self._write_state(out.state)
        shape = (*x.shape[:-1], self.d_out)
        reconstructions = {name: (self.add_skip(x2d, value).reshape(shape), weight)
                           for name, (value, weight) in (out.reconstructions or {}).items()}
        return out._replace(reconstruction=self.add_skip(x2d, out.reconstruction).reshape(shape),
                            reconstructions=reconstructions)

    def _residual_target(self, x: torch.Tensor, x2d: torch.Tensor, target: torch.Tensor | None):
        """TrainingSettings.target for a pass on x: None for an SAE without a target (the kinds
        read x); else a function giving the target [N, d_out] less the skip path (its GEMM is run
        only if a kind asks), or, for a transcoder without a target, one that refuses by name."""
        if target is None:
            if not self.is_transcoder:
                return None

            def missing():
                raise ValueError(f"this transcoder ({self.metadata.get('hook', 'd_out=' + str(self.d_out))}) was asked "
                                 "for a loss term that compares its output with its target (AuxK, Matryoshka's "
                                 "prefix MSEs): call training_forward(x, target=<the activation it replaces>)")
            return missing
        if not isinstance(target, torch.Tensor) or tuple(target.shape) != (*x.shape[:-1], self.d_out):
            got = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
            raise ValueError(f"target must be a tensor of shape {(*x.shape[:-1], self.d_out)} (x's tokens by "
                             f"d_out={self.d_out}), got {got}")
        target2d = target.reshape(-1, self.d_out).to(self.dtype)
        if self.W_skip is None:
            return lambda: target2d
        return functools.cache(lambda: torch.addmm(target2d, x2d, self.W_skip, alpha=-1))

    @torch.no_grad()
    def _write_state(self, state: dict) -> None:
        """Write the activation's new buffer values; only its own non-trainable tensors may change."""
        extras = self.activation_fn.extra_tensors
        for name, value in state.items():
            if name not in extras or extras[name].trainable:
                raise ValueError(f"activation {self.activation!r} returned state {name!r}, which is not one of "
                                 f"its buffers {[n for n, e in extras.items() if not e.trainable]}")
            getattr(self, name).copy_(value)

    # ----------------------------------------------------------------------------------------
    # "project" mode helpers

    @torch.no_grad()
    def project_decoder_(self) -> None:
        """Scale every stored decoder row to unit norm (call after the optimizer step)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_decoder_parallel_grad_(self) -> None:
        """Drop the part of W_dec.grad along each (unit) row, which the projection would undo."""
        if self.W_dec.grad is None:
            return
        along = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
        self.W_dec.grad.sub_(along * self.W_dec)

    # ----------------------------------------------------------------------------------------
    # save / load: facades over fastsae.formats, through SAE records

    def tensor_names(self) -> tuple[str, ...]:
        """The tensors that define this SAE: W_enc, b_enc, W_dec, b_dec, a skip-transcoder's W_skip
        and the activation's."""
        skip = ("W_skip",) if self.spec.skip else ()
        return ("W_enc", "b_enc", "W_dec", "b_dec", *skip, *self.activation_fn.extra_tensors)

    def latent_dim(self, name: str) -> int | None:
        """The dimension along which tensor ``name`` holds latents (None: it holds none)."""
        if name in ("W_enc",):
            return 1
        if name in ("b_enc", "W_dec"):
            return 0
        extra = self.activation_fn.extra_tensors.get(name)
        return 0 if extra is not None and extra.per_latent else None

    def to_record(self) -> SAERecord:
        """The SAE as fastsae.formats writes it (tensors detached, on their device)."""
        return SAERecord(self.spec, {name: getattr(self, name).detach() for name in self.tensor_names()},
                         dict(self.metadata), self.dtype)

    @classmethod
    def from_record(cls, record: SAERecord, *, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> "E2ESAE":
        """The SAE of a record, on ``device`` (default cpu) in ``dtype`` (default: the saved one)."""
        dtype = dtype or record.dtype
        sae = cls.from_spec(record.spec, metadata=record.metadata, dtype=dtype, device="meta")
        sae = sae.to_empty(device=device or "cpu")
        with torch.no_grad():
            for name in sae.tensor_names():
                target = getattr(sae, name)
                expected = tuple(target.shape)
                if tuple(record.tensors[name].shape) != expected:
                    raise ValueError(f"{record.source}: {name} has shape {tuple(record.tensors[name].shape)}, "
                                     f"but the SAE's spec implies {expected}")
                target.copy_(record.tensors[name].to(device=target.device, dtype=target.dtype))
        return sae

    def save_pretrained(self, directory: str | os.PathLike, format: str = "fastsae") -> Path:
        """Write the SAE to ``directory``: format "fastsae" (cfg.json + sae_weights.safetensors, each
        written atomically), "saelens" or "sparsify" (see fastsae.formats for the conversions)."""
        return formats.save(self.to_record(), directory, format)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, hook: str | None = None, *, sae_id: str | None = None,
                        revision: str | None = None, device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None) -> "E2ESAE":
        """Load an SAE (optionally onto another device or dtype) from any of the formats that
        fastsae.formats reads, detected from the files: a fastsae, SAELens or sparsify directory,
        a fastsae run (its latest checkpoint) or checkpoint directory, a sparsify run, an e2e_sae
        run directory or `samples_<N>.pt` file. ``hook`` picks the SAE where the path holds several.

        A released SAE by name (fastsae.formats.releases: SAELens's registry and fastsae's):
        from_pretrained(RELEASE, sae_id=ID), or the string "RELEASE:ID" where no file has that
        name; its files come from the Hugging Face cache or hub, at ``revision`` if given."""
        named = None if sae_id is not None else releases.split_release_name(path)
        if sae_id is not None or named is not None:
            release, sae_id = (str(path), sae_id) if named is None else named
            record = releases.load_release(release, sae_id, hook=hook, revision=revision)
        elif revision is not None:
            raise ValueError("revision is for released SAEs (from_pretrained(RELEASE, sae_id=ID, revision=...)); "
                             f"{path} is read as a local path")
        elif isinstance(path, str) and ":" in path and not Path(path).exists():
            raise FileNotFoundError(f"no SAE file or directory at {path}, and {path.split(':')[0]!r} names no "
                                    "release (`fastsae releases` lists them)")
        else:
            record = formats.load(path, hook)
        return cls.from_record(record, device=device, dtype=dtype)


def load_run(path: str | os.PathLike, *, device: torch.device | str | None = None,
             dtype: torch.dtype | None = None) -> dict[str, E2ESAE]:
    """{hook: E2ESAE}: the SAEs of a run's latest checkpoint (or of any path holding several SAEs:
    a checkpoint directory, a `fastsae export` output, a sparsify run, an e2e_sae checkpoint)."""
    return {hook: E2ESAE.from_record(record, device=device, dtype=dtype)
            for hook, record in formats.load_all(path).items()}
