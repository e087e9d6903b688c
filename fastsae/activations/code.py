"""What a training pass returns and the sums every path and kind share: the sparse code, the loss
terms, the pass's result (SAEForward), what the run gives a pass (TrainingSettings) and what it
holds for `fastsae plan` (ActivationMemory). Kept apart from base.py so that the paths (paths.py)
and the kinds both read it without an import circle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple

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


class LossTerm(NamedTuple):
    """One named term of a kind's training loss.

    value: a differentiable scalar, already weighted by the kind's own hyperparameters.
    coefficient: the name of the run's shared loss coefficient that multiplies it (a field of the
        trainer's loss config: "sparsity_coeff", "auxk_coeff"), or None: the value is the term.
    """

    value: torch.Tensor
    coefficient: str | None = None


class SAEForward(NamedTuple):
    """One training pass of an SAE (E2ESAE.training_forward): what the losses and metrics need.

    reconstruction: shaped like the input. l0: active latents per token, mean (detached).
    fire_counts: int32 [latents held here], the tokens each latent is active on. code: the SparseCode
    where the pass made one (selection), else None (the elementwise path never builds a code).
    terms: the kind's named loss terms (LossTerm), which the trainer sums and logs by name
    ("sparsity", "auxk", Matryoshka's "prefix_mse_<width>", ...).
    state: new values of the kind's own buffers (its non-trainable extra tensors, e.g. BatchTopK's
    inference threshold), which E2ESAE.training_forward writes after the pass: a kind never edits
    the SAE itself.
    reconstructions: {name: (reconstruction, weight)}: further outputs the run's reconstruction
    losses train as well, each weighted (Matryoshka's inner prefixes with prefix_loss="kl": the
    trainer runs the model once more with each spliced in and adds its KL).
    """

    reconstruction: torch.Tensor
    l0: torch.Tensor
    fire_counts: torch.Tensor
    code: SparseCode | None
    terms: dict
    state: dict | None = None
    reconstructions: dict | None = None

    @property
    def sparsity(self) -> torch.Tensor:
        """The sparsity term (the trainer multiplies it by loss.sparsity_coeff)."""
        return self.terms["sparsity"].value


@dataclass(frozen=True)
class TrainingSettings:
    """What a training pass takes from the run besides its input.

    p: the Lp norm of the sparsity term (loss.sparsity_p), for the kinds whose term is one.
    coefficients: the run's shared loss coefficients by name (LossTerm.coefficient); a kind may
        leave out a term whose coefficient is 0 (a name not given counts as non-zero).
    dead: bool [latents held here], the latents the trainer counts as dead (for AuxK); None: none
        known (eval, or a pass outside a trainer), and no AuxK.
    auxk_k: the dead latents that reconstruct the residual in AuxK (None: d_in // 2).
    target: () -> [N, d_out], what the code's reconstruction must match (E2ESAE.training_forward
        sets it: a transcoder's target less its skip path, computed when first asked); None: x.
    """

    p: float = 1.0
    coefficients: dict = field(default_factory=dict)
    dead: torch.Tensor | None = None
    auxk_k: int | None = None
    target: Callable[[], torch.Tensor] | None = None

    def reconstruction_target(self, x: torch.Tensor) -> torch.Tensor:
        """What the code's reconstruction must match in a kind's own terms: x for an SAE."""
        return x if self.target is None else self.target()

    def uses(self, coefficient: str) -> bool:
        """Whether a term weighted by `coefficient` counts in this run."""
        return self.coefficients.get(coefficient, 1.0) != 0


class ActivationMemory(NamedTuple):
    """What one training pass of a kind holds, in bytes, for `fastsae plan` (see plan.py).

    code: kept from forward to backward (the code, candidates, inner reconstructions).
    workspace: the passes' temporaries (chunked buffers), at their peak.
    extra_spliced_runs: further runs of the model after the SAE that the kind asks an e2e run for
        (one per reconstruction in SAEForward.reconstructions), each keeping its activations for
        backward.
    """

    code: int
    workspace: int
    extra_spliced_runs: int = 0


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
