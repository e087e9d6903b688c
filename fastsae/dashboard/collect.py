"""What a dashboard shows of each latent, collected in one streaming pass over the tokens.

Per SAE, batch by batch, from the SparseCode of ``E2ESAE.encode_sparse`` (so every activation
function is handled alike, and no [tokens, n_latents] tensor ever exists):

    top        each latent's ``top_k`` largest activations, with a window of tokens around each and
               the latent's activation on every token of the window (for the shading);
    samples    a uniform random sample of ``n_samples`` of each latent's firings, with the same
               windows (the dashboard groups them by activation quantile);
    by_token   for each token id of the vocabulary, the ``token_latents`` latents that fired most
               strongly on it (their largest activation on that token): "which latents fire on ` def`";
    stats      fastsae.analysis.LatentStats: firing counts, max and mean activations, histograms.

All of it stays on the SAE's device; the state is O(n_latents x (top_k + n_samples) x window +
d_vocab x token_latents), the temporaries O(batch tokens x code width).

The selections are exact and do not depend on how the tokens are split into batches: the top
entries are the largest activations, ties going to the earlier token; the samples are the firings
with the largest keys of a fixed hash of (token position, latent), which is a uniform random
sample of each latent's firings; ``by_token`` keeps each latent's largest activation on the token.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from fastsae.analysis.latent_stats import LatentStats
from fastsae.sae import E2ESAE, SparseCode

# Window of tokens shown around an activation: this many before it and after it (the model is
# causal: the tokens before explain the activation, the few after show where the text goes).
DEFAULT_BEFORE, DEFAULT_AFTER = 16, 6
EMPTY_TOKEN = -1  # window slots outside the token's row (before its start, after its end)
# Query elements per chunk when a batch's candidates look up their windows' activations.
LOOKUP_CHUNK = 1 << 22


class SegmentTopK:
    """For each of ``n_segments`` segments (latents, or token ids), the ``k`` entries of largest key
    seen so far in a stream of entries, with a payload per entry, merged batch by batch.

    State on ``device``: keys float64 [n_segments, k] (-inf marks an empty slot), seq int64 [n, k]
    (each held entry's place in the stream) and one payload tensor [n_segments, k, *shape] per name.
    With ``unique=True`` each entry carries an id (e.g. a latent) and a segment keeps one entry per
    id, the one of largest key.

    Slots are kept unordered while the stream runs: a batch's entries that enter a segment's top k
    take the slots of the entries they push out, so an update writes payload only for the entries
    that enter (not for every slot of every segment it touches: at 46,080 latents most latents are
    touched by every batch). ``sort_()`` orders each row, largest key first, when the stream ends.

    Ties go to the entry seen first (earlier batches; within a batch, the earlier entry), so the
    result is the same however a stream is cut into batches.
    """

    def __init__(self, n_segments: int, k: int, payload: dict[str, tuple[tuple[int, ...], torch.dtype]], *,
                 device: torch.device | str | None = None, unique: bool = False):
        if n_segments < 1 or k < 1:
            raise ValueError(f"n_segments and k must be positive, got {n_segments} and {k}")
        self.n_segments, self.k, self.unique = n_segments, k, unique
        self.keys = torch.full((n_segments, k), float("-inf"), dtype=torch.float64, device=device)
        self.seq = torch.full((n_segments, k), torch.iinfo(torch.int64).max, dtype=torch.int64, device=device)
        self.payload = {name: torch.zeros((n_segments, k, *shape), dtype=dtype, device=device)
                        for name, (shape, dtype) in payload.items()}
        if unique:
            self.payload.setdefault("id", torch.full((n_segments, k), -1, dtype=torch.int64, device=device))
        # the smallest key a segment holds (-inf while it has an empty slot): what an entry must beat
        self.threshold = torch.full((n_segments,), float("-inf"), dtype=torch.float64, device=device)
        self.seen = 0  # entries seen so far: the next entry's place in the stream

    @torch.no_grad()
    def update(self, segments: torch.Tensor, keys: torch.Tensor,
               make_payload: Callable[[torch.Tensor], dict[str, torch.Tensor]], ids: torch.Tensor | None = None) -> None:
        """Merge entries (segments int64 [E], keys [E], ids int64 [E] when unique) in stream order.

        make_payload(entries) -> {name: [m, *shape]}: the payload of the entries at those indices
        (into the E entries); it is called once, only for the entries that enter a top k.
        """
        if self.unique and ids is None:
            raise ValueError("a unique SegmentTopK needs the entries' ids")
        keys = keys.to(torch.float64)
        first_seq = self.seen
        self.seen += keys.numel()
        # An entry whose key does not beat its segment's smallest (an equal one came first) cannot enter.
        candidates = (keys > self.threshold[segments]).nonzero().squeeze(1)
        if candidates.numel() == 0:
            return
        device, k = keys.device, self.k
        touched, local = torch.unique(segments[candidates], return_inverse=True)
        n_old = touched.numel() * k
        # The union of the touched segments' slots (first) and the candidates.
        all_keys = torch.cat([self.keys[touched].reshape(-1), keys[candidates]])
        all_seq = torch.cat([self.seq[touched].reshape(-1), candidates + first_seq])
        all_local = torch.cat([torch.arange(touched.numel(), device=device).repeat_interleave(k), local])
        # Rank: larger key first, then earlier in the stream (two stable sorts).
        order = torch.sort(all_seq, stable=True).indices
        order = order[torch.sort(all_keys[order], descending=True, stable=True).indices]
        if self.unique:  # keep each id's best entry; empty slots get distinct negative ids
            all_ids = torch.cat([self.payload["id"][touched].reshape(-1), ids[candidates].to(torch.int64)])
            empty = all_keys == float("-inf")
            all_ids = torch.where(empty, -1 - torch.arange(all_ids.numel(), device=device), all_ids) + all_ids.numel()
            key = all_local[order] * (int(all_ids.max()) + 1) + all_ids[order]
            by_id = torch.sort(key, stable=True).indices
            first = torch.ones_like(by_id, dtype=torch.bool)
            first[1:] = key[by_id[1:]] != key[by_id[:-1]]
            order = order[torch.sort(by_id[first]).values]
        order = order[torch.sort(all_local[order], stable=True).indices]
        counts = torch.bincount(all_local[order], minlength=touched.numel())
        rank = torch.arange(order.numel(), device=device) - (torch.cumsum(counts, 0) - counts)[all_local[order]]
        kept = torch.zeros(all_keys.numel(), dtype=torch.bool, device=device)
        kept[order[rank < k]] = True
        # Each segment keeps k entries, so the old slots it drops and the candidates it takes are as
        # many: paired in segment order, each entering candidate takes a dropped slot.
        dropped = (~kept[:n_old]).nonzero().squeeze(1)  # ascending flat slots: in segment order
        entering = kept[n_old:].nonzero().squeeze(1)
        entering = entering[torch.sort(local[entering], stable=True).indices]
        if entering.numel() == 0:
            return
        slots = touched[dropped // k] * k + dropped % k  # flat in [n_segments * k]
        entries = candidates[entering]
        self.keys.view(-1)[slots] = keys[entries]
        self.seq.view(-1)[slots] = entries + first_seq
        fresh = make_payload(entries)
        if self.unique:
            fresh = {**fresh, "id": ids[entries].to(torch.int64)}
        for name, store in self.payload.items():
            store.view(-1, *store.shape[2:]).index_copy_(0, slots, fresh[name].to(store.dtype))
        self.threshold[touched] = self.keys[touched].min(1).values

    @torch.no_grad()
    def sort_(self) -> "SegmentTopK":
        """Order every row: largest key first, ties by place in the stream, empty slots last."""
        order = torch.sort(self.seq, dim=1, stable=True).indices
        order = order.gather(1, torch.sort(self.keys.gather(1, order), dim=1, descending=True, stable=True).indices)
        self.keys = self.keys.gather(1, order)
        self.seq = self.seq.gather(1, order)
        for name, store in self.payload.items():
            index = order.reshape(*order.shape, *([1] * (store.ndim - 2))).expand_as(store)
            self.payload[name] = store.gather(1, index)
        return self

    def counts(self) -> torch.Tensor:
        """int64 [n_segments]: filled slots per segment."""
        return (self.keys > float("-inf")).sum(1)


def sample_keys(positions: torch.Tensor, latents: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A fixed pseudo-random key in [0, 1) per (global token position, latent): the largest keys of
    a latent's firings are a uniform random sample of them, the same however the stream is batched
    and on any device. Integer mixing kept below 2^62, so int64 never overflows."""
    mask = (1 << 31) - 1
    x = (positions.to(torch.int64) * 1_000_003 + latents.to(torch.int64) * 7_919 + seed * 65_537) & mask
    for multiplier in (0x2C1B3C6D, 0x297A2D39, 0x1B873593):
        x = ((x ^ (x >> 15)) * multiplier) & mask
    x = x ^ (x >> 13)
    return x.to(torch.float64) / float(1 << 31)


@dataclass
class LatentRecords:
    """What the pass collected for one SAE (tensors on the SAE's device).

    top, samples: SegmentTopK over latents with payload position (int64, global token index in the
    stream), tokens (int32 [window], EMPTY_TOKEN outside the row), acts (float32 [window], the
    latent's activation on each window token), value (float32, the activation); the window's
    centre is index ``before``. by_token: SegmentTopK over token ids, unique by latent (payload id).
    """

    top: SegmentTopK
    samples: SegmentTopK
    by_token: SegmentTopK
    stats: LatentStats
    before: int
    after: int

    @property
    def window(self) -> int:
        return self.before + 1 + self.after


@dataclass
class DashboardCollector:
    """The one-pass collection for several SAEs (see the module docstring).

        collector = DashboardCollector({"e2e": (hook, sae)}, d_vocab=lm.d_vocab)
        for batch in ActivationStream(lm, batches, hooks=[hook], n_tokens=n):
            collector.update(batch.tokens, batch.activations)
        records = collector.records["e2e"]
    """

    saes: dict[str, tuple[str, E2ESAE]]
    d_vocab: int
    top_k: int = 20
    n_samples: int = 20
    token_latents: int = 16
    before: int = DEFAULT_BEFORE
    after: int = DEFAULT_AFTER
    seed: int = 0
    records: dict[str, LatentRecords] = field(init=False)
    n_tokens: int = field(init=False, default=0)

    def __post_init__(self):
        for name, value in (("top_k", self.top_k), ("n_samples", self.n_samples), ("token_latents", self.token_latents),
                            ("d_vocab", self.d_vocab)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name, value in (("before", self.before), ("after", self.after)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        window = self.before + 1 + self.after
        context = {"position": ((), torch.int64), "tokens": ((window,), torch.int32),
                   "acts": ((window,), torch.float32), "value": ((), torch.float32)}
        self.records = {}
        for name, (_, sae) in self.saes.items():
            device = sae.device
            self.records[name] = LatentRecords(
                top=SegmentTopK(sae.n_latents, self.top_k, context, device=device),
                samples=SegmentTopK(sae.n_latents, self.n_samples, context, device=device),
                by_token=SegmentTopK(self.d_vocab, self.token_latents, {"value": ((), torch.float32)}, device=device,
                                     unique=True),
                stats=LatentStats(sae.n_latents, device=device), before=self.before, after=self.after)

    @torch.no_grad()
    def update(self, tokens: torch.Tensor, activations: dict[str, torch.Tensor]) -> None:
        """One batch: tokens [B, T] and the activations {hook: [B, T, d_in]} the SAEs read."""
        for name, (hook, sae) in self.saes.items():
            code = sae.encode_sparse(activations[hook].to(sae.device, sae.dtype))
            self._update_one(self.records[name], tokens.to(sae.device), code.values, code.indices, sae.n_latents)
        self.n_tokens += tokens.numel()

    def finish(self) -> "DashboardCollector":
        """Order every latent's top entries and samples, largest first (call once the stream ends)."""
        for rec in self.records.values():
            for store in (rec.top, rec.samples, rec.by_token):
                store.sort_()
        return self

    def _update_one(self, rec: LatentRecords, tokens, values, indices, n_latents: int) -> None:
        batch = BatchEntries(tokens, values, indices, n_latents, offset=self.n_tokens)
        rec.stats.update(_packed(batch.values, batch.latents, tokens.numel()))
        if batch.latents.numel() == 0:
            return
        windows = functools.partial(batch.windows, before=rec.before, after=rec.after)
        rec.top.update(batch.latents, batch.values, windows)
        rec.samples.update(batch.latents, sample_keys(batch.positions + self.n_tokens, batch.latents, self.seed), windows)
        rec.by_token.update(batch.tokens.reshape(-1)[batch.positions], batch.values,
                            lambda entries: {"value": batch.values[entries]}, ids=batch.latents)


class BatchEntries:
    """The active entries of one batch's SparseCode, flat: values (float32), latents and positions
    (int64; the token's index in the batch, row-major) [E] each, in token order; tokens [B, T].
    ``offset``: the batch's first token's index in the stream."""

    def __init__(self, tokens: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, n_latents: int,
                 offset: int = 0):
        flat_values = values.reshape(-1)
        active = (flat_values > 0).nonzero().squeeze(1)
        self.tokens, self.n_latents, self.offset = tokens, n_latents, offset
        self.values = flat_values[active].float()
        self.latents = indices.reshape(-1)[active].to(torch.int64)
        self.positions = active // values.shape[-1]
        self._lookup = None

    def _by_latent(self):
        """The entries ordered by (latent, position), and each entry's rank in that order: a
        latent's firings within a window of its token sit next to each other there. Built when
        first needed."""
        if self._lookup is None:
            order = torch.sort(self.latents * self.tokens.numel() + self.positions).indices
            rank = torch.empty_like(order)
            rank[order] = torch.arange(order.numel(), device=order.device)
            self._lookup = order, rank
        return self._lookup

    def windows(self, entries: torch.Tensor, *, before: int, after: int) -> dict[str, torch.Tensor]:
        """For the entries at these indices: position in the stream, value, and the window of tokens
        around each (``before`` + 1 + ``after``; EMPTY_TOKEN outside the token's row) with the
        entry's latent's activation on each of them.

        The activations come from the entry's neighbours in (latent, position) order: the latent's
        firings on the window's tokens are the ones at most ``before`` ranks before it and ``after``
        after (a latent fires at most once per token), so no search is needed."""
        ctx = self.tokens.shape[1]
        flat_tokens = self.tokens.reshape(-1)
        order, rank = self._by_latent()
        offsets = torch.arange(-before, after + 1, device=self.tokens.device)
        width = offsets.numel()
        window_tokens = torch.empty(entries.numel(), width, dtype=torch.int32, device=self.tokens.device)
        acts = torch.zeros(entries.numel(), width, dtype=torch.float32, device=self.tokens.device)
        step = max(1, LOOKUP_CHUNK // width)  # bounds the [chunk, window] temporaries
        for start in range(0, entries.numel(), step):
            part = entries[start:start + step]
            pos, lat = self.positions[part], self.latents[part]
            cols = (pos % ctx)[:, None] + offsets[None, :]
            inside = (cols >= 0) & (cols < ctx)
            where = (pos // ctx)[:, None] * ctx + cols.clamp(0, ctx - 1)
            window_tokens[start:start + step] = torch.where(inside, flat_tokens[where], EMPTY_TOKEN)
            near = rank[part][:, None] + offsets[None, :]
            real = (near >= 0) & (near < order.numel())
            neighbour = order[near.clamp(0, order.numel() - 1)]  # entry indices [chunk, window]
            shift = self.positions[neighbour] - pos[:, None]  # its token relative to the entry's
            same = (real & (self.latents[neighbour] == lat[:, None]) & (shift >= -before) & (shift <= after)
                    & (self.positions[neighbour] // ctx == (pos // ctx)[:, None]))
            # each window column gets at most one neighbour; the others add 0 somewhere
            acts[start:start + step].scatter_add_(1, torch.where(same, shift + before, 0),
                                                  torch.where(same, self.values[neighbour], 0.0))
        return {"position": self.positions[entries] + self.offset, "tokens": window_tokens, "acts": acts,
                "value": self.values[entries]}


def _packed(values: torch.Tensor, latents: torch.Tensor, n_tokens: int) -> SparseCode:
    """A batch's active entries as a SparseCode [n_tokens, ceil(entries / n_tokens)] (value-0
    padding), for LatentStats: its statistics are sums and maxima over entries, which token an entry
    sits at does not matter to them, and encode_sparse's width (the batch's largest L0, often ten
    times the mean: a few tokens fire hundreds of latents) would make it process mostly padding."""
    width = max(1, -(-values.numel() // n_tokens))
    packed_values = values.new_zeros(n_tokens * width)
    packed_latents = latents.new_zeros(n_tokens * width)
    packed_values[:values.numel()] = values
    packed_latents[:latents.numel()] = latents
    return SparseCode(packed_values.view(n_tokens, width), packed_latents.view(n_tokens, width))


def collect(stream: Iterable, saes: dict[str, tuple[str, E2ESAE]], d_vocab: int, **options) -> DashboardCollector:
    """Run the pass over ``stream`` (fastsae.analysis.ActivationStream: batches with .tokens and
    .activations) for ``saes`` {name: (hook, sae)}; options as DashboardCollector's."""
    collector = DashboardCollector(saes, d_vocab, **options)
    for batch in stream:
        collector.update(batch.tokens, batch.activations)
    return collector.finish()
