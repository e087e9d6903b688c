"""One SAE's data files in a dashboard's site: its index, its latent shards (contexts, samples,
histogram, logit effect, neighbours of SHARD latents a file) and its token shards (the latents
that fire most on each token id). fastsae.dashboard.site describes the files."""

from __future__ import annotations

import torch

from fastsae.analysis.stream import SAETarget
from fastsae.dashboard.collect import EMPTY_TOKEN, LatentRecords
from fastsae.dashboard.site import SiteWriter, rounded, rounded_list


def write_sae_data(site: SiteWriter, key: str, target: SAETarget, rec: LatentRecords, effect: dict,
                   near: tuple, across: tuple | None, shard_size: int, token_shard: int, d_vocab: int) -> None:
    """One SAE's index, latent shards and token shards."""
    cpu = _records_to_cpu(rec)
    stats = cpu.stats
    n = stats.n_latents
    count = stats.count.tolist()
    mean = torch.nan_to_num(stats.mean_when_firing, nan=0.0).tolist()
    centres = cpu.top.payload["tokens"][:, :, cpu.before].tolist()
    filled = cpu.top.counts().tolist()
    firing = [_firing_tokens(centres[i], filled[i], 8) for i in range(n)]
    site.write_data("index", key, f"{key}/index.js", {
        "count": count, "max": rounded_list(stats.activation_max.tolist()), "mean": rounded_list(mean),
        "top": [[t for t, _ in f[:3]] for f in firing]})
    near_cos, near_ids = near
    other_cos, other_ids = across[1] if across is not None else (None, None)

    def pairs(ids_row, vals_row):
        return [[int(i), rounded(float(v))] for i, v in zip(ids_row, vals_row) if i >= 0]

    def lists(store, lo, hi):
        p = store.payload
        return (store.keys[lo:hi].tolist(), p["value"][lo:hi].tolist(), p["position"][lo:hi].tolist(),
                p["tokens"][lo:hi].tolist(), p["acts"][lo:hi].tolist())

    for start in range(0, n, shard_size):
        stop = min(n, start + shard_size)
        top, samples = lists(cpu.top, start, stop), lists(cpu.samples, start, stop)
        hist = stats.histogram[start:stop].tolist()
        lp = effect["top_ids"][start:stop].tolist(), effect["top_values"][start:stop].tolist()
        ln = effect["bottom_ids"][start:stop].tolist(), effect["bottom_values"][start:stop].tolist()
        nb = near_ids[start:stop].tolist(), near_cos[start:stop].tolist()
        ob = (other_ids[start:stop].tolist(), other_cos[start:stop].tolist()) if other_ids is not None else None
        records = []
        for j, i in enumerate(range(start, stop)):
            record = {"i": i, "hist": [[b, c] for b, c in enumerate(hist[j]) if c],
                      "top": _contexts(*(part[j] for part in top), cpu.before),
                      "samples": _contexts(*(part[j] for part in samples), cpu.before),
                      "firing": firing[i], "lp": pairs(lp[0][j], lp[1][j]), "ln": pairs(ln[0][j], ln[1][j]),
                      "near": pairs(nb[0][j], nb[1][j])}
            if ob is not None:
                record["other"] = pairs(ob[0][j], ob[1][j])
            records.append(record)
        site.write_data("latents", f"{key}/{start // shard_size}", f"{key}/latents/{start // shard_size:05d}.js",
                        {"start": start, "records": records})

    token_filled = cpu.by_token.counts().tolist()
    for start in range(0, d_vocab, token_shard):
        stop = min(d_vocab, start + token_shard)
        ids = cpu.by_token.payload["id"][start:stop].tolist()
        values = cpu.by_token.payload["value"][start:stop].tolist()
        tokens = {str(start + j): pairs(ids[j][:token_filled[start + j]], values[j][:token_filled[start + j]])
                  for j in range(stop - start) if token_filled[start + j]}
        site.write_data("tokens", f"{key}/{start // token_shard}", f"{key}/tokens/{start // token_shard:05d}.js",
                        {"start": start, "tokens": tokens})


def _firing_tokens(centres: list[int], filled: int, limit: int) -> list[list[int]]:
    """The tokens at a latent's top activations (centres, largest activation first; the first
    ``filled`` are real), most frequent first (ties: the one with the larger activation)."""
    counts: dict[int, int] = {}
    for token in centres[:filled]:  # dict order breaks count ties by activation
        counts[token] = counts.get(token, 0) + 1
    return [[t, c] for t, c in sorted(counts.items(), key=lambda item: -item[1])[:limit]]


def _contexts(keys: list, values: list, positions: list, tokens: list, acts: list, before: int) -> list:
    """[value, position, centre, tokens, acts] per filled slot of one latent (lists of its slots),
    the window trimmed to its row."""
    out = []
    for slot, key in enumerate(keys):
        if key == float("-inf"):
            break
        row = tokens[slot]
        first = next(j for j, t in enumerate(row) if t != EMPTY_TOKEN)
        last = max(j for j, t in enumerate(row) if t != EMPTY_TOKEN)
        out.append([rounded(values[slot]), positions[slot], before - first, row[first:last + 1],
                    rounded_list(acts[slot][first:last + 1])])
    return out


def _records_to_cpu(rec: LatentRecords) -> LatentRecords:
    import copy

    out = copy.copy(rec)
    for name in ("top", "samples", "by_token"):
        store = copy.copy(getattr(rec, name))
        store.keys = store.keys.cpu()
        store.payload = {k: v.cpu() for k, v in store.payload.items()}
        setattr(out, name, store)
    out.stats = rec.stats.to("cpu")
    return out
