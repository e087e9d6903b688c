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
4. fastsae.dashboard.site writes the site, atomically (each SAE's data files: fastsae.dashboard.sae_data).
"""

from __future__ import annotations

import json
import re
import resource
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from fastsae.analysis.latent_stats import LatentStats, latent_groups, sae_fingerprint
from fastsae.analysis.similarity import nearest_latents
from fastsae.analysis.stream import (ActivationStream, AnalysisError, SAETarget, check_widths, held_out_batches,
                                     load_language_model, load_targets, resolve_device)
from fastsae.dashboard.collect import DashboardCollector
from fastsae.dashboard.sae_data import write_sae_data
from fastsae.dashboard.site import FORMAT, RECORD_NAME, VERSION, SiteError, SiteWriter, check_out_dir
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


@dataclass(frozen=True)
class DashboardSettings:
    """What a dashboard shows of each latent and how its data files are cut: build_dashboard's
    keywords of that name, travelling together (and recorded as the build record's "settings")."""

    top_k: int
    n_samples: int
    before: int
    after: int
    token_latents: int
    logit_k: int
    n_neighbours: int
    shard_size: int
    token_shard: int
    seed: int

    def check(self) -> None:
        for name in ("top_k", "n_samples", "token_latents", "logit_k", "n_neighbours", "shard_size", "token_shard"):
            _check_positive(name, getattr(self, name))
        for name in ("before", "after"):
            _check_positive(name, getattr(self, name), minimum=0)


@dataclass
class _Shown:
    """The SAEs a dashboard shows (the compared one last), their page keys, and the notes so far."""

    config: object  # the TrainConfig the specs name (model, data)
    targets: list[SAETarget]
    keys: list[str]
    compare_key: str | None
    notes: list[str]


@dataclass
class _Weights:
    """What the decoder weights say of each latent: logit effects and nearest latents."""

    effects: dict
    logit_note: str | None
    neighbours: dict
    across: dict  # key -> (the other SAE's key, its nearest latents there), with --compare
    seconds: float


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
    settings = DashboardSettings(top_k=top_k, n_samples=n_samples, before=before, after=after,
                                 token_latents=token_latents, logit_k=logit_k, n_neighbours=n_neighbours,
                                 shard_size=shard_size, token_shard=token_shard, seed=seed)
    out = _check_arguments(out, split, n_tokens, settings)
    device = resolve_device(device)
    shown = _load_saes(target, compare, model=model, config=config, overrides=overrides, device=device)
    lm = _load_model(shown, device)
    collector, pass_seconds = _collection_pass(lm, shown, settings, split, n_tokens, device, log)
    weights = _weigh(lm, shown, collector, settings.n_neighbours, settings.logit_k)
    record = _write_site(out, lm, shown, collector, weights, settings, split=split, n_tokens=n_tokens,
                         device=device, pass_seconds=pass_seconds, started=started)
    log(f"  weights {weights.seconds:.1f} s, site {record['seconds']['write']:.1f} s "
        f"({record['files']} files, {record['bytes'] / 2**20:.1f} MiB); total {record['seconds']['total']:.1f} s")
    return record


def _check_arguments(out: str | Path, split: str, n_tokens: int, settings: DashboardSettings) -> Path:
    """The arguments checked before anything is loaded; ``out`` as a Path."""
    if split not in SPLITS:
        raise DashboardError(f"split must be one of {SPLITS}, got {split!r}")
    _check_positive("n_tokens", n_tokens)
    settings.check()
    out = Path(out)
    try:
        check_out_dir(out)
    except SiteError as error:
        raise DashboardError(str(error)) from None
    return out


def _load_saes(target: str, compare: str | None, *, model, config, overrides, device: torch.device) -> _Shown:
    """The SAEs ``target`` names and the one ``compare`` names (last), checked to be comparable."""
    main = load_targets([target], model=model, config=config, overrides=overrides, device=device)
    targets = list(main.targets)
    notes = list(main.notes)
    if compare is not None:
        other = load_targets([compare], model=main.config.model.name, config=config, overrides=overrides,
                             device=device)
        if len(other.targets) != 1:
            raise DashboardError(f"--compare {compare} names {len(other.targets)} SAEs "
                                 f"({', '.join(t.label for t in other.targets)}); give one (PATH@HOOK)")
        notes += other.notes
        notes += _comparison_notes(targets, other.targets[0])
        targets.append(other.targets[0])
    taken: set[str] = set()
    keys = [_slug(t.label, taken) for t in targets]
    if len(set(keys)) != len(keys):
        raise DashboardError("SAE labels collide")
    return _Shown(main.config, targets, keys, keys[-1] if compare is not None else None, notes)


def _comparison_notes(targets: Sequence[SAETarget], other: SAETarget) -> list[str]:
    """Raises where ``other``'s directions cannot be compared with the targets'; notes where they
    read different hooks."""
    notes = []
    for t in targets:
        if t.sae.d_out != other.sae.d_out:  # decoder rows: the width they write
            raise DashboardError(f"{t.label} (d_out {t.sae.d_out}) and --compare {other.label} "
                                 f"(d_out {other.sae.d_out}) live in spaces of different widths: "
                                 "their decoder directions cannot be compared")
        if t.hook != other.hook:
            notes.append(f"{t.label} reads {t.hook} and {other.label} reads "
                         f"{other.hook}: their directions are compared as vectors of the same width")
    return notes


def _load_model(shown: _Shown, device: torch.device):
    """The language model the SAEs read, with its tokenizer, checked against every SAE's width."""
    lm = load_language_model(shown.config, device)
    if lm.tokenizer is None:
        raise DashboardError(f"the model {shown.config.model.name} has no tokenizer: a dashboard shows the text of "
                             "the tokens; save the tokenizer beside the model (tokenizer.save_pretrained(DIR))")
    _check_widths(lm, shown.targets)
    return lm


def _collection_pass(lm, shown: _Shown, settings: DashboardSettings, split: str, n_tokens: int,
                     device: torch.device, log: Callable[[str], None]) -> tuple[DashboardCollector, float]:
    """One streaming pass over ``n_tokens`` tokens of ``split``: every SAE's contexts, samples,
    token index and LatentStats, and the pass's seconds. Notes where the data ran out; raises
    where an SAE has no alive latent."""
    saes = {key: (t.hook_in, t.sae) for key, t in zip(shown.keys, shown.targets)}  # a transcoder reads IN
    for _, sae in saes.values():
        sae.eval()
    collector = DashboardCollector(saes, lm.d_vocab, top_k=settings.top_k, n_samples=settings.n_samples,
                                   token_latents=settings.token_latents, before=settings.before,
                                   after=settings.after, seed=settings.seed)
    batches = held_out_batches(lm, shown.config, split=split)
    stream = ActivationStream(lm, batches, hooks=sorted({t.hook_in for t in shown.targets}), n_tokens=n_tokens)
    log(f"fastsae dashboard: {len(shown.targets)} SAE(s) on {shown.config.model.name}, reading up to "
        f"{n_tokens:,} tokens of the {split} split on {device}")
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
        shown.notes.append(f"The {split} data held {n_read:,} tokens, fewer than the {n_tokens:,} asked: "
                           "each was read once.")
    log(f"  pass: {n_read:,} tokens in {pass_seconds:.1f} s ({n_read / max(pass_seconds, 1e-9):,.0f} tokens/s)")
    for key, t in zip(shown.keys, shown.targets):
        if collector.records[key].stats.n_alive == 0:
            raise DashboardError(f"no latent of {t.label} fired on the {n_read:,} tokens read: there is nothing "
                                 "to show (is it the model and hook it was trained on?)")
    return collector, pass_seconds


def _weigh(lm, shown: _Shown, collector: DashboardCollector, n_neighbours: int, logit_k: int) -> _Weights:
    """Each latent's logit effect and nearest alive latents (in its SAE and, with --compare, in the other)."""
    start = time.perf_counter()
    keys, targets = shown.keys, shown.targets
    effects, logit_note = {}, None
    for key, t in zip(keys, targets):
        effects[key], logit_note = logit_effect(t.sae.W_dec, lm, logit_k)
    neighbours, across = {}, {}
    alive = {key: collector.records[key].stats.alive for key in keys}
    for key, t in zip(keys, targets):
        neighbours[key] = _neighbours(t.sae.W_dec.detach(), alive[key], n_neighbours)
    compare_key = shown.compare_key
    if compare_key is not None:
        other_t = targets[-1]
        for key, t in zip(keys[:-1], targets[:-1]):
            across[key] = (compare_key, _neighbours(t.sae.W_dec.detach(), alive[key], n_neighbours,
                                                   other_t.sae.W_dec.detach().to(t.sae.device), alive[compare_key]))
        first_key, first_t = keys[0], targets[0]
        across[compare_key] = (first_key, _neighbours(other_t.sae.W_dec.detach(), alive[compare_key], n_neighbours,
                                                      first_t.sae.W_dec.detach().to(other_t.sae.device),
                                                      alive[first_key]))
    return _Weights(effects, logit_note, neighbours, across, time.perf_counter() - start)


def _sae_meta(shown: _Shown, collector: DashboardCollector, across: dict, shard_size: int) -> list[dict]:
    """The site's (and the record's) entry for each SAE."""
    sae_meta = []
    for key, t in zip(shown.keys, shown.targets):
        sae = t.sae
        stats = collector.records[key].stats
        sae_meta.append({
            "key": key, "label": t.label, "hook": t.hook, "origin": t.origin, "objective": t.objective,
            "n_latents": sae.n_latents, "d_in": sae.d_in, "d_out": sae.d_out, "activation": sae.activation, "k": sae.k,
            "alive": stats.n_alive, "dead": sae.n_latents - stats.n_alive, "shard": shard_size,
            "compare": across[key][0] if key in across else None,
            "groups": latent_groups(sae),  # Matryoshka's nested prefixes: each latent's group is shown
        })
    return sae_meta


def _write_site(out: Path, lm, shown: _Shown, collector: DashboardCollector, weights: _Weights,
                settings: DashboardSettings, *, split: str, n_tokens: int, device: torch.device,
                pass_seconds: float, started: float) -> dict:
    """Write the site (atomically) and its record OUT/dashboard.json; returns the record, with
    the index page's path."""
    write_start = time.perf_counter()
    config = shown.config
    texts, byte_ids = token_texts(lm.tokenizer, lm.d_vocab)
    edges = LatentStats.bin_edges().tolist()
    edges = [0.0] + edges[1:-1] + [None]  # activations are > 0: the first bin starts at 0
    data_name = _describe_data(config, split)
    sae_meta = _sae_meta(shown, collector, weights.across, settings.shard_size)
    title = " vs ".join(t.label for t in shown.targets)
    meta = {"format": FORMAT, "version": VERSION, "title": title, "model": str(config.model.name),
            "data": data_name, "split": split, "tokens": collector.n_tokens,
            "window": {"before": settings.before, "after": settings.after},
            "hist_edges": edges, "logit_note": weights.logit_note, "vocab_size": lm.d_vocab,
            "token_shard": settings.token_shard, "saes": sae_meta, "notes": shown.notes,
            "created": time.strftime("%Y-%m-%d %H:%M"), "top_k": settings.top_k, "n_samples": settings.n_samples}
    with SiteWriter(out) as site:
        site.copy_static()
        site.write_data("meta", "", "meta.js", meta)
        site.write_data("vocab", "", "vocab.js", {"texts": texts, "bytes": byte_ids})
        for key, t in zip(shown.keys, shown.targets):
            write_sae_data(site, key, t, collector.records[key], weights.effects[key], weights.neighbours[key],
                       weights.across.get(key), settings.shard_size, settings.token_shard, lm.d_vocab)
            collector.records[key].stats.save(site.root / "latent_stats" / key, metadata={
                "label": t.label, "hook": t.hook, "origin": t.origin, "objective": t.objective,
                "sae_fingerprint": sae_fingerprint(t.sae), "latent_groups": latent_groups(t.sae),
                "model": str(config.model.name),
                "data": {"spec": config.data_spec(), "context_length": config.data.context_length,
                         "split": split}})
        record = {
            "format": FORMAT, "version": VERSION, "title": title, "model": str(config.model.name),
            "data": data_name, "split": split, "tokens_asked": n_tokens, "tokens": collector.n_tokens,
            "saes": sae_meta, "device": str(device), "notes": shown.notes, "settings": asdict(settings),
            "seconds": {"collection_pass": round(pass_seconds, 3), "weights": round(weights.seconds, 3),
                        "write": round(time.perf_counter() - write_start, 3)},
            "files": site.files_written + 1, "bytes": site.bytes_written,
        }
        record["seconds"]["total"] = round(time.perf_counter() - started, 3)
        record["memory"] = _peak_memory()
        site.write_text(RECORD_NAME, json.dumps(record, indent=2) + "\n")
        index = site.commit()
    record["index"] = str(index)
    return record


def _describe_data(config, split: str) -> str:
    spec = config.data_spec()
    source = spec.get("source")
    what = {"embedded": "the embedded corpus", "hf": f"{spec.get('name')}", "text": f"{spec.get('path')}",
            "tokens": f"{spec.get('path')}"}.get(source, str(source))
    return f"{what} ({'held-out' if split == 'eval' else 'training'} split)"
