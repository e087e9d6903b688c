"""build_dashboard: from an SAE (and the model and tokens it reads) to a static site.

    from fastsae.dashboard import build_dashboard
    build_dashboard("runs/e2e", "dash", n_tokens=1_000_000)                    # DIR/index.html
    build_dashboard("runs/e2e", "dash", compare="runs/local")                  # + nearest local latents

1. load_targets / load_language_model / held_out_batches (fastsae.analysis.stream) read what the
   specs name, as `fastsae eval` and `fastsae analyze` do;
2. one streaming pass (fastsae.dashboard.collect) over ``n_tokens`` tokens collects every SAE's
   contexts, samples, token index and LatentStats;
3. the weights give each latent's logit effect (fastsae.dashboard.weights) and nearest latents
   (fastsae.analysis.similarity.nearest_latents, among the alive latents);
4. fastsae.dashboard.site writes the site, atomically.
"""

from __future__ import annotations

import json
import re
import resource
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch

from fastsae.analysis.latent_stats import LatentStats, latent_groups, sae_fingerprint
from fastsae.analysis.similarity import nearest_latents
from fastsae.analysis.stream import (ActivationStream, AnalysisError, SAETarget, check_widths, held_out_batches,
                                     load_language_model, load_targets, resolve_device)
from fastsae.dashboard.collect import EMPTY_TOKEN, DashboardCollector, LatentRecords
from fastsae.dashboard.site import FORMAT, RECORD_NAME, VERSION, SiteError, SiteWriter, check_out_dir, rounded, rounded_list
from fastsae.dashboard.weights import logit_effect, token_texts

SPLITS = ("eval", "train")


class DashboardError(AnalysisError):
    """Bad input to a dashboard (the message names it); the CLI prints it and exits with 2."""


def _slug(label: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-.") or "sae"
    key, i = base, 2
    while key in taken:
        key, i = f"{base}-{i}", i + 1
    taken.add(key)
    return key


def _check_positive(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DashboardError(f"{name} must be an int >= {minimum}, got {value!r}")


def _peak_memory() -> dict:
    """Peak memory of this process so far: host RSS (ru_maxrss) and, on CUDA, allocated GPU memory."""
    out = {"host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_available():
        out["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return out


def _check_widths(lm, targets: Sequence[SAETarget]) -> None:
    """Each SAE's d_in against the width of the activations at the hook it reads, its d_out against
    the hook it writes (one 2-token probe; a transcoder "IN->OUT" reads IN, writes OUT), and that
    it writes the residual stream's width: a latent's logit effect is its decoder row through the
    final norm and W_U [d_model, d_vocab] (weights.logit_effect)."""
    check_widths(lm, {t.label: (t.hook, t.sae) for t in targets}, DashboardError)
    for target in targets:
        if target.sae.d_out != lm.d_model:
            raise DashboardError(f"{target.label} writes {target.hook_out}, {target.sae.d_out} wide, not the residual "
                                 f"stream's d_model={lm.d_model}: its decoder rows have no logit effect through W_U "
                                 "(a dashboard needs a coder that writes a residual-width hook, e.g. hook_mlp_out)")


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


def _neighbours(directions: torch.Tensor, alive: torch.Tensor, k: int, other: torch.Tensor | None = None,
                other_alive: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each latent's k nearest alive latents (of the same SAE, itself excluded, or of ``other``) by
    the cosine similarity of decoder directions: (cos [n, k], ids [n, k]) on the CPU, -inf / -1
    where fewer exist."""
    pool, pool_alive = (directions, alive) if other is None else (other, other_alive)
    pool_ids = pool_alive.nonzero().squeeze(1)
    n = directions.shape[0]
    if pool_ids.numel() == 0:
        return torch.full((n, k), float("-inf")), torch.full((n, k), -1, dtype=torch.int64)
    extra = 1 if other is None else 0  # room for the latent itself, dropped below
    values, ids = nearest_latents(directions, pool[pool_ids], k=min(k + extra, pool_ids.numel()))
    values, ids = values.cpu(), ids.cpu()
    ids = torch.where(ids >= 0, pool_ids.cpu()[ids.clamp_min(0)], -1)
    if other is None:  # the latent itself (cos 1) goes last, then the first k are kept
        own = ids == torch.arange(n)[:, None]
        values, ids = values.masked_fill(own, float("-inf")), ids.masked_fill(own, -1)
        order = torch.sort(values, dim=1, descending=True, stable=True).indices
        values, ids = values.gather(1, order), ids.gather(1, order)
    values, ids = values[:, :k], ids[:, :k]
    if values.shape[1] < k:
        pad = k - values.shape[1]
        values = torch.cat([values, torch.full((n, pad), float("-inf"))], 1)
        ids = torch.cat([ids, torch.full((n, pad), -1, dtype=torch.int64)], 1)
    return values, ids


def build_dashboard(target: str, out: str | Path, *, compare: str | None = None, n_tokens: int = 1_000_000,
                    model: str | None = None, config: str | None = None, overrides: Sequence[str] = (),
                    split: str = "eval", device: str | torch.device | None = "auto", top_k: int = 20,
                    n_samples: int = 20, before: int = 16, after: int = 6, token_latents: int = 16,
                    logit_k: int = 10, n_neighbours: int = 8, shard_size: int = 64, token_shard: int = 1024,
                    seed: int = 0, log: Callable[[str], None] | None = print) -> dict:
    """Build the dashboard of the SAE(s) ``target`` names (a run directory, a sweep directory, or
    PATH[@HOOK] of any format E2ESAE.from_pretrained reads) in directory ``out``.

    compare: one more SAE (same spec forms) whose latents each latent is compared with (nearest
        decoder directions, both ways); it gets its own pages in the same site.
    n_tokens: tokens read (fewer where the data ends: each token is read once). split: "eval" (the
        held-out data, as `fastsae eval`) or "train". model, config, overrides: as `fastsae eval
        --sae` (the model for SAE files; the data and batch settings).
    top_k contexts and n_samples quantile samples per latent, windows of ``before`` + 1 + ``after``
    tokens; token_latents latents per token id in the token search; logit_k promoted and
    suppressed tokens; n_neighbours nearest latents; shard_size latents per data file.

    Returns the build's record (also written to OUT/dashboard.json). Raises DashboardError
    (a ValueError) on bad input, before anything is written.
    """
    log = log or (lambda line: None)
    started = time.perf_counter()
    if split not in SPLITS:
        raise DashboardError(f"split must be one of {SPLITS}, got {split!r}")
    for name, value in (("n_tokens", n_tokens), ("top_k", top_k), ("n_samples", n_samples),
                        ("token_latents", token_latents), ("logit_k", logit_k), ("n_neighbours", n_neighbours),
                        ("shard_size", shard_size), ("token_shard", token_shard)):
        _check_positive(name, value)
    for name, value in (("before", before), ("after", after)):
        _check_positive(name, value, minimum=0)
    out = Path(out)
    try:
        check_out_dir(out)
    except SiteError as error:
        raise DashboardError(str(error)) from None

    device = resolve_device(device)
    main = load_targets([target], model=model, config=config, overrides=overrides, device=device)
    targets = list(main.targets)
    notes = list(main.notes)
    compare_key = None
    if compare is not None:
        other = load_targets([compare], model=main.config.model.name, config=config, overrides=overrides,
                             device=device)
        if len(other.targets) != 1:
            raise DashboardError(f"--compare {compare} names {len(other.targets)} SAEs "
                                 f"({', '.join(t.label for t in other.targets)}); give one (PATH@HOOK)")
        notes += other.notes
        for t in targets:
            if t.sae.d_out != other.targets[0].sae.d_out:  # decoder rows: the width they write
                raise DashboardError(f"{t.label} (d_out {t.sae.d_out}) and --compare {other.targets[0].label} "
                                     f"(d_out {other.targets[0].sae.d_out}) live in spaces of different widths: "
                                     "their decoder directions cannot be compared")
            if t.hook != other.targets[0].hook:
                notes.append(f"{t.label} reads {t.hook} and {other.targets[0].label} reads "
                             f"{other.targets[0].hook}: their directions are compared as vectors of the same width")
        targets.append(other.targets[0])
    taken: set[str] = set()
    keys = [_slug(t.label, taken) for t in targets]
    if compare is not None:
        compare_key = keys[-1]
    if len(set(keys)) != len(keys):
        raise DashboardError("SAE labels collide")

    lm = load_language_model(main.config, device)
    if lm.tokenizer is None:
        raise DashboardError(f"the model {main.config.model.name} has no tokenizer: a dashboard shows the text of "
                             "the tokens; save the tokenizer beside the model (tokenizer.save_pretrained(DIR))")
    _check_widths(lm, targets)

    # ---- the pass
    saes = {key: (t.hook_in, t.sae) for key, t in zip(keys, targets)}  # a transcoder reads IN
    for _, sae in saes.values():
        sae.eval()
    collector = DashboardCollector(saes, lm.d_vocab, top_k=top_k, n_samples=n_samples, token_latents=token_latents,
                                   before=before, after=after, seed=seed)
    batches = held_out_batches(lm, main.config, split=split)
    stream = ActivationStream(lm, batches, hooks=sorted({t.hook_in for t in targets}), n_tokens=n_tokens)
    log(f"fastsae dashboard: {len(targets)} SAE(s) on {main.config.model.name}, reading up to {n_tokens:,} tokens "
        f"of the {split} split on {device}")
    pass_start = time.perf_counter()
    last_log = pass_start
    with torch.no_grad(), warnings.catch_warnings():
        # the stream's own warning when the data ends; the note below says it (naming the split)
        warnings.filterwarnings("ignore", message="the held-out data ran out")
        for batch in stream:
            collector.update(batch.tokens, batch.activations)
            now = time.perf_counter()
            if now - last_log > 15:
                last_log = now
                log(f"  {collector.n_tokens:,} tokens, {collector.n_tokens / (now - pass_start):,.0f} tokens/s")
    collector.finish()
    if device.type == "cuda":
        torch.cuda.synchronize()
    pass_seconds = time.perf_counter() - pass_start
    n_read = collector.n_tokens
    if stream.ran_out and n_read < n_tokens:
        notes.append(f"The {split} data held {n_read:,} tokens, fewer than the {n_tokens:,} asked: "
                     "each was read once.")
    log(f"  pass: {n_read:,} tokens in {pass_seconds:.1f} s ({n_read / max(pass_seconds, 1e-9):,.0f} tokens/s)")
    for key, t in zip(keys, targets):
        if collector.records[key].stats.n_alive == 0:
            raise DashboardError(f"no latent of {t.label} fired on the {n_read:,} tokens read: there is nothing "
                                 "to show (is it the model and hook it was trained on?)")

    # ---- the weights: logit effects, neighbours
    weights_start = time.perf_counter()
    effects, notes_logit = {}, None
    for key, t in zip(keys, targets):
        effects[key], notes_logit = logit_effect(t.sae.W_dec, lm, logit_k)
    neighbours, across = {}, {}
    alive = {key: collector.records[key].stats.alive for key in keys}
    for key, t in zip(keys, targets):
        neighbours[key] = _neighbours(t.sae.W_dec.detach(), alive[key], n_neighbours)
    if compare_key is not None:
        other_t = targets[-1]
        for key, t in zip(keys[:-1], targets[:-1]):
            across[key] = (compare_key, _neighbours(t.sae.W_dec.detach(), alive[key], n_neighbours,
                                                   other_t.sae.W_dec.detach().to(t.sae.device), alive[compare_key]))
        first_key, first_t = keys[0], targets[0]
        across[compare_key] = (first_key, _neighbours(other_t.sae.W_dec.detach(), alive[compare_key], n_neighbours,
                                                      first_t.sae.W_dec.detach().to(other_t.sae.device),
                                                      alive[first_key]))
    weights_seconds = time.perf_counter() - weights_start

    # ---- the site
    write_start = time.perf_counter()
    texts, byte_ids = token_texts(lm.tokenizer, lm.d_vocab)
    edges = LatentStats.bin_edges().tolist()
    edges = [0.0] + edges[1:-1] + [None]  # activations are > 0: the first bin starts at 0
    data_name = _describe_data(main.config, split)
    sae_meta = []
    for key, t in zip(keys, targets):
        sae = t.sae
        stats = collector.records[key].stats
        sae_meta.append({
            "key": key, "label": t.label, "hook": t.hook, "origin": t.origin, "kind": t.kind,
            "n_latents": sae.n_latents, "d_in": sae.d_in, "d_out": sae.d_out, "activation": sae.activation, "k": sae.k,
            "alive": stats.n_alive, "dead": sae.n_latents - stats.n_alive, "shard": shard_size,
            "compare": across[key][0] if key in across else None,
            "groups": latent_groups(sae),  # Matryoshka's nested prefixes: each latent's group is shown
        })
    title = " vs ".join(t.label for t in targets)
    meta = {"format": FORMAT, "version": VERSION, "title": title, "model": str(main.config.model.name),
            "data": data_name, "split": split, "tokens": n_read, "window": {"before": before, "after": after},
            "hist_edges": edges, "logit_note": notes_logit, "vocab_size": lm.d_vocab, "token_shard": token_shard,
            "saes": sae_meta, "notes": notes, "created": time.strftime("%Y-%m-%d %H:%M"),
            "top_k": top_k, "n_samples": n_samples}
    with SiteWriter(out) as site:
        site.copy_static()
        site.write_data("meta", "", "meta.js", meta)
        site.write_data("vocab", "", "vocab.js", {"texts": texts, "bytes": byte_ids})
        for key, t in zip(keys, targets):
            _write_sae(site, key, t, collector.records[key], effects[key], neighbours[key], across.get(key),
                       shard_size, token_shard, lm.d_vocab)
            collector.records[key].stats.save(site.root / "latent_stats" / key, metadata={
                "label": t.label, "hook": t.hook, "origin": t.origin, "kind": t.kind,
                "sae_fingerprint": sae_fingerprint(t.sae), "latent_groups": latent_groups(t.sae),
                "model": str(main.config.model.name),
                "data": {"spec": main.config.data_spec(), "context_length": main.config.data.context_length,
                         "split": split}})
        record = {
            "format": FORMAT, "version": VERSION, "title": title, "model": str(main.config.model.name),
            "data": data_name, "split": split, "tokens_asked": n_tokens, "tokens": n_read,
            "saes": sae_meta, "device": str(device), "notes": notes,
            "settings": {"top_k": top_k, "n_samples": n_samples, "before": before, "after": after,
                         "token_latents": token_latents, "logit_k": logit_k, "n_neighbours": n_neighbours,
                         "shard_size": shard_size, "token_shard": token_shard, "seed": seed},
            "seconds": {"collection_pass": round(pass_seconds, 3), "weights": round(weights_seconds, 3),
                        "write": round(time.perf_counter() - write_start, 3)},
            "files": site.files_written + 1, "bytes": site.bytes_written,
        }
        record["seconds"]["total"] = round(time.perf_counter() - started, 3)
        record["memory"] = _peak_memory()
        site.write_text(RECORD_NAME, json.dumps(record, indent=2) + "\n")
        index = site.commit()
    log(f"  weights {weights_seconds:.1f} s, site {record['seconds']['write']:.1f} s "
        f"({record['files']} files, {record['bytes'] / 2**20:.1f} MiB); total {record['seconds']['total']:.1f} s")
    record["index"] = str(index)
    return record


def _describe_data(config, split: str) -> str:
    spec = config.data_spec()
    kind = spec.get("kind")
    what = {"embedded": "the embedded corpus", "hf": f"{spec.get('name')}", "text": f"{spec.get('path')}",
            "tokens": f"{spec.get('path')}"}.get(kind, str(kind))
    return f"{what} ({'held-out' if split == 'eval' else 'training'} split)"


def _write_sae(site: SiteWriter, key: str, target: SAETarget, rec: LatentRecords, effect: dict,
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
