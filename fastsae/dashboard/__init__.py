"""fastsae.dashboard: feature dashboards in the browser (`fastsae dashboard`).

    from fastsae.dashboard import build_dashboard
    build_dashboard("runs/e2e", "dash", n_tokens=1_000_000, compare="runs/local")   # open dash/index.html

A static site (no server, no network, nothing fetched from outside it): an index of every latent
(frequency, max activation, the tokens it fires on; sortable, filterable, searchable by id and by
token) and a page per latent (activation histogram, top activating contexts with per-token shading,
samples across activation quantiles, logit effect, nearest latents in the same and in a compared
SAE). Collected in one streaming pass over the tokens (collect.py), written by site.py.

    collect.py   DashboardCollector / SegmentTopK: the one-pass, on-device per-latent top-k
    weights.py   logit effect through the final norm and W_U; exact token texts
    site.py      the site's files (data as script shards that load from file:// and any server)
    sae_data.py  one SAE's data files: its index, latent shards and token shards
    build.py     build_dashboard: load, stream, collect, write
    static/      the hand-written page: index.html, dashboard.js, dashboard.css
"""

from fastsae.dashboard.build import DashboardError, build_dashboard
from fastsae.dashboard.collect import DashboardCollector, SegmentTopK, collect

__all__ = ["DashboardCollector", "DashboardError", "SegmentTopK", "build_dashboard", "collect"]
