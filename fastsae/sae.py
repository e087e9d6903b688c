"""E2ESAE: the sparse autoencoder module (ReLU or TopK) that fastsae splices into a model.

Parameters follow SAELens / TransformerLens conventions so SAEs move between tools:
W_enc [d_in, n_latents], b_enc [n_latents], W_dec [n_latents, d_in], b_dec [d_in].

Decoder rows have unit norm, in one of two ways (``decoder_norm``):
- "forward" (default, as in the paper's code): the forward pass uses W_dec's rows divided by
  their norms; the stored weight is never edited, which keeps Adam's moments consistent. The
  division is folded into the code (TopK: k values per token) or into a normalized copy of W_dec
  (ReLU), never into an [N, n_latents, d_in] tensor.
- "project" (as OpenAI's and EleutherAI's TopK SAEs): the stored rows are kept unit norm. The
  trainer calls ``remove_decoder_parallel_grad_()`` before each optimizer step and
  ``project_decoder_()`` after it; the forward pass uses W_dec as stored.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from fastsae import ops
from fastsae.ops._checks import check_k

ACTIVATIONS = ("relu", "topk")
DECODER_NORMS = ("forward", "project")
CONFIG_NAME = "cfg.json"
WEIGHTS_NAME = "sae_weights.safetensors"
_PARAMETER_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")
_CONFIG_KEYS = {"format", "fastsae_version", "d_in", "n_latents", "activation", "k", "decoder_norm",
                "dtype", "metadata"}


class SparseCode(NamedTuple):
    """A TopK code: the k active latents per token, largest first. Never densified in training."""

    values: torch.Tensor  # [..., k], >= 0
    indices: torch.Tensor  # [..., k], int64

    def to_dense(self, n_latents: int) -> torch.Tensor:
        """The [..., n_latents] dense code (for analysis; memory grows with n_latents)."""
        dense = self.values.new_zeros(*self.values.shape[:-1], n_latents)
        return dense.scatter_(-1, self.indices, self.values)


class SAEOutput(NamedTuple):
    reconstruction: torch.Tensor
    code: torch.Tensor | SparseCode


class E2ESAE(nn.Module):
    """A sparse autoencoder: code = act(x @ W_enc + b_enc), x_hat = code @ W_dec + b_dec.

    Args:
        d_in: width of the activations it reads (d_model for a residual-stream hook).
        n_latents: dictionary size.
        activation: "relu" (code is the dense ReLU output) or "topk" (code keeps the k largest
            ReLU pre-activations per token as a SparseCode).
        k: active latents per token, only and always for activation="topk".
        decoder_norm: "forward" (the paper's choice) or "project"; see the module docstring.
        init_encoder_as_decoder_transpose: start W_enc as W_dec.T instead of the default
            nn.Linear-style uniform init.
        metadata: JSON-serialisable facts saved with the weights (hook name, model name, ...).
    """

    def __init__(self, d_in: int, n_latents: int, activation: str = "relu", k: int | None = None, *,
                 decoder_norm: str = "forward", init_encoder_as_decoder_transpose: bool = False,
                 metadata: dict | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        for name, value in (("d_in", d_in), ("n_latents", n_latents)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if activation == "topk":
            if k is None:
                raise ValueError("k is required for activation='topk' (active latents per token)")
            check_k(k, n_latents)
        elif k is not None:
            raise ValueError(f"k is only for activation='topk'; got k={k!r} with activation={activation!r}")
        if decoder_norm not in DECODER_NORMS:
            raise ValueError(f"decoder_norm must be one of {DECODER_NORMS}, got {decoder_norm!r}")
        self.d_in, self.n_latents, self.activation, self.k = d_in, n_latents, activation, k
        self.decoder_norm = decoder_norm
        self.metadata = dict(metadata or {})
        factory = {"dtype": dtype, "device": device}
        self.W_enc = nn.Parameter(torch.empty(d_in, n_latents, **factory))
        self.b_enc = nn.Parameter(torch.zeros(n_latents, **factory))
        self.W_dec = nn.Parameter(torch.empty(n_latents, d_in, **factory))
        self.b_dec = nn.Parameter(torch.zeros(d_in, **factory))
        self.reset_parameters(init_encoder_as_decoder_transpose)

    @torch.no_grad()
    def reset_parameters(self, init_encoder_as_decoder_transpose: bool = False) -> None:
        # The paper's orthogonal decoder init: W_dec.T [d_in, n_latents] gets orthonormal rows
        # (computed in fp32, then cast); rows of W_dec are then scaled to unit norm.
        if self.W_dec.is_meta:  # from_pretrained builds on "meta" and fills in the saved weights
            return
        decoder_t = torch.empty(self.d_in, self.n_latents, dtype=torch.float32, device=self.W_dec.device)
        nn.init.orthogonal_(decoder_t)
        decoder = decoder_t.t()
        decoder = decoder / decoder.norm(dim=1, keepdim=True).clamp_min(1e-8)
        self.W_dec.copy_(decoder)
        if init_encoder_as_decoder_transpose:
            self.W_enc.copy_(decoder.t())
        else:  # nn.Linear(d_in, n_latents)'s default: U(-1/sqrt(d_in), 1/sqrt(d_in))
            bound = 1.0 / math.sqrt(self.d_in)
            self.W_enc.uniform_(-bound, bound)
        self.b_enc.zero_()
        self.b_dec.zero_()

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def extra_repr(self) -> str:
        k = f", k={self.k}" if self.k is not None else ""
        return (f"d_in={self.d_in}, n_latents={self.n_latents}, activation={self.activation!r}{k}, "
                f"decoder_norm={self.decoder_norm!r}")

    # ----------------------------------------------------------------------------------------
    # forward pass

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
        """x [..., d_in] -> the code: ReLU activations [..., n_latents], or a SparseCode [..., k]."""
        self._check_input(x)
        if self.activation == "topk":
            return SparseCode(*ops.topk_encode(x, self.W_enc, self.b_enc, self.k))
        return ops.relu_encode(x, self.W_enc, self.b_enc)

    def decoder_row_scale(self) -> torch.Tensor | None:
        """1 / ||W_dec[j]|| per latent in "forward" mode (differentiable), None in "project" mode."""
        if self.decoder_norm == "project":
            return None
        return self.W_dec.norm(dim=1).clamp_min(1e-8).reciprocal()

    def decode(self, code: torch.Tensor | SparseCode) -> torch.Tensor:
        """The code from ``encode`` -> the reconstruction [..., d_in]."""
        scale = self.decoder_row_scale()
        if isinstance(code, SparseCode):
            values = code.values if scale is None else code.values * scale[code.indices]
            return ops.sparse_decode(values, code.indices, self.W_dec, self.b_dec)
        if not isinstance(code, torch.Tensor):
            raise TypeError(f"code must be a tensor or a SparseCode, got {type(code).__name__}")
        if self.activation == "topk":
            raise TypeError("this SAE is TopK: decode expects the SparseCode that encode returns")
        W_dec = self.W_dec if scale is None else self.W_dec * scale.unsqueeze(1)
        return ops.dense_decode(code, W_dec, self.b_dec)

    def forward(self, x: torch.Tensor, return_code: bool = False):
        """The reconstruction of x, shaped like x (so the module drops into any hook).

        With return_code=True returns SAEOutput(reconstruction, code) from the same pass, for
        training (the sparsity penalty needs the code).
        """
        code = self.encode(x)
        reconstruction = self.decode(code)
        return SAEOutput(reconstruction, code) if return_code else reconstruction

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
    # save / load

    def config(self) -> dict:
        from fastsae import __version__

        return {
            "format": "fastsae.E2ESAE",
            "fastsae_version": __version__,
            "d_in": self.d_in,
            "n_latents": self.n_latents,
            "activation": self.activation,
            "k": self.k,
            "decoder_norm": self.decoder_norm,
            "dtype": str(self.dtype).removeprefix("torch."),
            "metadata": self.metadata,
        }

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write cfg.json and sae_weights.safetensors to ``directory``, each atomically."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: getattr(self, name).detach().contiguous().cpu() for name in _PARAMETER_NAMES}
        _atomic_write(directory / WEIGHTS_NAME, lambda path: save_file(tensors, str(path)))
        config_text = json.dumps(self.config(), indent=2)
        _atomic_write(directory / CONFIG_NAME, lambda path: Path(path).write_text(config_text))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None) -> "E2ESAE":
        """Load an SAE written by save_pretrained (optionally onto another device or dtype)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"no SAE directory at {directory}")
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{directory} has no {path.name}: not a saved E2ESAE")
        try:
            config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{config_path} is not valid JSON ({error}); the checkpoint is corrupt") from None
        if not isinstance(config, dict):
            raise ValueError(f"{config_path} must hold a JSON object, got {type(config).__name__}")
        unknown = set(config) - _CONFIG_KEYS
        if unknown:
            raise ValueError(f"{config_path} has unknown keys {sorted(unknown)}; expected {sorted(_CONFIG_KEYS)}")
        try:
            tensors = load_file(str(weights_path))
        except (SafetensorError, OSError, ValueError) as error:
            raise ValueError(f"{weights_path} is corrupt or not a safetensors file ({error})") from None
        saved_dtype = getattr(torch, str(config.get("dtype", "float32")), None)
        if not isinstance(saved_dtype, torch.dtype):
            raise ValueError(f"{config_path}: unknown dtype {config.get('dtype')!r}")
        try:
            sae = cls(config["d_in"], config["n_latents"], config["activation"], config.get("k"),
                      decoder_norm=config.get("decoder_norm", "forward"), metadata=config.get("metadata"),
                      dtype=dtype or saved_dtype, device="meta")
        except KeyError as error:
            raise ValueError(f"{config_path} lacks the key {error.args[0]!r}") from None
        missing = [name for name in _PARAMETER_NAMES if name not in tensors]
        extra = sorted(set(tensors) - set(_PARAMETER_NAMES))
        if missing or extra:
            raise ValueError(f"{weights_path} must hold exactly {list(_PARAMETER_NAMES)}; "
                             f"missing {missing}, unexpected {extra}")
        for name in _PARAMETER_NAMES:
            expected = tuple(getattr(sae, name).shape)
            if tuple(tensors[name].shape) != expected:
                raise ValueError(f"{weights_path}: {name} has shape {tuple(tensors[name].shape)}, "
                                 f"but cfg.json implies {expected}")
        target = {"device": device or "cpu", "dtype": dtype or saved_dtype}
        sae = sae.to_empty(device=target["device"])
        with torch.no_grad():
            for name in _PARAMETER_NAMES:
                getattr(sae, name).copy_(tensors[name].to(**target))
        return sae


def _atomic_write(path: Path, write) -> None:
    """write(tmp_path) to a temporary file beside ``path``, then rename it over ``path``.

    A crash midway leaves the old file (or none) in place, never a half-written one.
    """
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
