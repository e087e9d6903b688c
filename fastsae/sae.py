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
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from fastsae import ops
from fastsae._files import atomic_write, atomic_write_text, read_json_object
from fastsae.ops._checks import check_k

ACTIVATIONS = ("relu", "topk")
DECODER_NORMS = ("forward", "project")
INITS = ("paper", "topk", "orthogonal")
DEFAULT_INITS = {"relu": "paper", "topk": "topk"}  # each activation's field convention
CONFIG_NAME = "cfg.json"
WEIGHTS_NAME = "sae_weights.safetensors"
# fastsae's cfg.json names this as its "architecture", for SAELens's sake (see fastsae.formats).
SAELENS_REFUSAL = ("fastsae.E2ESAE: not a SAELens SAE; convert it with "
                   "E2ESAE.save_pretrained(path, format='saelens') or `fastsae export`")
_PARAMETER_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")
_CONFIG_KEYS = {"format", "fastsae_version", "d_in", "n_latents", "activation", "k", "decoder_norm",
                "dtype", "metadata", "architecture", "apply_b_dec_to_input", "normalize_activations"}


class SparseCode(NamedTuple):
    """A TopK code: the k active latents per token, largest first. Never densified in training."""

    values: torch.Tensor  # [..., k], >= 0
    indices: torch.Tensor  # [..., k], int64

    def to_dense(self, n_latents: int) -> torch.Tensor:
        """The [..., n_latents] dense code (for analysis; memory grows with n_latents). Entries are
        added, so padding (value 0, as encode_sparse writes it) never overwrites a real entry."""
        dense = self.values.new_zeros(*self.values.shape[:-1], n_latents)
        return dense.scatter_add_(-1, self.indices, self.values)


class SAEOutput(NamedTuple):
    reconstruction: torch.Tensor
    code: torch.Tensor | SparseCode


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or a ValueError naming the file when it is not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is corrupt or not a safetensors file ({error})") from None

# Latents per chunk when a block of an init is drawn (draw_init with rows=): the whole draw streams
# through memory this many rows at a time (64 MiB of fp32 at d_in = 2,048).
INIT_CHUNK_ROWS = 8192


@torch.no_grad()
def draw_init(init: str, d_in: int, n_latents: int, *, rows: range | None = None, device=None, out=None,
              decoder_norm: str = "forward", init_encoder_as_decoder_transpose: bool = False,
              chunk_rows: int = INIT_CHUNK_ROWS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fp32 parameters an E2ESAE's ``init`` draws from torch's RNG: (W_enc [d_in, n], b_enc [n],
    W_dec [n, d_in], b_dec [d_in]) for the latents in ``rows`` (all of them by default; n = len(rows)).

    A block (``rows`` given, on the CPU) makes the whole SAE's draws in the same order and keeps
    only its latents, streaming the draws ``chunk_rows`` latents at a time, so a process of a
    sharded run never holds the whole dictionary, and the RNG ends where the whole init leaves it.
    The block is exactly the whole init's rows, except the orthogonal decoder of the "paper" and
    "orthogonal" inits: nn.init.orthogonal_ is the Q of a QR of the whole [n_latents, d_in]
    Gaussian draw A, which a block gets as its rows of A R^-1 with R the Cholesky factor of A^T A
    (accumulated in float64): the same matrix to fp32 rounding.

    The draws run on ``device`` (whose RNG they use); the results are kept on ``out`` (default:
    ``device``), so a block drawn on the CPU for a GPU never sits whole in host memory either.
    """
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
    b_dec = torch.zeros(d_in, device=out)
    if init == "topk":
        # encoder = nn.Linear(d_in, n_latents) (weight [n_latents, d_in]); decoder = its rows
        encoder_t = stream(n_latents, d_in, uniform(encoder_bound), keep_rows=rows)
        decoder = encoder_t / encoder_t.norm(dim=1, keepdim=True).clamp_min(1e-8)
        encoder = encoder_t.t()
    else:
        # orthogonal_ on the [n_latents, d_in] matrix, as the paper's code gives it to the
        # transpose of its [d_in, n_latents] decoder weight: orthonormal columns when
        # n_latents >= d_in, so each row has norm ~sqrt(d_in / n_latents).
        if whole or n_latents < d_in:  # (fewer latents than d_in: orthogonal_ works on the transpose)
            decoder = torch.empty(n_latents, d_in, device=device)
            nn.init.orthogonal_(decoder)
            decoder = decoder[start:stop].to(out)
        else:
            gram = torch.zeros(d_in, d_in, dtype=torch.float64, device=device)

            def accumulate(block):  # A^T A: fp32 products per chunk, summed in float64
                gram.add_((block.t() @ block).double())

            draws = stream(n_latents, d_in, lambda t: t.normal_(0, 1), keep_rows=rows, each=accumulate)
            upper = torch.linalg.cholesky(gram, upper=True)  # A = Q R with diag(R) > 0, as orthogonal_'s
            # R is well conditioned (A^T A ~ n_latents * I): solving in fp32 keeps fp32 rounding
            decoder = torch.linalg.solve_triangular(upper.float().to(out), draws, upper=True, left=False)
        encoder = stream(d_in, n_latents, uniform(encoder_bound), keep_cols=rows)
        if init == "paper":  # the nn.Linear biases of the paper's encoder and decoder
            b_enc = stream(1, n_latents, uniform(encoder_bound), keep_cols=rows)[0]
            bound = 1.0 / math.sqrt(n_latents)
            b_dec = torch.empty(d_in, device=device).uniform_(-bound, bound).to(out)
        else:  # "orthogonal": unit-norm directions
            decoder = decoder / decoder.norm(dim=1, keepdim=True).clamp_min(1e-8)
    if init_encoder_as_decoder_transpose:
        encoder = (decoder / decoder.norm(dim=1, keepdim=True).clamp_min(1e-8)).t()
    if decoder_norm == "project":  # the forward pass uses the stored rows: make them unit
        decoder = decoder / decoder.norm(dim=1, keepdim=True).clamp_min(1e-8)
    return encoder, b_enc, decoder, b_dec


class E2ESAE(nn.Module):
    """A sparse autoencoder: code = act(x @ W_enc + b_enc), x_hat = code @ W_dec + b_dec.

    Args:
        d_in: width of the activations it reads (d_model for a residual-stream hook).
        n_latents: dictionary size.
        activation: "relu" (code is the dense ReLU output) or "topk" (code keeps the k largest
            ReLU pre-activations per token as a SparseCode).
        k: active latents per token, only and always for activation="topk".
        decoder_norm: "forward" (the paper's choice) or "project"; see the module docstring.
        init: how the parameters start, by name (see ``INITS``); None: "paper" for ReLU SAEs,
            "topk" for TopK SAEs. The name is recorded in ``metadata["init"]`` (saved in cfg.json).
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
        metadata: JSON-serialisable facts saved with the weights (hook name, model name, ...).
    """

    def __init__(self, d_in: int, n_latents: int, activation: str = "relu", k: int | None = None, *,
                 decoder_norm: str = "forward", init: str | None = None,
                 init_encoder_as_decoder_transpose: bool = False, metadata: dict | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
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
        if init is None:
            init = DEFAULT_INITS[activation]
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS} (or None for the activation's default), got {init!r}")
        self.d_in, self.n_latents, self.activation, self.k = d_in, n_latents, activation, k
        self.decoder_norm = decoder_norm
        self.init, self.init_encoder_as_decoder_transpose = init, init_encoder_as_decoder_transpose
        self.metadata = dict(metadata or {})
        factory = {"dtype": dtype, "device": device}
        # W_enc is stored as an [n_latents, d_in] buffer and exposed as its transpose, the public
        # [d_in, n_latents] Parameter: each latent's weights are one contiguous row, which the
        # encoders' backward gathers (grad_x reads k rows per token) and the forward GEMM reads
        # as its K-major operand. Optimizers, state_dict / load_state_dict, .to() and
        # from_pretrained keep these strides; save_pretrained writes the contiguous SAELens layout.
        self.W_enc = nn.Parameter(torch.empty(n_latents, d_in, **factory).t())
        self.b_enc = nn.Parameter(torch.zeros(n_latents, **factory))
        self.W_dec = nn.Parameter(torch.empty(n_latents, d_in, **factory))
        self.b_dec = nn.Parameter(torch.zeros(d_in, **factory))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw the parameters of ``self.init`` (see the class docstring) from torch's RNG.

        Everything is drawn in fp32 and cast, so an init does not depend on the SAE's dtype.
        """
        if self.W_dec.is_meta:  # from_pretrained builds on "meta" and fills in the saved weights
            return
        W_enc, b_enc, W_dec, b_dec = draw_init(
            self.init, self.d_in, self.n_latents, device=self.W_dec.device, decoder_norm=self.decoder_norm,
            init_encoder_as_decoder_transpose=self.init_encoder_as_decoder_transpose)
        self.W_enc.copy_(W_enc)
        self.b_enc.copy_(b_enc)
        self.W_dec.copy_(W_dec)
        self.b_dec.copy_(b_dec)
        self.metadata["init"] = self.init

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

    @torch.no_grad()
    def encode_sparse(self, x: torch.Tensor) -> SparseCode:
        """x [..., d_in] -> the active latents of each token as a SparseCode, for analysis.

        values, indices: [..., width], largest value first; a token with fewer active latents than
        the width is padded with value 0 at index 0 (so ``values > 0`` marks the real entries).
        TopK: width k. ReLU: width = the largest number of active latents of any token in x. No
        [N, n_latents] tensor is built: the ReLU code is compacted chunk by chunk of tokens.
        Not differentiable.
        """
        self._check_input(x)
        if self.activation == "topk":
            return SparseCode(*ops.topk_encode(x, self.W_enc, self.b_enc, self.k))
        from fastsae.ops._checks import chunk_rows

        x2d = x.reshape(-1, self.d_in)
        chunks = []
        for start in range(0, x2d.shape[0], chunk_rows(self.n_latents)):
            acts = ops.relu_encode(x2d[start:start + chunk_rows(self.n_latents)], self.W_enc, self.b_enc)
            width = max(1, int((acts > 0).sum(-1).max())) if acts.numel() else 1
            chunks.append(acts.topk(width, dim=-1))
        width = max((v.shape[-1] for v, _ in chunks), default=1)
        values = x2d.new_zeros(x2d.shape[0], width)
        indices = torch.zeros(x2d.shape[0], width, dtype=torch.int64, device=x.device)
        row = 0
        for chunk_values, chunk_indices in chunks:
            rows, w = chunk_values.shape
            kept = chunk_values > 0
            values[row:row + rows, :w] = torch.where(kept, chunk_values, 0)
            indices[row:row + rows, :w] = torch.where(kept, chunk_indices, 0)
            row += rows
        return SparseCode(values.reshape(*x.shape[:-1], width), indices.reshape(*x.shape[:-1], width))

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
            # For SAELens, which reads this file name too: no SAELens architecture has this name,
            # so SAELens refuses the directory (also with n_latents renamed d_sae) instead of
            # loading it wrong; the other two are right for both whatever SAELens is told.
            "architecture": SAELENS_REFUSAL,
            "apply_b_dec_to_input": False,
            "normalize_activations": "none",
        }

    def save_pretrained(self, directory: str | os.PathLike, format: str = "fastsae") -> Path:
        """Write the SAE to ``directory``: format "fastsae" (cfg.json + sae_weights.safetensors, each
        written atomically), "saelens" or "sparsify" (see fastsae.formats for the conversions)."""
        from safetensors.torch import save_file

        if format != "fastsae":
            from fastsae import formats

            return formats.save(self, directory, format)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: getattr(self, name).detach().contiguous().cpu() for name in _PARAMETER_NAMES}
        atomic_write(directory / WEIGHTS_NAME, lambda path: save_file(tensors, str(path)))
        config_text = json.dumps(self.config(), indent=2)
        atomic_write_text(directory / CONFIG_NAME, config_text)
        return directory

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, hook: str | None = None, *,
                        device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "E2ESAE":
        """Load an SAE (optionally onto another device or dtype) from any of the formats that
        fastsae.formats reads, detected from the files: a fastsae, SAELens or sparsify directory,
        a fastsae run (its latest checkpoint) or checkpoint directory, a sparsify run, an e2e_sae
        run directory or samples_<N>.pt file. ``hook`` picks the SAE where the path holds several."""
        from fastsae import formats

        return formats.load(path, hook, device=device, dtype=dtype)

    @classmethod
    def _load_fastsae(cls, directory: str | os.PathLike, *, device: torch.device | str | None = None,
                      dtype: torch.dtype | None = None) -> "E2ESAE":
        """Load a directory written by save_pretrained in fastsae's own format."""

        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"no SAE directory at {directory}")
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{directory} has no {path.name}: not a saved E2ESAE")
        config = read_json_object(config_path)
        unknown = set(config) - _CONFIG_KEYS
        if unknown:
            raise ValueError(f"{config_path} has unknown keys {sorted(unknown)}; expected {sorted(_CONFIG_KEYS)}")
        tensors = load_safetensors(weights_path)
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
