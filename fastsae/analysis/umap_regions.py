"""UMAP of two dictionaries' alive decoder directions together, and the regions of the map where
one dictionary has latents and the other none (the paper's UMAP figure and its hand-picked regions,
found here by a rule).

    embedding = umap_embedding(dirs_a, dirs_b)                # [n_a + n_b, 2]; needs umap-learn
    regions = exclusive_regions(embedding, n_a)               # [{"owner": 0 or 1, "members": [...], ...}]

A point is exclusive when all of its ``k`` nearest neighbours in the map (Euclidean, 2-D) belong
to its own dictionary: with the two dictionaries mixed at random that happens with probability
about share**k (share: its dictionary's share of the points; 0.5**15 = 3e-5), so exclusive points
mark places only one dictionary covers. Exclusive points of one dictionary that are among each
other's k nearest neighbours form a region; regions of at least ``min_size`` points are reported,
largest first, with their members' indices (rows of a, or of b, in the order given).
"""

from __future__ import annotations

import numpy as np
import torch

from fastsae.analysis.similarity import unit_rows

UMAP_EXTRA = "umap-learn is needed for the UMAP: pip install 'fastsae[analysis]' (or leave the UMAP out with --no-umap)"


class MissingExtraError(ImportError):
    """An optional dependency is missing; the message names the extra that installs it."""


def require_umap():
    try:
        import umap  # noqa: F401
    except ImportError:
        raise MissingExtraError(UMAP_EXTRA) from None
    return umap


def umap_embedding(a: torch.Tensor, b: torch.Tensor, *, seed: int = 1) -> np.ndarray:
    """UMAP (umap-learn, default parameters as the paper's code, random_state=seed) of the unit
    rows of a [n_a, d] and b [n_b, d] together: float32 [n_a + n_b, 2], a's rows first."""
    umap = require_umap()
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"the two dictionaries have different widths ({a.shape[1]} vs {b.shape[1]})")
    points = torch.cat([unit_rows(a), unit_rows(b)]).cpu().numpy()
    import warnings

    with warnings.catch_warnings():  # umap-learn warns that random_state disables parallelism
        warnings.simplefilter("ignore", UserWarning)
        return umap.UMAP(random_state=seed).fit_transform(points).astype(np.float32)


def nearest_neighbours(points: np.ndarray, k: int, block: int = 512) -> np.ndarray:
    """int64 [n, k]: each 2-D point's k nearest other points (Euclidean), in blocks of rows."""
    x = torch.as_tensor(np.asarray(points, dtype=np.float64))
    n = len(x)
    k = min(k, n - 1)
    out = torch.empty(n, k, dtype=torch.int64)
    for start in range(0, n, block):
        dist = torch.cdist(x[start:start + block], x)
        dist[torch.arange(len(dist)), torch.arange(start, start + len(dist))] = float("inf")
        out[start:start + block] = dist.topk(k, dim=1, largest=False).indices
    return out.numpy()


def exclusive_regions(embedding: np.ndarray, n_a: int, *, k: int = 15, min_size: int = 10) -> list[dict]:
    """Regions of the map held by one dictionary only (see the module docstring).

    embedding: [n_a + n_b, 2], dictionary a's points first. Returns, largest first,
    [{"owner": 0 (a) or 1 (b), "members": indices into that dictionary's rows, "size",
      "bounds": [xmin, xmax, ymin, ymax], "centre": [x, y]}].
    """
    embedding = np.asarray(embedding, dtype=np.float64)
    n = len(embedding)
    if n < k + 1:
        return []
    owner = (np.arange(n) >= n_a).astype(np.int64)
    neighbours = nearest_neighbours(embedding, k)
    exclusive = (owner[neighbours] == owner[:, None]).all(axis=1)

    parent = np.arange(n)

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in np.flatnonzero(exclusive):
        for j in neighbours[i]:
            if exclusive[j]:  # same owner: i's neighbours all share it
                ri, rj = find(i), find(j)
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[int]] = {}
    for i in np.flatnonzero(exclusive):
        groups.setdefault(find(i), []).append(int(i))
    regions = []
    for members in groups.values():
        if len(members) < min_size:
            continue
        pts = embedding[members]
        side = int(owner[members[0]])
        regions.append({
            "owner": side,
            "members": sorted(m - side * n_a for m in members),
            "size": len(members),
            "bounds": [float(pts[:, 0].min()), float(pts[:, 0].max()), float(pts[:, 1].min()), float(pts[:, 1].max())],
            "centre": [float(pts[:, 0].mean()), float(pts[:, 1].mean())],
        })
    regions.sort(key=lambda r: (-r["size"], r["owner"], r["members"][0]))
    return regions
