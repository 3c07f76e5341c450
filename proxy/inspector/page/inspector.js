/* odata-auth-proxy inspector: the page behind GET /-/.
 *
 * Reads the JSON API (/-/api/requests, /-/api/routes, /-/api/stats) once, then follows /-/api/events
 * (server-sent events). Everything the server sends is shown with textContent, never parsed as HTML.
 * No external assets; the Content-Security-Policy is default-src 'self'.
 */
"use strict";

(function () {
  const API = "/-/api/";
  const MAX_ROWS = 500;
  const SVG_NS = "http://www.w3.org/2000/svg";
  const REDACTED = "[redacted]";

  const state = {
    requests: [], // summaries, newest first (by seq)
    seqs: new Set(),
    pending: [], // events received while paused (or before the initial fill)
    pendingCount: 0,
    paused: false,
    filled: false,
    text: "",
    statusClass: "",
    selected: null, // seq shown in the detail view
    clockOffset: 0, // server clock minus our clock, seconds
    routes: [],
    queued: [], // events waiting for the next animation frame
    frame: 0,
    lost: false,
    instance: null, // the proxy process the list came from (``seq`` starts again when it restarts)
    refetching: false,
  };

  const $ = (sel, root) => (root || document).querySelector(sel);

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  // ------------------------------------------------------------------ formatting

  const pad = (n, w) => String(n).padStart(w || 2, "0");

  function clock(epoch, millis) {
    if (epoch === null || epoch === undefined) return "–";
    const d = new Date(epoch * 1000);
    const base = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
    return millis ? `${base}.${pad(d.getMilliseconds(), 3)}` : base;
  }

  function dateTime(epoch) {
    if (epoch === null || epoch === undefined) return "–";
    const d = new Date(epoch * 1000);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${clock(epoch)}`;
  }

  function span(seconds) {
    // 3725 -> "1 h 02 m 05 s"; always shows seconds so a countdown visibly moves
    let s = Math.max(0, Math.floor(seconds));
    const d = Math.floor(s / 86400);
    s -= d * 86400;
    const h = Math.floor(s / 3600);
    s -= h * 3600;
    const m = Math.floor(s / 60);
    s -= m * 60;
    if (d) return `${d} d ${h} h ${pad(m)} m`;
    if (h) return `${h} h ${pad(m)} m ${pad(s)} s`;
    if (m) return `${m} m ${pad(s)} s`;
    return `${s} s`;
  }

  function relative(epoch, now) {
    // the two largest units: "in 11 h 06 m", "1 m 42 s ago"
    const delta = epoch - now;
    if (Math.abs(delta) < 1) return "now";
    const text = span(Math.abs(delta)).split(" ").slice(0, 4).join(" ");
    return delta > 0 ? `in ${text}` : `${text} ago`;
  }

  function ms(value) {
    if (value === null || value === undefined) return "–";
    if (value >= 10000) return `${(value / 1000).toFixed(1)} s`;
    if (value >= 1000) return `${(value / 1000).toFixed(2)} s`;
    if (value >= 100) return `${Math.round(value)} ms`;
    return `${value.toFixed(1)} ms`;
  }

  function bytes(n) {
    if (n === null || n === undefined) return "–";
    if (n < 1000) return `${n} B`;
    if (n < 1e6) return `${(n / 1e3).toFixed(1)} kB`;
    if (n < 1e9) return `${(n / 1e6).toFixed(1)} MB`;
    return `${(n / 1e9).toFixed(2)} GB`;
  }

  function rate(value) {
    if (value === null || value === undefined) return "–";
    return value >= 100 ? `${Math.round(value)}/s` : `${value.toFixed(value >= 10 ? 1 : 2)}/s`;
  }

  const statusClass = (status) => (status >= 100 && status < 600 ? `${Math.floor(status / 100)}xx` : "err");

  const serverNow = () => Date.now() / 1000 + state.clockOffset;

  // ------------------------------------------------------------------ fetch

  async function getJSON(path) {
    const resp = await fetch(API + path, { headers: { Accept: "application/json" }, cache: "no-store" });
    let body = null;
    try {
      body = await resp.json();
    } catch (_) {
      body = null;
    }
    if (!resp.ok) {
      const err = new Error((body && (body.detail || body.error)) || `HTTP ${resp.status}`);
      err.status = resp.status;
      throw err;
    }
    return body;
  }

  // ------------------------------------------------------------------ connection badge

  function setConn(kind, text) {
    const badge = $("#conn");
    badge.className = `badge conn-${kind}`;
    badge.textContent = text;
    document.body.classList.toggle("disconnected", kind === "down");
  }

  // ------------------------------------------------------------------ routes

  const routeCards = new Map(); // name -> {card, fields}

  const ROUTE_FIELDS = [
    ["client", "client id", "wide"],
    ["fingerprint", "token"],
    ["expires", "expires in"],
    ["obtained", "obtained at"],
    ["refresh", "next refresh"],
    ["requests", "token requests"],
    ["scope", "scope", "full"],
    ["certificate", "certificate", "full"],
  ];

  function routeCard(name) {
    let entry = routeCards.get(name);
    if (entry) return entry;
    const card = el("article", "route");
    card.dataset.route = name;
    const head = el("header", "route-head");
    const prefix = el("code", "route-prefix");
    const upstream = el("span", "route-upstream");
    const credential = el("span", "pill route-credential");
    const target = el("span", "route-target");
    target.append(prefix, el("span", "arrow", " → "), upstream);
    head.append(el("h3", "route-name", name), target, credential);
    const dl = el("dl", "tiles");
    const fields = { prefix, upstream, credential };
    for (const [key, label, size] of ROUTE_FIELDS) {
      const tile = el("div", `tile f-${key}${size ? ` tile-${size}` : ""}`);
      const dd = el("dd");
      tile.append(el("dt", null, label), dd);
      dl.append(tile);
      fields[key] = dd;
      fields[`${key}Tile`] = tile;
    }
    const error = el("p", "token-error");
    error.hidden = true;
    error.setAttribute("role", "alert");
    fields.error = error;
    card.append(head, dl, error);
    entry = { card, fields };
    routeCards.set(name, entry);
    return entry;
  }

  function renderRoutes(data) {
    if (!data || !Array.isArray(data.routes)) return;
    if (typeof data.server_time === "number") state.clockOffset = data.server_time - Date.now() / 1000;
    if (state.filled) sameInstance(data.instance);
    state.routes = data.routes;
    const box = $("#routes");
    const seen = new Set();
    if (!data.routes.length) {
      box.replaceChildren(el("p", "empty", "no routes configured"));
      routeCards.clear();
      return;
    }
    const empty = $(".empty", box);
    if (empty) empty.remove();
    data.routes.forEach((route, index) => {
      const { card, fields } = routeCard(route.name);
      seen.add(route.name);
      if (box.children[index] !== card) box.insertBefore(card, box.children[index] || null);
      fields.prefix.textContent = route.prefix;
      fields.upstream.textContent = route.upstream;
      fields.upstream.title = route.upstream;
      const isCert = route.credential === "certificate";
      fields.credential.textContent = isCert ? "client certificate" : "client secret";
      fields.certificateTile.hidden = !isCert;
      fields.certificate.replaceChildren();
      if (isCert && route.certificate) {
        const cert = route.certificate;
        fields.certificate.append(el("span", "cert-subject", cert.subject), document.createTextNode(" "));
        const left = cert.not_after - serverNow();
        const after = el("span", "cert-expiry", `notAfter ${dateTime(cert.not_after)}`);
        if (left < 0) after.classList.add("bad");
        else if (left < 30 * 86400) after.classList.add("warn");
        fields.certificate.append(after);
      } else if (isCert) {
        fields.certificate.textContent = "–";
      }

      fields.client.textContent = route.client_id || "–";
      const token = route.token;
      card.classList.toggle("no-token", !token);
      fields.fingerprint.replaceChildren();
      if (token) {
        fields.fingerprint.append(el("code", "fingerprint", token.fingerprint));
        fields.expires.replaceChildren(countdown(token.expires_at));
        fields.obtained.replaceChildren(when(token.obtained_at));
        fields.refresh.replaceChildren(when(token.refresh_at));
      } else {
        fields.fingerprint.append(el("span", "muted", "no token"));
        fields.expires.replaceChildren(el("span", "countdown none", "–"));
        fields.obtained.textContent = "–";
        fields.refresh.textContent = "–";
      }
      fields.requests.textContent = String(route.token_requests);
      const scope = token && token.scope ? String(token.scope) : "";
      fields.scope.textContent = scope;
      fields.scopeTile.hidden = !scope;

      if (route.last_error) {
        fields.error.replaceChildren(el("strong", null, "last token error: "), document.createTextNode(route.last_error));
        fields.error.hidden = false;
        card.classList.add("has-error");
      } else {
        fields.error.replaceChildren();
        fields.error.hidden = true;
        card.classList.remove("has-error");
      }
    });
    for (const [name, entry] of routeCards) {
      if (!seen.has(name)) {
        entry.card.remove();
        routeCards.delete(name);
      }
    }
    tick();
  }

  function countdown(expiresAt) {
    const node = el("span", "countdown");
    node.dataset.at = String(expiresAt);
    return node;
  }

  function when(epoch) {
    const wrap = el("span", "when");
    if (epoch === null || epoch === undefined) {
      wrap.textContent = "–";
      return wrap;
    }
    wrap.append(el("span", "abs", clock(epoch)), document.createTextNode(" "));
    const rel = el("span", "rel muted");
    rel.dataset.at = String(epoch);
    wrap.append(rel);
    return wrap;
  }

  function tick() {
    const now = serverNow();
    for (const node of document.querySelectorAll(".countdown[data-at]")) {
      const left = Number(node.dataset.at) - now;
      const text = left > 0 ? span(left) : `expired ${span(-left)} ago`;
      if (node.textContent !== text) node.textContent = text;
      node.classList.toggle("expired", left <= 0);
      node.classList.toggle("soon", left > 0 && left < 60);
    }
    for (const node of document.querySelectorAll(".rel[data-at]")) {
      const text = `(${relative(Number(node.dataset.at), now)})`;
      if (node.textContent !== text) node.textContent = text;
    }
  }

  // ------------------------------------------------------------------ requests table

  function matches(req) {
    if (state.statusClass && statusClass(req.status) !== state.statusClass) return false;
    if (!state.text) return true;
    const hay = [
      req.method,
      req.path,
      String(req.status),
      req.upstream_status === null ? "" : String(req.upstream_status),
      req.id,
      req.route || "",
      req.replayed ? `replayed ${req.replayed}` : "",
      req.error || "",
    ]
      .join(" ")
      .toLowerCase();
    return state.text
      .split(/\s+/)
      .filter(Boolean)
      .every((word) => hay.includes(word));
  }

  function cell(cls, text, title) {
    const td = el("td", cls, text);
    if (title) td.title = title;
    return td;
  }

  function row(req) {
    const tr = el("tr", `s${statusClass(req.status)}`);
    tr.dataset.seq = String(req.seq);
    tr.tabIndex = 0;
    if (req.seq === state.selected) tr.classList.add("selected");
    if (req.error) tr.classList.add("has-error");
    const status = cell("c-status", req.status, req.error || undefined);
    tr.append(
      cell("c-time", clock(req.time, true), dateTime(req.time)),
      cell("c-method", req.method),
      cell("c-path", req.path, req.path),
      status,
      cell("c-upstream opt", req.upstream_status === null ? "–" : req.upstream_status),
      cell("c-duration num", ms(req.duration_ms)),
      cell("c-in num opt", bytes(req.bytes_in)),
      cell("c-out num opt", bytes(req.bytes_out)),
      cell("c-route opt", req.route || "–"),
      cell("c-replayed opt", req.replayed ? `↻ ${req.replayed}` : ""),
      cell("c-id opt", req.id),
    );
    if (req.replayed) tr.querySelector(".c-replayed").classList.add("replayed");
    return tr;
  }

  function renderTable() {
    const tbody = $("#requests tbody");
    const rows = [];
    for (const req of state.requests) if (matches(req)) rows.push(row(req));
    tbody.replaceChildren(...rows);
    updateCounts();
  }

  function updateCounts() {
    const shown = $("#requests tbody").children.length;
    const total = state.requests.length;
    $("#count").textContent = shown === total ? `${total} kept` : `${shown} of ${total} shown`;
    const empty = $("#requests-empty");
    if (!state.filled) {
      empty.textContent = "loading…";
      empty.hidden = false;
    } else if (total === 0) {
      empty.textContent = `No requests yet. Send one through the proxy, e.g. curl '${location.origin}/…'`;
      empty.hidden = false;
    } else if (shown === 0) {
      empty.textContent = "No request matches the filter.";
      empty.hidden = false;
    } else {
      empty.hidden = true;
    }
    const badge = $("#new-count");
    if (state.paused && state.pendingCount > 0) {
      badge.textContent = `${state.pendingCount} new`;
      badge.hidden = false;
    } else {
      badge.hidden = true;
    }
  }

  // Merge summaries into the kept list. Returns true when the table must be redrawn entirely.
  function merge(list) {
    let redraw = false;
    const fresh = [];
    for (const req of list) {
      if (!req || typeof req.seq !== "number" || state.seqs.has(req.seq)) continue;
      state.seqs.add(req.seq);
      fresh.push(req);
    }
    if (!fresh.length) return false;
    fresh.sort((a, b) => b.seq - a.seq);
    const newest = state.requests.length ? state.requests[0].seq : -Infinity;
    if (fresh[fresh.length - 1].seq > newest) {
      state.requests = fresh.concat(state.requests);
    } else {
      state.requests = fresh.concat(state.requests).sort((a, b) => b.seq - a.seq);
      redraw = true;
    }
    if (state.requests.length > MAX_ROWS) {
      for (const old of state.requests.splice(MAX_ROWS)) state.seqs.delete(old.seq);
    }
    if (!redraw) {
      const tbody = $("#requests tbody");
      const rows = fresh.filter(matches).map(row);
      tbody.prepend(...rows);
      const keep = new Set(state.requests.map((r) => String(r.seq)));
      while (tbody.lastElementChild && !keep.has(tbody.lastElementChild.dataset.seq)) tbody.lastElementChild.remove();
    }
    return redraw;
  }

  function apply(list) {
    if (merge(list)) renderTable();
    else updateCounts();
  }

  function onRequestEvent(req) {
    if (state.paused || !state.filled) {
      state.pending.push(req);
      if (state.pending.length > MAX_ROWS) state.pending.splice(0, state.pending.length - MAX_ROWS);
      if (state.paused) state.pendingCount += 1;
      updateCounts();
      return;
    }
    state.queued.push(req);
    if (!state.frame) {
      state.frame = requestAnimationFrame(() => {
        state.frame = 0;
        const batch = state.queued;
        state.queued = [];
        apply(batch);
      });
    }
  }

  function setPaused(paused) {
    state.paused = paused;
    const button = $("#pause");
    button.textContent = paused ? "Resume" : "Pause";
    button.setAttribute("aria-pressed", String(paused));
    document.body.classList.toggle("paused", paused);
    if (!paused) {
      const batch = state.pending;
      state.pending = [];
      state.pendingCount = 0;
      apply(batch);
    }
    updateCounts();
  }

  // The proxy restarted (another instance): its seq numbers start again, so the kept list is dropped and
  // fetched anew.
  function sameInstance(instance) {
    if (!instance) return true;
    if (state.instance === null || state.instance === instance) {
      state.instance = instance;
      return true;
    }
    state.instance = instance;
    state.requests = [];
    state.seqs.clear();
    state.pending = [];
    state.pendingCount = 0;
    renderTable();
    refetch();
    return false;
  }

  // Fetch the kept list again and merge it (after a reconnect, a restart, or events the stream had to drop).
  function refetch() {
    if (state.refetching) return;
    state.refetching = true;
    getJSON(`requests?limit=${MAX_ROWS}`)
      .then((data) => {
        if (!sameInstance(data.instance)) return;
        const list = data.requests || [];
        if (state.paused) list.filter((r) => !state.seqs.has(r.seq)).forEach(onRequestEvent);
        else apply(list);
      })
      .catch(() => {})
      .finally(() => {
        state.refetching = false;
      });
  }

  async function fill() {
    try {
      const data = await getJSON(`requests?limit=${MAX_ROWS}`);
      if (data.instance) state.instance = data.instance;
      state.filled = true;
      const batch = (data.requests || []).concat(state.paused ? [] : state.pending);
      if (!state.paused) state.pending = [];
      apply(batch);
      renderTable();
    } catch (err) {
      state.filled = true;
      const empty = $("#requests-empty");
      updateCounts();
      empty.textContent = `Could not load requests: ${err.message}`;
      empty.hidden = false;
    }
  }

  // ------------------------------------------------------------------ detail

  function headerTable(caption, headers, added) {
    const section = el("section", "headers");
    section.append(el("h3", null, caption));
    if (!headers || !headers.length) {
      section.append(el("p", "muted", "none"));
      return section;
    }
    const table = el("table", "header-table");
    const tbody = el("tbody");
    // the last ``added`` lines are the ones the proxy added on the way upstream
    const firstAdded = headers.length - (added || 0);
    headers.forEach(([name, value], index) => {
      const tr = el("tr");
      const th = el("th");
      th.scope = "row";
      th.append(el("span", "h-name", name));
      if (index >= firstAdded) {
        tr.classList.add("proxy-added");
        th.append(el("span", "tag", "added by the proxy"));
      }
      const td = el("td");
      const text = String(value);
      if (text.includes(REDACTED)) {
        tr.classList.add("is-redacted");
        td.append(el("span", "redacted", text));
        td.title = "hidden by the proxy: the value is never kept or shown";
      } else {
        td.textContent = text;
      }
      tr.append(th, td);
      tbody.append(tr);
    });
    table.append(tbody);
    section.append(table);
    return section;
  }

  function summaryList(req) {
    const dl = el("dl", "kv detail-kv");
    const add = (label, value, cls) => {
      dl.append(el("dt", null, label));
      const dd = el("dd", cls, value);
      dl.append(dd);
      return dd;
    };
    add("time", `${dateTime(req.time)}.${pad(Math.floor((req.time % 1) * 1000), 3)}`);
    add("status", String(req.status), `s${statusClass(req.status)} status-text`);
    add("upstream status", req.upstream_status === null ? "– (not forwarded)" : String(req.upstream_status));
    add("duration", ms(req.duration_ms));
    add("bytes", `${bytes(req.bytes_in)} in, ${bytes(req.bytes_out)} out`);
    add("route", req.route || "–");
    add("replayed", req.replayed ? `yes (${req.replayed === "csrf" ? "CSRF token refetched" : "401, new token"})` : "no");
    add("request id", req.id, "mono");
    if (req.token_fp) add("token", req.token_fp, "mono");
    if (req.error) add("error", req.error, "token-error-inline");
    return dl;
  }

  async function showDetail(seq) {
    state.selected = seq;
    for (const tr of document.querySelectorAll("#requests tbody tr.selected")) tr.classList.remove("selected");
    const tr = document.querySelector(`#requests tbody tr[data-seq="${seq}"]`);
    if (tr) tr.classList.add("selected");
    const drawer = $("#detail");
    const body = $("#detail-body");
    const known = state.requests.find((r) => r.seq === seq);
    $("#detail-title").textContent = known ? `${known.method} ${known.path}` : `request #${seq}`;
    body.replaceChildren(el("p", "muted", "loading…"));
    drawer.hidden = false;
    drawer.dataset.seq = String(seq);
    document.body.classList.add("detail-open");
    try {
      const data = await getJSON(`requests/${encodeURIComponent(seq)}`);
      if (state.selected !== seq) return;
      $("#detail-title").textContent = `${data.method} ${data.path}`;
      const added = Array.isArray(data.proxy_added) ? data.proxy_added.length : 0;
      const byProxy = data.answered_by === "proxy";
      if (data.headers_kept === false) {
        body.replaceChildren(
          summaryList(data),
          el("p", "muted", `Headers ${data.headers_note || "were not kept for this request."}`),
          el("p", "muted small", "Bodies are never kept. Values shown as [redacted] are hidden by the proxy."),
        );
        drawer.classList.add("loaded");
        return;
      }
      body.replaceChildren(
        summaryList(data),
        headerTable("Request headers (as forwarded)", data.request_headers, added),
        headerTable(
          byProxy ? "Response headers (the proxy answered itself)" : "Response headers (as answered)",
          data.response_headers,
        ),
        el("p", "muted small", "Bodies are never kept. Values shown as [redacted] are hidden by the proxy."),
      );
      drawer.classList.add("loaded");
    } catch (err) {
      if (state.selected !== seq) return;
      const text = err.status === 404 ? "This request is no longer kept (only the last 500 are)." : err.message;
      body.replaceChildren(el("p", "token-error", text));
    }
  }

  function closeDetail() {
    state.selected = null;
    const drawer = $("#detail");
    drawer.hidden = true;
    drawer.classList.remove("loaded");
    delete drawer.dataset.seq;
    document.body.classList.remove("detail-open");
    for (const tr of document.querySelectorAll("#requests tbody tr.selected")) tr.classList.remove("selected");
  }

  // ------------------------------------------------------------------ charts

  function svgNode(tag, attrs) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    return node;
  }

  // One polyline per run of non-null points (a gap where a bucket has no value).
  function lines(series, key, x, y, cls) {
    const out = [];
    let run = [];
    const flush = () => {
      if (run.length === 1) run.push([run[0][0] + 0.5, run[0][1]]);
      if (run.length) out.push(svgNode("polyline", { points: run.map((p) => p.join(",")).join(" "), class: cls }));
      run = [];
    };
    for (const point of series) {
      const v = point[key];
      if (v === null || v === undefined) flush();
      else run.push([x(point.t).toFixed(1), y(v).toFixed(1)]);
    }
    flush();
    return out;
  }

  function niceMax(v) {
    if (!(v > 0)) return 1;
    const mag = 10 ** Math.floor(Math.log10(v));
    for (const step of [1, 2, 2.5, 5, 10]) if (v <= step * mag) return step * mag;
    return 10 * mag;
  }

  function drawChart(svg, series, keys, max, end, windowS) {
    const W = 300;
    const H = 60;
    const x = (t) => W - ((end - t) / windowS) * W;
    const y = (v) => H - 1 - (Math.min(v, max) / max) * (H - 4);
    const parts = [
      svgNode("line", { x1: 0, y1: H - 0.5, x2: W, y2: H - 0.5, class: "axis" }),
      svgNode("line", { x1: 0, y1: 3, x2: W, y2: 3, class: "grid" }),
    ];
    if (keys.length === 1) {
      // filled area under requests/s
      const pts = series.filter((p) => p[keys[0]] !== null && p[keys[0]] !== undefined);
      if (pts.length) {
        const coords = pts.map((p) => `${x(p.t).toFixed(1)},${y(p[keys[0]]).toFixed(1)}`);
        const first = x(pts[0].t).toFixed(1);
        const last = x(pts[pts.length - 1].t).toFixed(1);
        parts.push(svgNode("polygon", { points: `${first},${H} ${coords.join(" ")} ${last},${H}`, class: "area" }));
      }
    }
    for (const key of keys) parts.push(...lines(series, key, x, y, `line line-${key.replace("_ms", "")}`));
    svg.replaceChildren(...parts);
  }

  function renderStats(data) {
    if (!data || !Array.isArray(data.series)) return;
    const bucket = data.bucket_s || 5;
    const windowS = data.window_s || 300;
    // each bucket is drawn at its middle; the right edge is the end of the newest bucket
    const series = data.series.map((p) => Object.assign({}, p, { t: p.t + bucket / 2 }));
    const end = series.length ? series[series.length - 1].t + bucket / 2 : serverNow();
    const current = series.length ? series[series.length - 1] : null; // the newest (complete) bucket

    const rpsMax = niceMax(Math.max(0, ...series.map((p) => p.rps || 0)));
    drawChart($("#chart-rps svg"), series, ["rps"], rpsMax, end, windowS);
    $("#rps-now").textContent = current ? rate(current.rps) : "–";
    $("#rps-max").textContent = `max ${rate(rpsMax)}`;

    const latMax = niceMax(Math.max(0, ...series.map((p) => Math.max(p.p99_ms || 0, p.p50_ms || 0))));
    drawChart($("#chart-latency svg"), series, ["p99_ms", "p50_ms"], latMax, end, windowS);
    const lastWith = [...series].reverse().find((p) => p.p50_ms !== null && p.p50_ms !== undefined);
    $("#p50-now").textContent = lastWith ? ms(lastWith.p50_ms) : "–";
    $("#p99-now").textContent = lastWith ? ms(lastWith.p99_ms) : "–";
    $("#latency-max").textContent = `max ${ms(latMax)}`;
  }

  // ------------------------------------------------------------------ live events

  let source = null;
  let retry = 0;

  function connect() {
    if (source) source.close();
    source = new EventSource(`${API}events`);
    source.addEventListener("open", () => {
      retry = 0;
      setConn("live", "live");
      if (state.lost) {
        // reconnected: fetch what finished while we were away (merged by seq, nothing twice)
        state.lost = false;
        refetch();
        getJSON("routes").then(renderRoutes).catch(() => {});
        getJSON("stats").then(renderStats).catch(() => {});
      }
    });
    source.addEventListener("error", () => {
      state.lost = true;
      setConn("down", "disconnected — reconnecting…");
      if (source.readyState === EventSource.CLOSED) {
        // the browser gave up (an HTTP error, not a dropped stream): retry ourselves, backing off to 10 s
        retry = Math.min(retry + 1, 5);
        setTimeout(connect, 1000 * 2 ** (retry - 1) > 10000 ? 10000 : 1000 * 2 ** (retry - 1));
      }
    });
    const parse = (handler) => (event) => {
      let data;
      try {
        data = JSON.parse(event.data);
      } catch (_) {
        return;
      }
      handler(data);
    };
    source.addEventListener("request", parse(onRequestEvent));
    source.addEventListener("routes", parse(renderRoutes));
    source.addEventListener("stats", parse(renderStats));
    // the stream skipped requests (the page fell behind): fetch the kept list, at most once a second
    let lastDrop = 0;
    source.addEventListener(
      "dropped",
      parse(() => {
        if (Date.now() - lastDrop < 1000) return;
        lastDrop = Date.now();
        setTimeout(refetch, 250);
      }),
    );
  }

  // ------------------------------------------------------------------ wiring

  function init() {
    const filter = $("#filter");
    filter.addEventListener("input", () => {
      state.text = filter.value.trim().toLowerCase();
      renderTable();
    });
    for (const button of document.querySelectorAll("#status-filter button")) {
      button.addEventListener("click", () => {
        state.statusClass = button.dataset.class;
        for (const b of document.querySelectorAll("#status-filter button")) {
          b.setAttribute("aria-pressed", String(b === button));
        }
        renderTable();
      });
    }
    $("#pause").addEventListener("click", () => setPaused(!state.paused));
    $("#new-count").addEventListener("click", () => setPaused(false));

    const tbody = $("#requests tbody");
    const pick = (event) => {
      const tr = event.target.closest("tr[data-seq]");
      if (tr) showDetail(Number(tr.dataset.seq));
    };
    tbody.addEventListener("click", pick);
    tbody.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") {
        event.preventDefault();
        pick(event);
      }
    });
    $("#detail-close").addEventListener("click", closeDetail);
    document.addEventListener("keydown", (event) => {
      if (event.key === "Escape" && !$("#detail").hidden) closeDetail();
    });

    updateCounts();
    connect();
    getJSON("routes")
      .then(renderRoutes)
      .catch((err) => $("#routes").replaceChildren(el("p", "token-error", `Could not load routes: ${err.message}`)));
    getJSON("stats").then(renderStats).catch(() => {});
    fill();
    setInterval(tick, 250);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
