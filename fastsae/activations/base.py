"""What every SAE activation shares: the code types, the hyperparameter checks and the base class.

An activation turns the encoder's pre-activations pre = x @ W_enc + b_enc into the code. The kinds
fastsae trains fall into two families, and E2ESAE runs each family through one fused path:

- elementwise: code_j = relu(pre_j) * (pre_j > theta_j), theta the activation's per-latent
  threshold (None: plain ReLU). Trained through fastsae.ops.relu_autoencode, which never builds the
  [N, n_latents] code (ReLU, JumpReLU, and BatchTopK at inference).
- selection: a choice among each token's largest ReLU pre-activations, made from per-token
  candidates that fastsae.ops.topk_encode emits and decoded by fastsae.ops.sparse_decode (TopK,
  and BatchTopK while it trains).

A subclass says which family it is in (per mode: training or not), gives its threshold or its
selection, its extra per-latent tensors, its sparsity term, and how it maps to SAELens and sparsify
files. Everything else (parameters, init, sharding, save/load, training) is shared.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, ClassVar, NamedTuple

import torch


class SparseCode(NamedTuple):
    """A sparse code: per token, the active latents' values and ids.

    TopK: exactly k per token, largest first. Elsewhere a row may hold padding: value 0 at some id
    (``values > 0`` marks the real entries). Never densified in training.
    """

    values: torch.Tensor  # [..., width], >= 0
    indices: torch.Tensor  # [..., width], int64

    def to_dense(self, n_latents: int) -> torch.Tensor:
        """The [..., n_latents] dense code (for analysis; memory grows with n_latents). Entries are
        added, so padding (value 0) never overwrites a real entry."""
        dense = self.values.new_zeros(*self.values.shape[:-1], n_latents)
        return dense.scatter_add_(-1, self.indices, self.values)


class SAEForward(NamedTuple):
    """One training pass of an SAE (E2ESAE.training_forward): what the losses and metrics need.

    reconstruction: shaped like the input. sparsity: the activation's sparsity term (differentiable;
    the trainer multiplies it by loss.sparsity_coeff). l0: active latents per token, mean (detached).
    fire_counts: int32 [latents held here], the tokens each latent is active on. code: the SparseCode
    where the pass made one (selection), else None (the elementwise path never builds a code).
    """

    reconstruction: torch.Tensor
    sparsity: torch.Tensor
    l0: torch.Tensor
    fire_counts: torch.Tensor
    code: SparseCode | None


@dataclass(frozen=True)
class ExtraTensor:
    """A tensor an activation adds to the SAE beside W_enc, b_enc, W_dec and b_dec.

    per_latent: shape [n_latents] (split with the latents when sharded) or a scalar (replicated).
    trainable: an nn.Parameter (in the optimizer) or a buffer (saved, not trained).
    fill: the initial value of every entry, from the activation's hyperparameters.
    fp32: kept in fp32 whatever the SAE's dtype (a running statistic that bf16 would freeze).
    """

    per_latent: bool
    trainable: bool
    fill: Callable[[object], float]
    fp32: bool = False


@dataclass(frozen=True)
class NoParams:
    """An activation without hyperparameters."""

    def validate(self, n_latents: int | None) -> None:
        pass


def check_number(name: str, value, *, integer: bool = False, low: float | None = None,
                 high: float | None = None, low_open: bool = False, high_name: str = "n_latents") -> None:
    """A hyperparameter check whose message names the hyperparameter and the allowed range
    (high: an upper bound named high_name, e.g. k <= n_latents)."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise TypeError(f"{name} must be {'an int' if integer else 'a number'}, got {type(value).__name__}: {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        left = "" if low is None else f"{'(' if low_open else '['}{low:g}, "
        right = "inf)" if high is None else f"{high_name}={high:g}]" if high_name else f"{high:g}]"
        raise ValueError(f"{name} must be in {left}{right}, got {name}={value!r}")


def power_sum(code: torch.Tensor, p: float) -> torch.Tensor:
    """sum_j code_j^p over the last dimension of a code (entries >= 0), in at least fp32, with a
    zero gradient at zero entries (x^p has no finite slope at 0 for p < 1)."""
    code = code.to(torch.promote_types(code.dtype, torch.float32))
    if p == 1:
        return code.sum(-1)
    positive = code > 0
    return torch.where(positive, code.where(positive, torch.ones_like(code)).pow(p), 0).sum(-1)


def lp_norm_term(lp_sum: torch.Tensor, p: float, d_in: int) -> torch.Tensor:
    """The paper's sparsity term from per-token sums of |code|^p: mean over tokens of
    (sum_j |code_j|^p)^(1/p), divided by d_in. A token with an all-zero code contributes 0 with a
    zero gradient (the power's slope at 0 is not used)."""
    if p == 1:
        return lp_sum.mean() / d_in
    positive = lp_sum > 0
    return torch.where(positive, lp_sum.where(positive, torch.ones_like(lp_sum)).pow(1.0 / p), 0).mean() / d_in


class Activation:
    """Base class of the activations in the registry (fastsae.activations.ACTIVATIONS).

    Class attributes a subclass sets:
        name: the registry name (config saes.activation, cfg.json "activation").
        Params: a frozen dataclass of hyperparameters with a validate(n_latents) method (n_latents
            None where it is not known yet, e.g. while a config is read).
        default_init: the E2ESAE init its SAEs get unless told otherwise.
        extra_tensors: name -> ExtraTensor, the tensors it adds to the SAE.
        sparsity_uses_p: whether its sparsity term is the Lp norm of loss.sparsity_p.
        sparsify_refusal: why sparsify cannot store it (None: it can; TopK only).
        saelens_architectures: the SAELens architectures it reads (see fastsae.formats.saelens).
        saelens_tensors: the tensors of a SAELens file it reads beside W_enc, b_enc, W_dec, b_dec.
        example_params: hyperparameters of a small SAE whose every code path is exercised (the
            conformance tests and the documentation use them).
    And dense_forward: the activation as a plain dense function of the pre-activations, the
    naive form its fused path is tested against.
    """

    name: ClassVar[str]
    Params: ClassVar[type] = NoParams
    default_init: ClassVar[str] = "paper"
    extra_tensors: ClassVar[dict[str, ExtraTensor]] = {}
    sparsity_uses_p: ClassVar[bool] = True
    sparsify_refusal: ClassVar[str | None] = "sparsify stores TopK SAEs only"
    saelens_architectures: ClassVar[tuple[str, ...]] = ()
    saelens_tensors: ClassVar[tuple[str, ...]] = ()
    example_params: ClassVar[dict] = {}

    def __init__(self, params):
        self.params = params

    @classmethod
    def make_params(cls, values: dict, n_latents: int | None = None):
        """Params from a {name: value} dict, checked; unknown names are refused by name."""
        fields = {f.name for f in dataclasses.fields(cls.Params)}
        unknown = sorted(set(values) - fields)
        if unknown:
            allowed = ", ".join(sorted(fields)) or "none"
            raise ValueError(f"activation {cls.name!r} has no hyperparameter {unknown[0]!r}; its hyperparameters: "
                             f"{allowed}")
        try:
            params = cls.Params(**values)
        except TypeError as error:  # a required hyperparameter is missing
            missing = [f.name for f in dataclasses.fields(cls.Params)
                       if f.name not in values and f.default is dataclasses.MISSING]
            raise ValueError(f"{', '.join(missing) or error} is required for activation {cls.name!r}") from None
        params.validate(n_latents)
        return params

    # ---------------------------------------------------------------- the function

    @classmethod
    def selects(cls, training: bool) -> bool:
        """True: the selection family in this mode (topk_encode candidates + select); False: the
        elementwise family (relu_autoencode with threshold())."""
        return False

    def threshold(self, sae) -> torch.Tensor | None:
        """Elementwise family: the per-latent threshold theta [latents held here], differentiable
        where it is trained, or None (ReLU)."""
        return None

    @property
    def bandwidth(self) -> float | None:
        """The straight-through estimator's bandwidth for a trained threshold (None: not trained)."""
        return None

    def candidates(self, n_latents: int) -> int:
        """Selection family: the candidates per token the encoder keeps for select()."""
        raise NotImplementedError(f"{self.name} is not a selection activation")

    def select(self, values: torch.Tensor, indices: torch.Tensor, sae, training: bool) -> SparseCode | None:
        """Selection family: the code from each token's candidates (values [N, width] >= 0, each
        shard's block sorted largest first, indices global ids). None asks for wider candidates:
        a selection must never silently miss a latent it should keep."""
        raise NotImplementedError(f"{self.name} is not a selection activation")

    def dense_forward(self, pre: torch.Tensor, sae, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The naive form: (code [N, n_latents], l0 [N]) from the pre-activations [N, n_latents],
        differentiable as the fused path is (the straight-through estimators included). The spec
        the fused paths are tested against; memory grows with N x n_latents."""
        raise NotImplementedError

    def sparsity_term(self, lp_sum: torch.Tensor, l0: torch.Tensor, p: float, d_in: int) -> torch.Tensor:
        """The sparsity term from per-token sums: lp_sum = sum_j |code_j|^p and l0 = active latents
        (differentiable where the activation trains its threshold). Default: the paper's Lp term."""
        return lp_norm_term(lp_sum, p, d_in)

    # ---------------------------------------------------------------- files

    @classmethod
    def reads_saelens(cls, config: dict) -> bool:
        """Whether a SAELens cfg.json describes this activation."""
        return config.get("architecture", "standard") in cls.saelens_architectures

    @classmethod
    def from_saelens(cls, config: dict, tensors: dict, where: str) -> tuple[dict, dict]:
        """({hyperparameter: value}, {extra tensor name: float64 tensor}) from a SAELens SAE whose
        W_enc, b_enc, W_dec are already in fastsae's convention. `tensors` holds the file's other
        tensors too; a subclass takes what it reads and refuses what it does not know."""
        return {}, {}

    def to_saelens(self, tensors: dict) -> tuple[str, dict, dict]:
        """(architecture, cfg.json entries, {file tensor name: tensor}) of the SAELens file of an SAE
        whose tensors (fastsae's names, float64) are ``tensors``."""
        raise NotImplementedError
