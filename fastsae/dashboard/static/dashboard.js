/* fastsae dashboard: plain JavaScript, no library, nothing fetched from outside the site.
 *
 * Data files are scripts that call fastsaeDashboard.register(kind, name, data): a page opened from
 * disk (file://) may load scripts but not fetch() files, so every file is loaded with a <script>
 * tag, on demand: data/meta.js and the SAE's index at start, data/vocab.js, one shard of latents
 * (data/<sae>/latents/NNNNN.js) when a latent is opened, one shard of the token index
 * (data/<sae>/tokens/NNNNN.js) when a token is searched.
 *
 * Text from the data (token texts above all) only ever reaches the page through textContent,
 * createTextNode or attributes: never as HTML.
 */
(function () {
  "use strict";

  const registry = new Map();
  const pending = new Map();
  window.fastsaeDashboard = {
    register(kind, name, data) { registry.set(kind + ":" + name, data); },
  };

  // ------------------------------------------------------------------ loading

  function load(kind, name, src) {
    const key = kind + ":" + name;
    if (registry.has(key)) return Promise.resolve(registry.get(key));
    if (pending.has(key)) return pending.get(key);
    const promise = new Promise((resolve, reject) => {
      const script = document.createElement("script");
      script.src = src;
      script.async = true;
      script.onload = () => {
        if (registry.has(key)) resolve(registry.get(key));
        else reject(new Error(src + " did not define " + key));
      };
      script.onerror = () => reject(new Error("could not load " + src +
        " (is the dashboard directory complete?)"));
      document.head.appendChild(script);
    });
    pending.set(key, promise);
    promise.catch(() => pending.delete(key));
    return promise;
  }

  const pad5 = (i) => String(i).padStart(5, "0");
  let meta = null;
  let vocab = null;       // token id -> its exact text
  let byteTokens = null;  // ids whose text holds \xNN escapes for bytes that are not whole UTF-8

  function latentShard(sae, shard) {
    return load("latents", sae.key + "/" + shard, "data/" + sae.key + "/latents/" + pad5(shard) + ".js");
  }
  function tokenShard(sae, shard) {
    return load("tokens", sae.key + "/" + shard, "data/" + sae.key + "/tokens/" + pad5(shard) + ".js");
  }

  // ------------------------------------------------------------------ small DOM helpers

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value);
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
    }
    return node;
  }
  const $ = (id) => document.getElementById(id);

  function fmt(x, digits) {
    if (x === null || x === undefined || !isFinite(x)) return "–";
    if (x === 0) return "0";
    const a = Math.abs(x);
    if (a >= 1e4 || a < 1e-3) return x.toExponential(Math.max(0, (digits || 3) - 1));
    return Number(x.toPrecision(digits || 3)).toString();
  }
  function pct(freq) {
    if (!freq) return "0 %";
    const p = 100 * freq;
    return (p >= 0.01 ? fmt(p, 3) : p.toExponential(1)) + " %";
  }
  const intfmt = (n) => Number(n).toLocaleString("en-US");

  // ------------------------------------------------------------------ tokens, shown exactly

  // Characters that would be invisible or break a line, shown as a dim glyph instead.
  const GLYPHS = { "\n": "\u21B5", "\r": "\u240D", "\t": "\u21E5", "\u00A0": "\u2423" };

  function tokenText(id) {
    if (id < 0) return "";
    if (!vocab || id >= vocab.length) return "<" + id + ">";
    return vocab[id];
  }

  // Append the text of a token to node; spaces visible (as a dim ␣) when `spaces` is set. In a
  // token of bytes that are not whole UTF-8 characters, each \xNN escape is dimmed as well.
  function appendTokenText(node, text, spaces, id) {
    if (text === "") { node.appendChild(el("span", { class: "ws", text: "\u2205" })); return; }
    if (byteTokens && byteTokens.has(id)) {
      for (const part of text.split(/(\\x[0-9a-f]{2})/)) {
        if (/^\\x[0-9a-f]{2}$/.test(part)) node.appendChild(el("span", { class: "ws", text: part }));
        else if (part) appendTokenText(node, part, spaces, -1);
      }
      return;
    }
    let run = "";
    const flush = () => { if (run) { node.appendChild(document.createTextNode(run)); run = ""; } };
    for (const ch of text) {
      const code = ch.codePointAt(0);
      let glyph = GLYPHS[ch];
      if (ch === " " && spaces) glyph = "\u2423";
      else if (glyph === undefined && (code < 0x20 || code === 0x7f)) glyph = "\\x" + code.toString(16).padStart(2, "0");
      if (glyph !== undefined) {
        flush();
        node.appendChild(el("span", { class: "ws", text: glyph }));
      } else run += ch;
    }
    flush();
  }

  function tokenTitle(id) {
    const bytes = byteTokens && byteTokens.has(id) ? " (bytes of a UTF-8 character split across tokens)" : "";
    return JSON.stringify(tokenText(id)) + bytes + "  id " + id;
  }

  function tokenChip(id, extraTitle) {
    const chip = el("span", { class: "tokchip", title: tokenTitle(id) + (extraTitle || "") });
    appendTokenText(chip, tokenText(id), true, id);
    return chip;
  }

  // ------------------------------------------------------------------ state

  const state = {
    sae: null, index: null, order: [], page: 0, pageSize: 100,
    sort: { key: "id", dir: 1 }, current: null, token: null,
  };

  function showBanner(message, isError) {
    const banner = $("banner");
    banner.hidden = false;
    banner.className = "banner" + (isError ? " error" : "");
    banner.textContent = message;
  }

  function saeByKey(key) { return meta.saes.find((s) => s.key === key) || null; }

  function parseHash() {
    const params = new URLSearchParams(location.hash.replace(/^#/, ""));
    return { sae: params.get("sae"), latent: params.get("latent") };
  }
  function latentHref(sae, id) {
    return "#" + (sae.key === meta.saes[0].key ? "" : "sae=" + encodeURIComponent(sae.key) + "&") + "latent=" + id;
  }

  // ------------------------------------------------------------------ index table

  function frequency(i) { return state.index.count[i] / meta.tokens; }

  // The group of latent i where the SAE's kind has groups of latents (Matryoshka's nested
  // prefixes: the first prefix that holds it), else null.
  function groupOf(sae, i) {
    for (const group of sae.groups || []) if (i >= group.first && i < group.end) return group;
    return null;
  }
  function groupTitle(sae, group) {
    return "latents " + intfmt(group.first) + "\u2013" + intfmt(group.end - 1) + " of " + intfmt(sae.n_latents) +
      ": in every nested prefix of " + intfmt(group.end) + " latents or more";
  }

  function applyFilters() {
    const index = state.index;
    const n = state.sae.n_latents;
    const alive = $("alive-filter").value;
    const lo = parseFloat($("freq-min").value);
    const hi = parseFloat($("freq-max").value);
    const rows = [];
    for (let i = 0; i < n; i++) {
      const count = index.count[i];
      if (alive === "alive" && count === 0) continue;
      if (alive === "dead" && count > 0) continue;
      if (!isNaN(lo) || !isNaN(hi)) {
        if (count === 0) continue; // log10 of a dead latent's frequency is -inf: outside any range given
        const lf = Math.log10(count / meta.tokens);
        if (!isNaN(lo) && lf < lo) continue;
        if (!isNaN(hi) && lf > hi) continue;
      }
      rows.push(i);
    }
    const { key, dir } = state.sort;
    const value = key === "freq" ? (i) => index.count[i] : key === "max" ? (i) => index.max[i] : (i) => i;
    rows.sort((a, b) => (value(a) - value(b)) * dir || a - b);
    state.order = rows;
    state.page = 0;
    $("filter-count").textContent = intfmt(rows.length) + " of " + intfmt(n);
    for (const th of document.querySelectorAll("#latent-table th[data-sort]")) {
      th.classList.toggle("sorted-asc", th.dataset.sort === key && dir > 0);
      th.classList.toggle("sorted-desc", th.dataset.sort === key && dir < 0);
    }
    renderTable();
  }

  function summaryChips(i) {
    const list = el("span", { class: "tokenlist" });
    for (const tok of state.index.top[i] || []) list.appendChild(tokenChip(tok));
    return list;
  }

  function renderTable() {
    const body = $("latent-rows");
    body.textContent = "";
    const start = state.page * state.pageSize;
    const maxFreq = Math.max(1e-12, ...state.order.slice(start, start + state.pageSize).map(frequency));
    for (const i of state.order.slice(start, start + state.pageSize)) {
      const f = frequency(i);
      const width = f > 0 ? Math.max(2, 40 * (1 + Math.log10(f / maxFreq) / 6)) : 0;
      const row = el("tr", { "data-latent": i, class: (state.index.count[i] ? "" : "dead") + (state.current === i ? " current" : ""),
        onclick: () => { location.hash = latentHref(state.sae, i); } },
        el("td", { class: "num" }, el("a", { href: latentHref(state.sae, i), text: String(i) })),
        state.sae.groups ? el("td", { class: "group", title: groupTitle(state.sae, groupOf(state.sae, i)),
          text: groupOf(state.sae, i).label }) : null,
        el("td", { class: "num", title: intfmt(state.index.count[i]) + " firings" },
          el("span", { class: "freqbar", style: "width:" + width.toFixed(1) + "px" }), pct(f)),
        el("td", { class: "num" }, fmt(state.index.max[i], 3)),
        el("td", {}, summaryChips(i)));
      body.appendChild(row);
    }
    const pages = Math.max(1, Math.ceil(state.order.length / state.pageSize));
    const pager = $("pager");
    pager.textContent = "";
    pager.appendChild(el("button", { disabled: state.page === 0 ? "disabled" : null, text: "\u2039 prev",
      onclick: () => { state.page--; renderTable(); } }));
    pager.appendChild(el("span", { text: "page " + (state.page + 1) + " of " + pages }));
    pager.appendChild(el("button", { disabled: state.page + 1 >= pages ? "disabled" : null, text: "next \u203A",
      onclick: () => { state.page++; renderTable(); } }));
  }

  // ------------------------------------------------------------------ search: by id, by token

  let searchTimer = null;
  function onSearch() {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(runSearch, 120);
  }

  function parseQuery(raw) {
    const q = raw.trim();
    if (/^#?\d+$/.test(q)) return { id: parseInt(q.replace("#", ""), 10) };
    if (q.length >= 2 && q.startsWith('"') && q.endsWith('"')) {
      try { return { exact: JSON.parse(q) }; } catch (e) { return { text: raw }; }
    }
    return { text: raw };
  }

  function runSearch() {
    const box = $("search-results");
    const raw = $("search").value;
    box.textContent = "";
    if (!raw.trim()) { box.hidden = true; return; }
    box.hidden = false;
    const query = parseQuery(raw);
    if (query.id !== undefined) {
      const id = query.id;
      if (id >= state.sae.n_latents) {
        box.appendChild(el("div", { class: "error", text: "No latent " + id + ": this SAE has " +
          intfmt(state.sae.n_latents) + " latents (0\u2013" + (state.sae.n_latents - 1) + ")." }));
        return;
      }
      box.appendChild(el("h4", { text: "latent" }));
      box.appendChild(hitRow(id, null));
      return;
    }
    if (!vocab) { box.appendChild(el("div", { text: "loading the vocabulary\u2026" })); return; }
    const candidates = tokenCandidates(query);
    if (!candidates.length) {
      box.appendChild(el("div", { text: "No token of the vocabulary matches " + JSON.stringify(raw) +
        ". Search a latent by its id, or a token by its text (quote it to match exactly: \" def\")." }));
      return;
    }
    box.appendChild(el("h4", { text: "tokens" }));
    const chips = el("div", { class: "chips" });
    for (const id of candidates) {
      const chip = el("button", { class: "chip", "data-token": id, title: tokenTitle(id),
        onclick: () => showTokenLatents(id) });
      appendTokenText(chip, tokenText(id), true, id);
      chips.appendChild(chip);
    }
    box.appendChild(chips);
    box.appendChild(el("div", { id: "token-hits" }));
    showTokenLatents(candidates[0]);
  }

  function tokenCandidates(query) {
    const out = [];
    const seen = new Set();
    const add = (id) => { if (!seen.has(id) && out.length < 40) { seen.add(id); out.push(id); } };
    if (query.exact !== undefined) {
      vocab.forEach((t, id) => { if (t === query.exact) add(id); });
      return out;
    }
    const q = query.text;
    const trimmed = q.trim();
    // exact text first, then with a leading space (GPT-2's word tokens), then tokens containing it
    for (const want of [q, trimmed, " " + trimmed]) vocab.forEach((t, id) => { if (t === want) add(id); });
    const lower = trimmed.toLowerCase();
    vocab.forEach((t, id) => { if (t.trim().toLowerCase() === lower) add(id); });
    vocab.forEach((t, id) => { if (t.includes(trimmed)) add(id); });
    return out;
  }

  function hitRow(latent, value) {
    return el("div", { class: "hit" },
      el("a", { href: latentHref(state.sae, latent), "data-latent": latent, text: "latent " + latent }),
      value === null ? null : el("span", { class: "val", title: "its largest activation on this token", text: fmt(value, 3) }),
      el("span", { class: "num", text: pct(frequency(latent)) }),
      summaryChips(latent));
  }

  async function showTokenLatents(tokenId) {
    state.token = tokenId;
    for (const chip of document.querySelectorAll("#search-results button.chip")) {
      chip.classList.toggle("selected", Number(chip.dataset.token) === tokenId);
    }
    const target = $("token-hits");
    if (!target) return;
    target.textContent = "loading\u2026";
    let shard;
    try {
      shard = await tokenShard(state.sae, Math.floor(tokenId / meta.token_shard));
    } catch (error) { target.textContent = error.message; target.className = "error"; return; }
    if (state.token !== tokenId) return;
    target.textContent = "";
    const hits = shard.tokens[String(tokenId)] || [];
    const heading = el("h4", {}, "latents that fire most on ", tokenChip(tokenId));
    target.appendChild(heading);
    target.appendChild(el("p", { class: "note", text: "by their largest activation on this token; then their frequency and the tokens they fire most on" }));
    if (!hits.length) {
      target.appendChild(el("div", { text: "No latent fired on this token in the " + intfmt(meta.tokens) +
        " tokens read (it may not occur in them)." }));
      return;
    }
    for (const [latent, value] of hits) target.appendChild(hitRow(latent, value));
  }

  // ------------------------------------------------------------------ the latent panel

  async function showLatent(raw) {
    const view = $("latent-view");
    view.className = "";
    const id = Number(raw);
    if (raw === null || raw === "") {
      view.className = "placeholder";
      view.textContent = "Pick a latent from the list, or search one by id or by token.";
      return;
    }
    if (!/^\d+$/.test(raw) || !Number.isSafeInteger(id)) {
      view.className = "placeholder error";
      view.textContent = "\u201C" + raw + "\u201D is not a latent id: use #latent=N with N a whole number.";
      return;
    }
    if (id >= state.sae.n_latents) {
      view.className = "placeholder error";
      view.textContent = "Latent " + id + " is out of range: " + state.sae.label + " has " +
        intfmt(state.sae.n_latents) + " latents (ids 0\u2013" + (state.sae.n_latents - 1) + ").";
      return;
    }
    state.current = id;
    for (const row of document.querySelectorAll("#latent-rows tr")) {
      row.classList.toggle("current", Number(row.dataset.latent) === id);
    }
    view.textContent = "loading latent " + id + "\u2026";
    const sae = state.sae;
    let shard;
    try {
      shard = await latentShard(sae, Math.floor(id / sae.shard));
      await vocabReady;
    } catch (error) { view.className = "placeholder error"; view.textContent = error.message; return; }
    if (state.current !== id || state.sae !== sae) return;
    const record = shard.records[id - shard.start];
    view.textContent = "";
    view.appendChild(renderLatent(sae, record));
  }

  function renderLatent(sae, r) {
    const root = el("div", { class: "latent", "data-latent": r.i });
    const count = state.index.count[r.i];
    const nav = el("div", { class: "nav" },
      r.i > 0 ? el("a", { href: latentHref(sae, r.i - 1), title: "previous latent", text: "\u2039" }) : null,
      r.i + 1 < sae.n_latents ? el("a", { href: latentHref(sae, r.i + 1), title: "next latent", text: "\u203A" }) : null);
    root.appendChild(el("div", { class: "latent-head" },
      el("h2", { text: "Latent " + r.i }),
      el("span", { class: "muted", text: sae.label + " \u00B7 " + sae.hook }), nav));
    const stats = el("div", { class: "stats" },
      stat(pct(count / meta.tokens), "frequency: " + intfmt(count) + " of " + intfmt(meta.tokens) + " tokens"),
      stat(fmt(state.index.max[r.i], 4), "max activation"),
      stat(fmt(state.index.mean[r.i], 3), "mean when firing"));
    const group = groupOf(sae, r.i);
    if (group) {
      const field = stat(group.label, groupTitle(sae, group));
      field.setAttribute("data-field", "group");
      stats.appendChild(field);
    }
    root.appendChild(stats);
    if (r.firing && r.firing.length) {
      const fires = el("div", { class: "stats" }, el("span", { class: "muted", text: "fires most on (tokens at its top activations): " }));
      for (const [tok, n] of r.firing) fires.appendChild(tokenChip(tok, "  \u00D7" + n));
      root.appendChild(fires);
    }
    if (!count) {
      root.appendChild(el("p", { class: "note", text: "This latent never fired on the " + intfmt(meta.tokens) +
        " tokens read: there are no examples. Its logit effect and neighbours come from the weights." }));
    }
    const row = el("div", { class: "two" }, card("Activation histogram", histogram(r)), card("Logit effect", logits(r)));
    root.appendChild(row);
    if (count) {
      root.appendChild(card("Top activations", contexts(r.top, state.index.max[r.i], true),
        "The " + r.top.length + " largest activations on the tokens read, each in its text window (" +
        meta.window.before + " tokens before, " + meta.window.after + " after)."));
      root.appendChild(card("Samples across activation quantiles", quantileBands(r), null));
    }
    root.appendChild(card("Nearest latents", neighbours(sae, r), "Cosine similarity of decoder directions."));
    return root;
  }

  function stat(value, label) { return el("div", { class: "stat" }, el("b", { text: value }), el("span", { text: label })); }

  function card(title, body, note) {
    return el("section", { class: "card", "data-card": title.toLowerCase().split(" ")[0] },
      el("h3", { text: title }), note ? el("p", { class: "note", text: note }) : null, body);
  }

  // An activation context: tokens shaded by the latent's activation (relative to its max).
  function legend(max) {
    return el("div", { class: "legend" },
      el("span", { text: "activation" }), el("span", { text: "0" }), el("span", { class: "ramp" }),
      el("span", { text: fmt(max, 3) + " (its max)" }), el("span", { class: "sep", text: "\u00B7" }),
      el("span", { class: "tok centre sample", text: "tok" }), el("span", { text: "the example's token" }),
      el("span", { class: "sep", text: "\u00B7" }),
      el("span", { class: "ws", text: "\u21B5" }), el("span", { text: "newline" }),
      el("span", { class: "ws", text: "\u21E5" }), el("span", { text: "tab" }),
      el("span", { class: "ws", text: "\\xe2" }), el("span", { text: "a byte of a split character" }),
      el("span", { class: "sep", text: "\u00B7" }), el("span", { text: "hover a token for its exact text and value" }));
  }

  // One context as a keyword-in-context line: the tokens before the example's token right-aligned
  // (clipped on the left), the token and those after it left-aligned, so the rows line up on it.
  function contextRow(ctx, max) {
    const [value, position, centre, tokens, acts] = ctx;
    const left = el("span", { class: "inner" });
    const right = el("span", { class: "inner" });
    tokens.forEach((tok, j) => {
      const act = acts[j];
      const alpha = max > 0 ? Math.min(1, Math.max(0, act / max)) : 0;
      const span = el("span", {
        class: "tok" + (j === centre ? " centre" : ""),
        "data-act": act,
        title: tokenTitle(tok) + "  activation " + fmt(act, 4),
        style: act > 0 ? "background-color: rgba(var(--act), " + (0.08 + 0.92 * alpha).toFixed(3) + ")" : null,
      });
      appendTokenText(span, tokenText(tok), false, tok);
      (j < centre ? left : right).appendChild(span);
    });
    return el("div", { class: "ctx", "data-position": position },
      el("span", { class: "v", title: "activation at token " + intfmt(position) + " of the stream", text: fmt(value, 3) }),
      el("span", { class: "left" }, left), el("span", { class: "right" }, right));
  }

  function contexts(list, max, withLegend) {
    const box = el("div", {});
    if (withLegend) box.appendChild(legend(max));
    const rows = el("div", { class: "contexts" });
    for (const ctx of list) rows.appendChild(contextRow(ctx, max));
    box.appendChild(rows);
    return box;
  }

  function quantileBands(r) {
    const box = el("div", { class: "bands" });
    const count = state.index.count[r.i];
    const samples = r.samples.slice().sort((a, b) => b[0] - a[0]);
    const n = samples.length;
    box.appendChild(el("p", { class: "note", text: (n < count ?
      "A uniform random sample of " + n + " of its " + intfmt(count) + " firings" :
      "All " + intfmt(count) + " of its firings") +
      ", in bands by activation quantile (ranked within the sample), so typical activations show as well as the largest." }));
    const bands = Math.min(4, n);
    for (let b = 0; b < bands; b++) {
      const lo = Math.floor((b * n) / bands), hi = Math.floor(((b + 1) * n) / bands);
      const part = samples.slice(lo, hi);
      if (!part.length) continue;
      const qHi = Math.round(100 * (1 - lo / n)), qLo = Math.round(100 * (1 - hi / n));
      const band = el("div", { class: "band" }, el("h4", {}, "quantile " + qLo + "\u2013" + qHi + " % ",
        el("span", { text: "(activations " + fmt(part[part.length - 1][0], 3) + "\u2013" + fmt(part[0][0], 3) + ")" })));
      const rows = el("div", { class: "contexts" });
      for (const ctx of part) rows.appendChild(contextRow(ctx, state.index.max[r.i]));
      band.appendChild(rows);
      box.appendChild(band);
    }
    return box;
  }

  function histogram(r) {
    const box = el("div", { class: "hist" });
    if (!r.hist.length) { box.appendChild(el("p", { class: "note", text: "No firings." })); return box; }
    const edges = meta.hist_edges;
    const first = r.hist[0][0], last = r.hist[r.hist.length - 1][0];
    const counts = new Map(r.hist);
    const bins = [];
    for (let b = first; b <= last; b++) bins.push([b, counts.get(b) || 0]);
    const W = 360, H = 150, left = 34, bottom = 22, top = 6;
    const peak = Math.max(...bins.map((x) => x[1]));
    const bw = (W - left - 4) / bins.length;
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", "0 0 " + W + " " + H);
    svg.setAttribute("role", "img");
    const add = (tag, attrs, text) => {
      const node = document.createElementNS(ns, tag);
      for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
      if (text !== undefined) node.textContent = text;
      svg.appendChild(node);
      return node;
    };
    add("line", { x1: left, y1: H - bottom, x2: W - 2, y2: H - bottom });
    add("text", { x: left - 4, y: top + 8, "text-anchor": "end" }, intfmt(peak));
    add("text", { x: left - 4, y: H - bottom, "text-anchor": "end" }, "0");
    bins.forEach(([b, c], j) => {
      const h = peak ? ((H - bottom - top) * c) / peak : 0;
      const rect = add("rect", { class: "bar", x: left + j * bw + 0.5, y: H - bottom - h, width: Math.max(1, bw - 1), height: h });
      const title = document.createElementNS(ns, "title");
      title.textContent = "[" + edgeText(edges[b]) + ", " + edgeText(edges[b + 1]) + "): " + intfmt(c) + " firings";
      rect.appendChild(title);
    });
    const ticks = Math.min(bins.length + 1, 6);
    for (let t = 0; t < ticks; t++) {
      const j = Math.round((t * bins.length) / Math.max(1, ticks - 1));
      const anchor = t === 0 ? "start" : t === ticks - 1 ? "end" : "middle";
      add("text", { x: left + j * bw, y: H - 6, "text-anchor": anchor }, edgeText(edges[first + j]));
    }
    box.appendChild(svg);
    box.appendChild(el("p", { class: "note", text: "Activations where it fires (log-spaced bins, 8 per decade); hover a bar for its range and count." }));
    return box;
  }
  function edgeText(x) { return x === null ? "\u221E" : fmt(x, 2); }

  function logits(r) {
    const side = (title, list, cls) => {
      const table = el("table", { class: "logits" });
      for (const [tok, v] of list) table.appendChild(el("tr", {}, el("td", {}, tokenChip(tok)), el("td", { class: "v " + cls, text: fmt(v, 3) })));
      return el("div", {}, el("h4", { class: cls, text: title }), table);
    };
    return el("div", {}, el("div", { class: "logit-cols" }, side("promoted", r.lp, "pos"), side("suppressed", r.ln, "neg")),
      el("p", { class: "note", text: meta.logit_note }));
  }

  function neighbours(sae, r) {
    const box = el("div", { class: "two" });
    const list = (title, items, target) => {
      const ul = el("ul", { class: "near" });
      for (const [id, cos] of items) {
        ul.appendChild(el("li", {}, el("span", { class: "cos", text: cos.toFixed(3) }),
          el("a", { class: "id", href: latentHref(target, id), "data-sae": target.key, "data-latent": id, text: "latent " + id })));
      }
      if (!items.length) ul.appendChild(el("li", { text: "none" }));
      return el("div", {}, el("h4", { text: title }), ul);
    };
    box.appendChild(list("in " + sae.label, r.near, sae));
    const other = sae.compare ? saeByKey(sae.compare) : null;
    if (other && r.other) box.appendChild(list("in " + other.label + " (" + other.hook + ")", r.other, other));
    return box;
  }

  // ------------------------------------------------------------------ start

  let vocabReady = null;

  async function selectSae(sae) {
    if (state.sae === sae) return;
    state.sae = sae;
    state.current = null;
    $("sae-picker").value = sae.key;
    state.index = await load("index", sae.key, "data/" + sae.key + "/index.js");
    $("group-head").hidden = !sae.groups;
    applyFilters();
  }

  async function route() {
    const { sae: key, latent } = parseHash();
    const sae = key === null ? meta.saes[0] : saeByKey(key);
    if (!sae) {
      const view = $("latent-view");
      view.className = "placeholder error";
      view.textContent = "No SAE \u201C" + key + "\u201D in this dashboard; it has: " + meta.saes.map((s) => s.key).join(", ") + ".";
      return;
    }
    try {
      await selectSae(sae);
    } catch (error) { showBanner(error.message, true); return; }
    showLatent(latent);
  }

  async function start() {
    try {
      meta = await load("meta", "", "data/meta.js");
    } catch (error) {
      showBanner(error.message + ". Build the dashboard with `fastsae dashboard`.", true);
      return;
    }
    document.title = "fastsae dashboard \u00B7 " + meta.title;
    $("run-info").textContent = meta.model + " \u00B7 " + intfmt(meta.tokens) + " tokens of " + meta.data +
      " \u00B7 built " + meta.created;
    const picker = $("sae-picker");
    for (const sae of meta.saes) picker.appendChild(el("option", { value: sae.key, text: sae.label + " (" + sae.hook + ")" }));
    $("sae-picker-label").hidden = meta.saes.length < 2;
    picker.addEventListener("change", () => { location.hash = "sae=" + encodeURIComponent(picker.value); });
    if (meta.notes && meta.notes.length) showBanner(meta.notes.join(" "), false);
    vocabReady = load("vocab", "", "data/vocab.js").then((v) => {
      vocab = v.texts;
      byteTokens = new Set(v.bytes);
      if (state.index) renderTable();
      if ($("search").value) runSearch();
      return v;
    });
    vocabReady.catch((error) => showBanner(error.message, true));
    $("search").addEventListener("input", onSearch);
    $("search").addEventListener("keydown", (event) => {
      if (event.key !== "Enter") return;
      const query = parseQuery($("search").value);
      if (query.id !== undefined) location.hash = latentHref(state.sae, query.id);
    });
    for (const id of ["freq-min", "freq-max"]) $(id).addEventListener("input", applyFilters);
    $("alive-filter").addEventListener("change", applyFilters);
    for (const th of document.querySelectorAll("#latent-table th[data-sort]")) {
      th.addEventListener("click", () => {
        const key = th.dataset.sort;
        state.sort = { key, dir: state.sort.key === key ? -state.sort.dir : (key === "id" ? 1 : -1) };
        applyFilters();
      });
    }
    window.addEventListener("hashchange", route);
    await route();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
