"""Per-latent statistics of an SAE over many tokens, streamed batch by batch.

    stats = LatentStats(sae.n_latents)
    for batch in stream:                                   # fastsae.analysis.stream.ActivationStream
        stats.update(sae.encode_sparse(batch.activations[hook].to(sae.dtype)))
    stats.frequency, stats.alive, stats.mean_when_firing   # [n_latents] each
    stats.save("out/latent_stats/e2e", metadata={"hook": hook, "sae": sae_fingerprint(sae)})
    stats = LatentStats.load("out/latent_stats/e2e")       # stats.metadata: what save() was given

What is counted: a latent is active on a token where its value in the SparseCode that
``E2ESAE.encode_sparse`` returns is > 0 (padding entries have value 0), whatever the SAE's
activation function. Per latent: firing count, sum and max of its activations, and a histogram of
its active values over fixed log-spaced bins (BIN_EDGES); the token count. Everything else
(frequency, mean, mean when firing, alive) is derived. Statistics of disjoint token sets add up
(``merge``): one batch or many give the same numbers (counts, max and histogram exactly; the
float64 sums to rounding).

Memory: an update holds O(tokens x width) temporaries (width = the code's k, or the batch's
largest L0 for a ReLU SAE), the state is O(n_latents x bins); no [tokens, n_latents] tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from fastsae._files import atomic_write, atomic_write_text, read_json_object, require_files
from fastsae.sae import E2ESAE, SparseCode

FORMAT = "fastsae.latent_stats"
VERSION = 1
TENSORS_NAME = "latent_stats.safetensors"
JSON_NAME = "latent_stats.json"
# Histogram bins of active values: 8 per decade from 1e-3 to 1e4, plus one bin below (0, 1e-3)
# and one at or above 1e4. bin i holds BIN_EDGES[i-1] <= v < BIN_EDGES[i] (edges -inf, +inf at the ends).
BIN_EDGES = torch.logspace(-3, 4, 7 * 8 + 1, dtype=torch.float64)
N_BINS = len(BIN_EDGES) + 1


class LatentStats:
    """Streamed per-latent statistics (see the module docstring).

    Tensors (on ``device``): count int64 [n], activation_sum float64 [n], activation_max float64 [n]
    (0 for a latent that never fired), histogram int64 [n, N_BINS]; n_tokens: tokens seen.
    """

    def __init__(self, n_latents: int, *, device: torch.device | str | None = None):
        if isinstance(n_latents, bool) or not isinstance(n_latents, int) or n_latents < 1:
            raise ValueError(f"n_latents must be a positive int, got {n_latents!r}")
        self.n_latents = n_latents
        self.n_tokens = 0
        self.count = torch.zeros(n_latents, dtype=torch.int64, device=device)
        self.activation_sum = torch.zeros(n_latents, dtype=torch.float64, device=device)
        self.activation_max = torch.zeros(n_latents, dtype=torch.float64, device=device)
        self.histogram = torch.zeros(n_latents, N_BINS, dtype=torch.int64, device=device)
        self.metadata: dict = {}

    @property
    def device(self) -> torch.device:
        return self.count.device

    # ------------------------------------------------------------------ accumulate

    @torch.no_grad()
    def update(self, code: SparseCode) -> "LatentStats":
        """Add one batch: the SparseCode [..., width] of its tokens (every leading position is one
        token). Runs on the code's device without reading anything back to the host."""
        if not isinstance(code, SparseCode):
            raise TypeError(f"code must be the SparseCode of E2ESAE.encode_sparse, got {type(code).__name__}")
        values, indices = code.values, code.indices
        if values.shape != indices.shape or values.ndim == 0:
            raise ValueError(f"code.values {tuple(values.shape)} and code.indices {tuple(indices.shape)} "
                             "must have one shape [..., width]")
        if values.device != self.device:
            raise ValueError(f"the code is on {values.device} but these statistics are on {self.device}")
        self.n_tokens += values.shape[:-1].numel()
        values = values.reshape(-1).to(torch.float64)
        indices = indices.reshape(-1).to(torch.int64)
        active = values > 0
        values = torch.where(active, values, 0.0)
        self.count.index_add_(0, indices, active.to(torch.int64))
        self.activation_sum.index_add_(0, indices, values)
        self.activation_max.scatter_reduce_(0, indices, values, reduce="amax")
        bins = torch.bucketize(values, BIN_EDGES.to(values.device), right=True)
        self.histogram.view(-1).index_add_(0, indices * N_BINS + bins, active.to(torch.int64))
        return self

    def merge(self, other: "LatentStats") -> "LatentStats":
        """New statistics over both token sets (self's and other's, disjoint)."""
        if not isinstance(other, LatentStats):
            raise TypeError(f"can only merge LatentStats, got {type(other).__name__}")
        if other.n_latents != self.n_latents:
            raise ValueError(f"cannot merge statistics of {self.n_latents} and {other.n_latents} latents")
        merged = LatentStats(self.n_latents, device=self.device)
        merged.n_tokens = self.n_tokens + other.n_tokens
        merged.count = self.count + other.count.to(self.device)
        merged.activation_sum = self.activation_sum + other.activation_sum.to(self.device)
        merged.activation_max = torch.maximum(self.activation_max, other.activation_max.to(self.device))
        merged.histogram = self.histogram + other.histogram.to(self.device)
        merged.metadata = dict(self.metadata)
        return merged

    def to(self, device) -> "LatentStats":
        moved = LatentStats(self.n_latents, device=device)
        moved.n_tokens, moved.metadata = self.n_tokens, dict(self.metadata)
        for name in ("count", "activation_sum", "activation_max", "histogram"):
            setattr(moved, name, getattr(self, name).to(device))
        return moved

    # ------------------------------------------------------------------ derived

    @property
    def alive(self) -> torch.Tensor:
        """bool [n]: fired on at least one token."""
        return self.count > 0

    @property
    def n_alive(self) -> int:
        return int(self.alive.sum())

    @property
    def frequency(self) -> torch.Tensor:
        """float64 [n]: share of tokens on which each latent fired."""
        return self.count.to(torch.float64) / max(self.n_tokens, 1)

    @property
    def mean_activation(self) -> torch.Tensor:
        """float64 [n]: mean activation over all tokens (0 where it did not fire)."""
        return self.activation_sum / max(self.n_tokens, 1)

    @property
    def mean_when_firing(self) -> torch.Tensor:
        """float64 [n]: mean activation over the tokens where it fired; NaN for dead latents."""
        return self.activation_sum / self.count.to(torch.float64)

    @staticmethod
    def bin_edges() -> torch.Tensor:
        """float64 [N_BINS + 1]: the histogram's edges, -inf and +inf at the ends."""
        inf = torch.tensor([float("inf")], dtype=torch.float64)
        return torch.cat([-inf, BIN_EDGES, inf])

    def summary(self) -> dict:
        """Plain numbers: tokens, latents, alive, dead, and quantiles of the alive latents' log10 frequency."""
        out = {"n_tokens": self.n_tokens, "n_latents": self.n_latents, "alive": self.n_alive,
               "dead": self.n_latents - self.n_alive}
        if out["alive"]:
            log_freq = self.frequency[self.alive].log10().float().cpu()
            qs = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
            out["log10_frequency_quantiles"] = dict(zip(["min", "p10", "median", "p90", "max"],
                                                        log_freq.quantile(qs).tolist()))
            out["latents_firing_above_10_percent"] = int((self.frequency > 0.1).sum())
        return out

    def group_summary(self, groups: list[dict]) -> list[dict]:
        """Per group of latents (latent_groups(sae): Matryoshka's nested prefixes), its latents,
        alive ones and L0 (mean active latents of the group per token): {label, first, end,
        latents, alive, l0}."""
        out = []
        for group in groups:
            first, end = group["first"], group["end"]
            out.append({**group, "latents": end - first, "alive": int(self.alive[first:end].sum()),
                        "l0": float(self.count[first:end].sum()) / max(self.n_tokens, 1)})
        return out

    # ------------------------------------------------------------------ files

    def save(self, directory: str | os.PathLike, metadata: dict | None = None) -> Path:
        """Write DIRECTORY/latent_stats.safetensors (the tensors) and DIRECTORY/latent_stats.json
        (format, n_latents, n_tokens, alive, and ``metadata``: what the statistics are of), each
        atomically; load() checks that the two come from one save."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        metadata = {**self.metadata, **(metadata or {})}
        stamp = {"n_tokens": str(self.n_tokens), "n_latents": str(self.n_latents)}
        tensors = {"count": self.count, "activation_sum": self.activation_sum,
                   "activation_max": self.activation_max, "histogram": self.histogram, "bin_edges": BIN_EDGES}
        tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
        atomic_write(directory / TENSORS_NAME, lambda path: save_file(tensors, str(path), metadata=stamp))
        record = {"format": FORMAT, "version": VERSION, "n_latents": self.n_latents, "n_tokens": self.n_tokens,
                  "alive": self.n_alive, "metadata": metadata}
        atomic_write_text(directory / JSON_NAME, json.dumps(record, indent=2))
        self.metadata = metadata
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, *, device: torch.device | str | None = None) -> "LatentStats":
        """Statistics written by save(); ``.metadata`` holds what save() was given."""
        from safetensors import safe_open

        from fastsae._files import load_safetensors

        directory = Path(directory)
        json_path, tensors_path = require_files(directory, (JSON_NAME, TENSORS_NAME), "not saved by LatentStats.save")
        record = read_json_object(json_path)
        if record.get("format") != FORMAT:
            raise ValueError(f"{json_path} is not a {FORMAT} file (format {record.get('format')!r})")
        tensors = load_safetensors(tensors_path)
        with safe_open(str(tensors_path), "pt") as f:
            stamp = f.metadata() or {}
        if stamp.get("n_tokens") != str(record["n_tokens"]) or stamp.get("n_latents") != str(record["n_latents"]):
            raise ValueError(f"{directory}: {JSON_NAME} and {TENSORS_NAME} come from different saves")
        if not torch.equal(tensors.get("bin_edges", torch.empty(0)), BIN_EDGES):
            raise ValueError(f"{tensors_path}: histogram bins differ from this fastsae's")
        stats = cls(int(record["n_latents"]), device=device)
        stats.n_tokens = int(record["n_tokens"])
        shapes = {"count": (stats.n_latents,), "activation_sum": (stats.n_latents,),
                  "activation_max": (stats.n_latents,), "histogram": (stats.n_latents, N_BINS)}
        for name, shape in shapes.items():
            if name not in tensors or tuple(tensors[name].shape) != shape:
                raise ValueError(f"{tensors_path}: {name} missing or not of shape {shape}")
            setattr(stats, name, tensors[name].to(device=stats.device, dtype=getattr(stats, name).dtype))
        stats.metadata = record.get("metadata") or {}
        return stats


def latent_groups(sae: E2ESAE) -> list[dict] | None:
    """The groups of latents the SAE's kind distinguishes (Activation.latent_groups: Matryoshka's
    nested prefixes, the group of a latent being the first prefix that holds it) as
    [{label, first, end}], or None for an undivided dictionary. The analysis and the dashboard
    show each latent's group from these."""
    groups = sae.activation_fn.latent_groups(sae.n_latents)
    return None if groups is None else [{"label": label, "first": first, "end": end} for label, first, end in groups]


def sae_fingerprint(sae: E2ESAE) -> str:
    """A hash of an SAE's function (its parameters, activation, k, decoder norm), to tell whether
    saved statistics belong to it."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps([sae.activation, sae.k, sae.decoder_norm, sae.d_in, sae.n_latents]).encode())
    for name, tensor in sorted(sae.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        # (reshaped: a 0-d buffer, BatchTopK's threshold, has no byte view of its own)
        digest.update(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def collect_latent_stats(stream, saes: dict[str, tuple[str, E2ESAE]]) -> dict[str, LatentStats]:
    """LatentStats per SAE over a stream of ActivationBatch (fastsae.analysis.stream.ActivationStream).

    saes: {name: (hook, sae)}; each batch's activations at ``hook``, cast to the SAE's dtype, go
    through ``sae.encode_sparse``.
    """
    stats = {name: LatentStats(sae.n_latents, device=sae.device) for name, (_, sae) in saes.items()}
    for batch in stream:
        for name, (hook, sae) in saes.items():
            stats[name].update(sae.encode_sparse(batch.activations[hook].to(sae.device, sae.dtype)))
    return stats
