"""What every SAE kind shares: the code types, a training pass's result, the hyperparameter checks
and the base class.

An activation (an SAE kind) turns the encoder's pre-activations pre = x @ W_enc + b_enc into the
code, and owns its training pass: E2ESAE.training_forward hands it the input, and it returns the
reconstruction with its named loss terms (SAEForward). A kind trains through one of three paths,
helpers in fastsae.activations.paths that it calls:

- elementwise: code_j = relu(pre_j) * (pre_j > theta_j), theta the kind's per-latent threshold
  (None: plain ReLU), through fastsae.ops.relu_autoencode, which never builds the [N, n_latents]
  code (ReLU, JumpReLU, and BatchTopK at inference);
- selection: a choice among each token's largest ReLU pre-activations, made from per-token
  candidates that fastsae.ops.topk_encode emits and decoded by fastsae.ops.sparse_decode (TopK,
  BatchTopK and Matryoshka BatchTopK while they train);
- the chunked dense reference (the default): the kind's dense_forward a chunk of tokens at a time,
  each chunk recomputed in backward, so no [N, n_latents] tensor lives beyond one chunk. A new kind
  trains through it on any device before anyone writes its fused path.

A subclass gives its hyperparameters, extra per-latent tensors, its dense form (the spec its
training pass is tested against), its loss terms, its memory for `fastsae plan`, and its SAELens /
sparsify mappings. Parameters, init, sharding, save / load and the trainer are shared.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from fastsae.activations import paths
from fastsae.activations.code import (ActivationMemory, LossTerm, SAEForward, SparseCode, TrainingSettings,
                                      lp_norm_term, power_sum)


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
    naive form its training pass is tested against; training_forward, encode and encode_sparse
    (defaults: the chunked dense reference, dense_forward); dense_loss_terms (the naive form of its
    loss terms); memory (for `fastsae plan`); check_run / check_shard (what it refuses);
    latent_groups (for analysis). Every method takes the SAE (E2ESAE or a shard of it) and reads it;
    a kind's own buffers change only through SAEForward.state.
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

    def dense_forward(self, pre: torch.Tensor, sae, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The naive form: (code [N, n_latents], l0 [N]) from the pre-activations [N, n_latents],
        differentiable as the training pass is (the straight-through estimators included). The
        spec the fused paths are tested against, and the default training path (chunked:
        paths.dense_reference_pass); memory grows with N x n_latents."""
        raise NotImplementedError(f"activation {self.name!r} has no dense_forward")

    def sparsity_term(self, lp_sum: torch.Tensor, l0: torch.Tensor, p: float, d_in: int) -> torch.Tensor:
        """The sparsity term from per-token sums: lp_sum = sum_j |code_j|^p and l0 = active latents
        (differentiable where the activation trains its threshold). Default: the paper's Lp term."""
        return lp_norm_term(lp_sum, p, d_in)

    def training_forward(self, sae, x: torch.Tensor, settings: TrainingSettings) -> SAEForward:
        """The training pass of x [N, d_in] -> SAEForward (reconstruction [N, d_in], loss terms, ...).

        Default: the chunked dense reference (paths.dense_reference_pass) and the sparsity term,
        weighted by loss.sparsity_coeff. A kind with a fused path overrides this and calls its
        helper in fastsae.activations.paths."""
        out = paths.dense_reference_pass(sae, x, self, settings.p)
        return self.finish_pass(sae, out, None, settings)

    def finish_pass(self, sae, out: paths.PassSums, code: SparseCode | None, settings: TrainingSettings,
                    terms: dict | None = None, **fields) -> SAEForward:
        """SAEForward from a path's sums: the sparsity term first, then ``terms``; ``fields``: the
        SAEForward's state / reconstructions."""
        sparsity = self.sparsity_term(out.lp_sum, out.l0, settings.p, sae.d_in)
        return SAEForward(out.reconstruction, out.l0.detach().mean(), out.fire_counts, code,
                          {"sparsity": LossTerm(sparsity, "sparsity_coeff"), **(terms or {})}, **fields)

    def dense_loss_terms(self, sae, x: torch.Tensor, code: torch.Tensor, l0: torch.Tensor,
                         settings: TrainingSettings) -> dict[str, torch.Tensor]:
        """The naive form of the loss terms training_forward returns (AuxK aside), from the dense
        code of dense_forward: {name: value}. The conformance suite checks the training pass's
        terms and their gradients against it."""
        return {"sparsity": self.sparsity_term(power_sum(code, settings.p), l0, settings.p, sae.d_in)}

    def encode(self, sae, x: torch.Tensor) -> torch.Tensor | SparseCode:
        """The code of x [N, d_in]: a dense [N, latents held here] tensor, or a SparseCode [N, width].
        Default: dense_forward of the pre-activations."""
        pre = sae.encoder_input(x) @ sae.W_enc + sae.b_enc
        return self.dense_forward(pre, sae, sae.training)[0]

    def code_is_dense(self, sae) -> bool:
        """Whether encode() gives a dense code in the SAE's current mode (else a SparseCode, and
        decode refuses a dense one as a likely mix-up)."""
        return True

    def encode_sparse(self, sae, x: torch.Tensor) -> SparseCode:
        """The active latents of each token of x [N, d_in] as a padded SparseCode (for analysis).
        Default: encode() chunk by chunk, compacted (paths.sparse_from_dense)."""
        return paths.sparse_from_dense(lambda chunk: self.encode(sae, chunk), x, sae.n_local)

    def memory(self, n_tokens: int, n_local: int, d_in: int, itemsize: int, shards: int,
               d_out: int | None = None) -> ActivationMemory:
        """What one training pass of n_tokens holds beyond the parameters and their gradients, for
        `fastsae plan` (n_local: the latents of one shard; itemsize: the SAE dtype's bytes; d_out:
        the width it writes, a transcoder's, None: d_in). Default: the chunked dense reference's."""
        return paths.dense_reference_memory(n_tokens, n_local, d_in if d_out is None else d_out, itemsize)

    def check_run(self, *, shards: int, coefficients: dict) -> None:
        """Refuse, with a ValueError naming the setting, a run this kind cannot train (shards: the
        ranks each SAE is split across; coefficients: the run's loss coefficients by name)."""

    def check_shard(self, n_local: int) -> None:
        """Refuse, with a ValueError, a shard of n_local latents this kind cannot work on."""

    def latent_groups(self, n_latents: int) -> list[tuple[str, int, int]] | None:
        """Groups of latents the kind distinguishes, as (label, first id, end id), for analysis and
        the dashboards (Matryoshka: its nested prefixes); None: one undivided dictionary."""
        return None

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
