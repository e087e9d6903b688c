"""Matryoshka BatchTopK (Bussmann, Nabeshima, Karvonen, Nanda 2025): nested prefixes of one dictionary.

The dictionary's first `widths[0]` latents, its first `widths[1]`, ..., and all of it are each an
SAE of their own: every prefix must reconstruct the input by itself, so the early latents learn
general features and the later ones the refinements (against feature absorption). As SAELens
(MatryoshkaBatchTopKTrainingSAE, after its #571) and dictionary_learning (MatryoshkaBatchTopKTrainer)
train it:

- one BatchTopK selection over the whole dictionary (fastsae.activations.batchtopk, exactly: the
  k x N largest ReLU pre-activations of the batch; the same widening, ties and shards), and the
  inference threshold as BatchTopK's (a running average of the smallest kept value);
- every prefix's reconstruction from that one code (one encoder pass, no [N, n_latents] tensor):
  prefix w sums the decoder rows of the selected latents with id < w. The sparse decoder makes the
  partial sums as a segmented prefix sum (prefix_reconstructions: the kept entries sorted by id,
  each group of latents between two widths decoded once, the groups' sums accumulated), which
  decodes every kept entry once, the whole reconstruction included; a decode per prefix of the
  whole code with the later ids masked moved 2.7x the bytes and took 3.5x to 5x the time on the CPU
  (benchmarks/bench_matryoshka.py; the README's Matryoshka section has the numbers);
- the local loss is the sum of every prefix's reconstruction loss, with the full dictionary's the
  run's own MSE term (loss.local_mse_coeff) and each inner prefix's a term "prefix_mse_<w>" of
  weight prefix_coeff (default 1: SAELens's plain sum). fastsae's MSE is a mean over elements, so
  each term is SAELens's (a sum over d_in, a mean over tokens) divided by d_in, the normalisation of
  every fastsae MSE term (tests/test_matryoshka.py checks them against SAELens's class).
  dictionary_learning takes the mean of its group-weighted terms instead (default weights 1/G:
  the sum / G^2): its balance with the other terms is local_mse_coeff = prefix_coeff = its scale;
- AuxK on the whole dictionary's residual (SAELens's default, use_matryoshka_aux_loss false;
  dictionary_learning's), the Lp sparsity term as BatchTopK's.

The widths are SAELens's matryoshka_widths without their last entry (the whole dictionary), or
dictionary_learning's group sizes g_1, ..., g_G as running sums (g_1, g_1 + g_2, ..., without the
total).

End to end, two documented choices of prefix_loss:
- "mse" (default, cheap): the run's KL trains the whole dictionary, the inner prefixes keep their
  MSE terms (their balance with the KL: prefix_coeff); the step costs what a BatchTopK step does
  plus the sort and the group decodes above (no more LM work).
- "kl": every inner prefix gets the KL of its own spliced run (SAEForward.reconstructions; the
  trainer runs the blocks after the SAE once more per prefix, from the cached residual, and adds
  prefix_coeff x loss.kl_coeff x that KL as kl_prefix_<w>): per step len(widths) more forward and
  backward passes through those blocks and len(widths) more fused KLs (each as the main one, about
  6 N d V FLOPs with its backward), and their activations held at once for backward, which
  `fastsae plan` counts and says (ActivationMemory.extra_spliced_runs). One SAE hook per run. In a local run the inner prefixes
  then get loss.local_mse_coeff x prefix_coeff x their MSE, as with "mse" at local_mse_coeff 1.
Eval measures the whole dictionary (its inference code) and leaves the prefix terms out.

Files: SAELens saves a trained Matryoshka SAE as it saves BatchTopK, as a "jumprelu" file with the
inference threshold for every latent (fastsae writes that, its spec in the metadata, so the round
trip restores the prefixes); SAELens's "matryoshka_batchtopk" training files (matryoshka_widths,
whose last entry is d_sae, and topk_threshold) load here. Their use_matryoshka_aux_loss is a
training option fastsae does not have (its AuxK is the whole dictionary's): such a file loads, the
same function. sparsify stores none.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastsae.activations import paths
from fastsae.activations.auxk import auxk_term
from fastsae.activations.base import check_number
from fastsae.activations.batchtopk import BatchTopK
from fastsae.activations.code import ActivationMemory, LossTerm, SparseCode

PREFIX_LOSSES = ("mse", "kl")


@dataclass(frozen=True)
class MatryoshkaParams:
    k: float  # active latents per token, on average over the batch (BatchTopK's k)
    widths: tuple  # the inner prefixes' widths, increasing; the whole dictionary is the last prefix
    threshold_lr: float = 0.01  # rate of the inference threshold's running average (BatchTopK's)
    prefix_loss: str = "mse"  # end to end: "mse" (inner prefixes on MSE) or "kl" (a spliced run each)
    prefix_coeff: float = 1.0  # weight of each inner prefix's loss term

    def __post_init__(self):
        if isinstance(self.widths, list):  # from YAML / JSON: kept as a tuple (the spec is frozen)
            object.__setattr__(self, "widths", tuple(self.widths))

    def validate(self, n_latents: int | None) -> None:
        check_number("k", self.k, low=0, low_open=True, high=n_latents)
        check_number("threshold_lr", self.threshold_lr, low=0, low_open=True, high=1, high_name="")
        check_number("prefix_coeff", self.prefix_coeff, low=0)
        if not isinstance(self.widths, tuple) or not self.widths:
            raise ValueError(f"widths must list the inner prefixes' widths, e.g. widths=[128, 512] (the whole "
                             f"dictionary is the last prefix; without inner ones use batchtopk), got {self.widths!r}")
        for position, width in enumerate(self.widths):
            check_number(f"widths[{position}]", width, integer=True, low=1)
        if any(b <= a for a, b in zip(self.widths, self.widths[1:])):
            raise ValueError(f"widths must increase strictly, got {list(self.widths)}")
        if n_latents is not None and self.widths[-1] >= n_latents:
            raise ValueError(f"widths must each be below n_latents={n_latents} (the whole dictionary is the last "
                             f"prefix), got {list(self.widths)}")
        if self.prefix_loss not in PREFIX_LOSSES:
            raise ValueError(f"prefix_loss must be one of {PREFIX_LOSSES}, got {self.prefix_loss!r}")


class MatryoshkaBatchTopK(BatchTopK):
    name = "matryoshka_batchtopk"
    Params = MatryoshkaParams
    sparsify_refusal = ("sparsify stores per-token TopK SAEs; a Matryoshka BatchTopK SAE's training code is a batch "
                        "selection and its inference code a threshold (format='saelens' writes it as a JumpReLU SAE)")
    saelens_architectures = ("matryoshka_batchtopk",)
    # inner prefixes of 6 and 12 latents: a test SAE of 24 or more latents has three groups
    example_params = {"k": 4, "widths": [6, 12]}

    # ---------------------------------------------------------------- training

    def training_forward(self, sae, x, settings):
        if not sae.training:  # inference: BatchTopK's threshold, the whole dictionary
            return super().training_forward(sae, x, settings)
        code = paths.select_code(sae, x, self)
        *inner, whole = self.prefix_reconstructions(sae, code)
        out = paths.selection_pass(sae, code, settings.p, reconstruction=whole)
        terms = auxk_term(sae, x, out.reconstruction, settings)
        prefixes = dict(zip(self.params.widths, inner))
        reconstructions = None
        if self.params.prefix_loss == "mse":
            target = settings.reconstruction_target(x)  # x, or a transcoder's target less its skip path
            terms.update({f"prefix_mse_{width}": LossTerm(self.params.prefix_coeff * _mse(reconstruction, target))
                          for width, reconstruction in prefixes.items()})
        else:
            reconstructions = {f"prefix_{width}": (reconstruction, self.params.prefix_coeff)
                               for width, reconstruction in prefixes.items()}
        return self.finish_pass(sae, out, code, settings, terms, state={"threshold": self.updated_threshold(sae, code)},
                                reconstructions=reconstructions)

    def prefix_reconstructions(self, sae, code: SparseCode) -> list[torch.Tensor]:
        """The reconstruction [N, d_out] of every prefix, the inner ones by width and the whole
        dictionary last, from the selection code by a segmented prefix sum.

        The kept entries are sorted by latent id (the others after them); each group of latents
        (between two prefix widths) is compacted to the largest number of entries any token has in
        it, rounded up to a multiple of 16 (so the decoder's launches keep the specialisations
        the compile check compiles), and decoded once without b_dec; the groups' partial sums are
        accumulated in fp32, and each prefix is b_dec plus the partial sums of its groups. Every
        kept entry is decoded once, the whole reconstruction included; the groups' widths are read
        back from the device together, one host sync. Decoding each prefix from the whole code with
        the later ids masked instead moved 2.7x the bytes and took 3.5x to 5x the time on the CPU
        (benchmarks/bench_matryoshka.py; the README's Matryoshka section).
        """
        ends = (*self.params.widths, sae.n_latents)
        values, ids = code
        n_tokens, width = values.shape
        key = torch.where(values > 0, ids, sae.n_latents)  # the entries not kept: past every group
        key, order = key.sort(dim=-1, stable=True)
        values, ids = values.gather(-1, order), ids.gather(-1, order)
        bounds = torch.tensor((0, *ends), dtype=key.dtype, device=key.device)
        edges = torch.searchsorted(key, bounds.expand(n_tokens, -1).contiguous())  # [N, groups + 1]
        counts = edges[:, 1:] - edges[:, :-1]
        if values.is_meta or n_tokens == 0:  # (the compile check records a step on meta tensors)
            widest = [width] * len(ends)
        else:
            widest = counts.amax(0).tolist()  # the one host sync
        running, prefixes = None, []
        for group, most in enumerate(widest):
            slots = torch.arange(min(width, max(16, -(-most // 16) * 16)), device=ids.device)
            position = (edges[:, group, None] + slots).clamp_max(width - 1)
            kept = slots < counts[:, group, None]
            part = paths.decode_code(sae, SparseCode(torch.where(kept, values.gather(-1, position), 0),
                                                     ids.gather(-1, position)), bias=False).float()
            running = part if running is None else running + part
            prefixes.append((running + sae.b_dec.float()).to(sae.W_dec.dtype))
        return prefixes

    def dense_loss_terms(self, sae, x, code, l0, settings):
        terms = super().dense_loss_terms(sae, x, code, l0, settings)
        if sae.training and self.params.prefix_loss == "mse":
            decoder = sae.normalised_decoder()
            target = settings.reconstruction_target(x)
            for width in self.params.widths:
                reconstruction = code[:, :width] @ decoder[:width] + sae.b_dec
                terms[f"prefix_mse_{width}"] = self.params.prefix_coeff * _mse(reconstruction, target)
        return terms

    def memory(self, n_tokens, n_local, d_in, itemsize, shards, d_out=None):
        d_out = d_in if d_out is None else d_out  # the inner prefixes' reconstructions are d_out wide
        selection = super().memory(n_tokens, n_local, d_in, itemsize, shards)
        width = min(n_local * shards, self.candidates(n_local) * shards)  # the gathered code's width
        groups = len(self.params.widths) + 1
        # the code sorted by id (values, ids, keys); the groups' compacted codes (values, ids, kept
        # for backward; each at most 16 slots over its widest token); every inner prefix's
        # reconstruction with its fp32 copy for the MSE
        prefixes = n_tokens * (width * (itemsize + 16) + (width + 16 * groups) * (itemsize + 8)
                               + len(self.params.widths) * d_out * (itemsize + 4))
        runs = len(self.params.widths) if self.params.prefix_loss == "kl" else 0
        return ActivationMemory(selection.code + prefixes, selection.workspace, runs)

    def latent_groups(self, n_latents):
        ends = (*self.params.widths, n_latents)
        return [(f"prefix {i + 1}", start, end) for i, (start, end) in enumerate(zip((0, *ends[:-1]), ends))]

    # ---------------------------------------------------------------- files

    @classmethod
    def from_saelens(cls, config, tensors, where):
        params, extras = super().from_saelens(config, tensors, where)
        if config.get("architecture") != "matryoshka_batchtopk":  # a JumpReLU file fastsae wrote: its spec decides
            return params, extras
        widths = config.get("matryoshka_widths")
        if not isinstance(widths, list) or not all(isinstance(w, int) and not isinstance(w, bool) for w in widths):
            raise ValueError(f"{where}: a Matryoshka BatchTopK SAE needs matryoshka_widths, a list of ints, got "
                             f"{widths!r}")
        inner = [w for w in widths if w != config["d_sae"]]  # SAELens lists the whole dictionary last
        return {**params, "widths": inner}, extras


def _mse(reconstruction: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean over elements in fp32, as every fastsae MSE term (fastsae.train.losses.mse_loss)."""
    return F.mse_loss(reconstruction.float(), x.float())
