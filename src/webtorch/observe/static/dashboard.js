// WebTorch's live dashboard: polls /dashboard/stats once a second and draws the last five minutes
// with uPlot (vendored under static/vendor/). Plain JS, no build step.
//
// State for tests and people: <body data-state="loading|live|error|unauthorized">, the numbers
// in #stat-*, every chart in <div class="chart" data-chart="..."> (uPlot draws a <canvas> in it),
// upstream tables as <table data-upstream-table="GROUP"> with one <tr data-server="ADDRESS"> per
// server, and each model's current numbers in [data-model="NAME"] [data-stat="loss|steps"].
"use strict";

(function () {
  const POLL_MS = 1000;
  const TIMEOUT_MS = 4000;
  const MAX_POINTS = 300;
  const CHART_HEIGHT = 150;
  const PALETTE = [
    "#58a6ff", "#3fb950", "#f0883e", "#bc8cff", "#ff7b72", "#39c5cf",
    "#d29922", "#f778ba", "#a5d6ff", "#7ee787", "#ffa657", "#d2a8ff",
    "#56d4dd", "#e3b341", "#ff9bce", "#8b949e",
  ];
  const CARD = "#171c23"; // the cards' background, for opaque stacked fills
  const RED = "#f85149";
  const AMBER = "#d29922";
  const AXIS = "#8d97a5";
  const GRID = "rgba(255,255,255,0.07)";
  const FONT = "11px system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif";

  const store = {
    samples: [], // oldest first, at most MAX_POINTS
    seq: 0, // newest sample held
    started: null, // the server's start time: a new one means a restarted server
    lastOk: null, // Date.now() of the last good answer
    pipelines: null, // the last poll's pipeline totals and when: {at, data}
  };
  const charts = new Map(); // chart element -> Chart

  // -- formatting -----------------------------------------------------------------------------

  function fmtCount(v) {
    if (v == null || !isFinite(v)) return "–";
    const a = Math.abs(v);
    if (Number.isInteger(v) && a < 1e4) return String(v);
    if (a >= 1e6) return (v / 1e6).toFixed(a >= 1e7 ? 0 : 1) + "M";
    if (a >= 1e4) return (v / 1e3).toFixed(a >= 1e5 ? 0 : 1) + "k";
    if (a >= 100) return v.toFixed(0);
    if (a >= 10) return v.toFixed(1);
    if (a === 0) return "0";
    if (a >= 0.01) return v.toFixed(2);
    return v.toPrecision(2);
  }

  function fmtMs(v) {
    // v in milliseconds
    if (v == null || !isFinite(v)) return "–";
    const a = Math.abs(v);
    if (a >= 10000) return (v / 1000).toFixed(1) + " s";
    if (a >= 100) return v.toFixed(0) + " ms";
    if (a >= 10) return v.toFixed(1) + " ms";
    if (a === 0) return "0 ms";
    return v.toFixed(2) + " ms";
  }

  function fmtPercent(v) {
    return v == null || !isFinite(v) ? "–" : v.toFixed(Math.abs(v) >= 10 ? 0 : 1) + "%";
  }

  function fmtLoss(v) {
    if (v == null || !isFinite(v)) return "–";
    return v >= 0.01 ? v.toFixed(4) : v.toExponential(2);
  }

  // Axis labels on a log scale: 1000, 10, 1, 0.1, 1e-3.
  function fmtPow(v) {
    if (v == null || !isFinite(v)) return "";
    if (v >= 1e4 || v < 1e-2) return v.toExponential(0).replace("e+", "e");
    return String(+v.toPrecision(3));
  }

  function fmtRatio(v) {
    return v == null || !isFinite(v) ? "–" : "×" + (v >= 10 ? v.toFixed(0) : v.toPrecision(2));
  }

  function fmtInt(v) {
    return v == null || !isFinite(v) ? "–" : Math.round(v).toLocaleString("en-US");
  }

  function fmtClock(t) {
    const d = new Date(t * 1000);
    const two = (n) => String(n).padStart(2, "0");
    return `${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}`;
  }

  function fmtDuration(seconds) {
    if (seconds == null || !isFinite(seconds) || seconds < 0) return "–";
    const s = Math.floor(seconds);
    const d = Math.floor(s / 86400);
    const h = Math.floor((s % 86400) / 3600);
    const m = Math.floor((s % 3600) / 60);
    if (d) return `${d}d ${h}h`;
    if (h) return `${h}h ${m}m`;
    if (m) return `${m}m ${s % 60}s`;
    return `${s}s`;
  }

  function ms(seconds) {
    return seconds == null ? null : seconds * 1000;
  }

  function dig(obj, ...path) {
    for (const key of path) {
      if (obj == null) return null;
      obj = obj[key];
    }
    return obj === undefined ? null : obj;
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else node.setAttribute(key, value);
    }
    for (const child of children) node.append(child);
    return node;
  }

  function hexAlpha(hex, alpha) {
    const n = parseInt(hex.slice(1), 16);
    return `rgba(${(n >> 16) & 255},${(n >> 8) & 255},${n & 255},${alpha})`;
  }

  // `hex` blended onto the card's background: an opaque fill, for stacked areas.
  function hexOnCard(hex, alpha) {
    const a = parseInt(hex.slice(1), 16);
    const b = parseInt(CARD.slice(1), 16);
    const mix = (shift) =>
      Math.round(((a >> shift) & 255) * alpha + ((b >> shift) & 255) * (1 - alpha));
    return `rgb(${mix(16)},${mix(8)},${mix(0)})`;
  }

  // Addresses without their host when every one has the same host (legends stay short).
  function shortNames(addresses) {
    const hosts = new Set(addresses.map((a) => a.slice(0, a.lastIndexOf(":"))));
    if (hosts.size !== 1 || addresses.length < 2) return new Map(addresses.map((a) => [a, a]));
    return new Map(addresses.map((a) => [a, a.slice(a.lastIndexOf(":"))]));
  }

  // -- charts -----------------------------------------------------------------------------------

  // One uPlot chart with its own legend line above it (the latest values, or the values under the
  // cursor). Rebuilt only when its set of series changes (a server or reason appears).
  class Chart {
    constructor(node, spec) {
      this.node = node;
      // {fmt, log, axisFmt (a log axis' labels), include (a value a log axis always shows),
      // fill (a light area under each line), stacked}
      this.spec = spec;
      this.plot = null;
      this.keys = null;
      this.series = [];
      this.legend = el("div", { class: "legend" });
      node.parentNode.insertBefore(this.legend, node);
      this.hovering = false;
      if (window.ResizeObserver) {
        new ResizeObserver(() => {
          if (this.plot && this.node.clientWidth > 0) {
            this.plot.setSize({ width: this.node.clientWidth, height: CHART_HEIGHT });
          }
        }).observe(node);
      }
    }

    update(x, series) {
      const keys = series.map((s) => s.label + "\u0000" + s.color).join("\u0001");
      const data = [x, ...series.map((s) => this.clean(s.values))];
      this.series = series;
      this.data = data; // what the legend reads: each series' own values
      let drawn = data;
      if (this.spec.stacked) {
        // Series i is drawn as the sum of series i..n-1 with an opaque fill, bottom series last,
        // so each one's visible band is its own part of the whole.
        drawn = [x];
        const sums = x.map(() => 0);
        const stack = [];
        for (let i = series.length - 1; i >= 0; i--) {
          const values = data[i + 1];
          stack.unshift(values.map((v, j) => (sums[j] += v == null ? 0 : v)));
        }
        drawn.push(...stack);
      }
      if (keys !== this.keys || !this.plot) {
        this.build(drawn);
        this.keys = keys;
      } else {
        this.plot.setData(drawn);
      }
      this.renderLegend(this.hovering ? this.plot.cursor.idx : null);
    }

    clean(values) {
      if (!this.spec.log) return values.map((v) => (v == null || !isFinite(v) ? null : v));
      return values.map((v) => (v == null || !(v > 0) || !isFinite(v) ? null : v));
    }

    build(data) {
      if (this.plot) this.plot.destroy();
      const spec = this.spec;
      const fmt = spec.fmt || fmtCount;
      let yScale;
      if (spec.log) {
        yScale = {
          distr: 3,
          range: (u, min, max) => {
            if (min == null || !(min > 0)) {
              return spec.include ? [spec.include / 10, spec.include * 10] : [0.001, 1];
            }
            if (spec.include) {
              min = Math.min(min, spec.include);
              max = Math.max(max, spec.include);
            }
            return uPlot.rangeLog(min, max, 10, true);
          },
        };
      } else {
        yScale = {
          // From zero (every quantity here is a rate, a count or a duration), 10% headroom.
          range: (u, min, max) => (max == null || !(max > 0) ? [0, 1] : [0, max * 1.1]),
        };
      }
      const axis = {
        stroke: AXIS,
        font: FONT,
        grid: { stroke: GRID, width: 1 },
        ticks: { stroke: GRID, width: 1, size: 4 },
      };
      const isPow10 = (v) => Math.abs(Math.log10(v) - Math.round(Math.log10(v))) < 1e-9;
      // A log axis: labels, ticks and grid lines on the powers of ten only. (uPlot takes an
      // undefined option as set, so a linear axis gets no filter keys at all.)
      const pow10 = (u, splits) => splits.map((v) => (isPow10(v) ? v : null));
      const yAxis = spec.log
        ? {
            ...axis,
            filter: pow10,
            grid: { ...axis.grid, filter: pow10 },
            ticks: { ...axis.ticks, filter: pow10 },
          }
        : axis;
      const opts = {
        width: Math.max(this.node.clientWidth, 200),
        height: CHART_HEIGHT,
        legend: { show: false },
        cursor: { drag: { x: false, y: false, setScale: false }, points: { size: 6 } },
        scales: { x: { time: true }, y: yScale },
        axes: [
          {
            ...axis,
            space: 70,
            incrs: [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600],
            values: (u, splits) => splits.map(fmtClock),
          },
          {
            ...yAxis,
            size: 56,
            values: (u, splits) =>
              splits.map((v) => (v == null ? "" : spec.log ? (spec.axisFmt || fmtPow)(v) : fmt(v))),
          },
        ],
        series: [
          {},
          ...this.series.map((s) => {
            const one = { label: s.label, stroke: s.color, width: s.width || 1.5, spanGaps: false };
            one.points = { show: false };
            if (spec.stacked) one.fill = hexOnCard(s.color, 0.55);
            else if (spec.fill) one.fill = hexAlpha(s.color, 0.12);
            return one;
          }),
        ],
        hooks: {
          setCursor: [
            (u) => {
              this.hovering = u.cursor.idx != null && u.cursor.left >= 0;
              this.renderLegend(this.hovering ? u.cursor.idx : null);
            },
          ],
        },
      };
      this.plot = new uPlot(opts, data, this.node);
    }

    renderLegend(idx) {
      const fmt = this.spec.fmt || fmtCount;
      const items = this.series.map((s, i) => {
        const values = this.data[i + 1];
        let v = null;
        if (idx != null) v = values[idx];
        else {
          for (let j = values.length - 1; j >= 0; j--) {
            if (values[j] != null) {
              v = values[j];
              break;
            }
          }
        }
        const item = el(
          "span",
          { class: "item", "data-series": s.label },
          el("span", { class: "swatch", style: `background:${s.color}` }),
          s.label + " ",
          el("b", { text: fmt(v) }),
        );
        return item;
      });
      this.legend.replaceChildren(...items);
    }
  }

  // One row per server, one column per second, each cell coloured by the server's share of that
  // second's traffic against its fair share: dark for none, blue near its share, bright above;
  // red while the server is out of rotation. With many servers, lines would only tangle.
  class HeatMap {
    constructor(node) {
      this.node = node;
      this.rows = [];
      this.x = [];
      this.legend = el("div", { class: "legend" });
      node.parentNode.insertBefore(this.legend, node);
      this.canvas = el("canvas");
      node.append(this.canvas);
      this.hover = null;
      this.canvas.addEventListener("mousemove", (e) => {
        this.hover = { x: e.offsetX, y: e.offsetY };
        this.renderLegend();
      });
      this.canvas.addEventListener("mouseleave", () => {
        this.hover = null;
        this.renderLegend();
      });
      if (window.ResizeObserver) new ResizeObserver(() => this.draw()).observe(node);
    }

    update(x, rows) {
      this.x = x;
      this.rows = rows;
      this.draw();
      this.renderLegend();
    }

    layout() {
      const width = Math.max(this.node.clientWidth, 200);
      const n = Math.max(this.rows.length, 1);
      const rowH = Math.max(6, Math.min(24, Math.floor(200 / n)));
      return { width, height: rowH * n + 22, rowH, left: 56, right: 6, top: 2 };
    }

    draw() {
      const L = this.layout();
      const dpr = window.devicePixelRatio || 1;
      const canvas = this.canvas;
      canvas.style.width = L.width + "px";
      canvas.style.height = L.height + "px";
      canvas.width = Math.round(L.width * dpr);
      canvas.height = Math.round(L.height * dpr);
      const ctx = canvas.getContext("2d");
      ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
      ctx.clearRect(0, 0, L.width, L.height);
      const cols = this.x.length;
      const plotW = L.width - L.left - L.right;
      const colW = cols ? plotW / cols : plotW;
      const n = this.rows.length;
      ctx.font = FONT;
      ctx.textBaseline = "middle";
      this.rows.forEach((row, r) => {
        const y = L.top + r * L.rowH;
        ctx.fillStyle = row.color;
        ctx.fillRect(0, y + L.rowH / 2 - 1.5, 8, 3);
        ctx.fillStyle = AXIS;
        if (L.rowH >= 9) ctx.fillText(row.label, 12, y + L.rowH / 2);
        for (let c = 0; c < cols; c++) {
          ctx.fillStyle = this.cell(row.values[c], row.states[c], row.fair);
          ctx.fillRect(L.left + c * colW, y, Math.ceil(colW), L.rowH - (L.rowH > 8 ? 1 : 0));
        }
      });
      // Time labels under the first, middle and last columns.
      ctx.fillStyle = AXIS;
      ctx.textBaseline = "alphabetic";
      const base = L.top + n * L.rowH + 15;
      if (cols) {
        ctx.textAlign = "left";
        ctx.fillText(fmtClock(this.x[0]), L.left, base);
        ctx.textAlign = "right";
        ctx.fillText(fmtClock(this.x[cols - 1]), L.width - L.right, base);
        if (plotW > 260 && cols > 2) {
          ctx.textAlign = "center";
          ctx.fillText(fmtClock(this.x[Math.floor(cols / 2)]), L.left + plotW / 2, base);
        }
        ctx.textAlign = "left";
      }
    }

    cell(share, state, fair) {
      if (state && state !== "healthy" && state !== "slow_start") return "rgba(248,81,73,0.75)";
      if (share == null) return "#11151b";
      // 0 -> the empty colour, fair share -> palette blue, twice fair or more -> near white.
      const r = Math.min(share / fair, 2);
      const from = r <= 1 ? [32, 38, 48] : [88, 166, 255];
      const to = r <= 1 ? [88, 166, 255] : [214, 234, 255];
      const t = r <= 1 ? Math.sqrt(r) : r - 1;
      const mix = (i) => Math.round(from[i] + (to[i] - from[i]) * t);
      return `rgb(${mix(0)},${mix(1)},${mix(2)})`;
    }

    renderLegend() {
      const L = this.layout();
      const cols = this.x.length;
      if (this.hover && cols && this.rows.length) {
        const plotW = L.width - L.left - L.right;
        const c = Math.floor(((this.hover.x - L.left) / plotW) * cols);
        const r = Math.floor((this.hover.y - L.top) / L.rowH);
        const row = this.rows[r];
        if (row && c >= 0 && c < cols) {
          const share = row.values[c];
          this.legend.replaceChildren(
            el("span", { class: "swatch", style: `background:${row.color}` }),
            `${row.label} at ${fmtClock(this.x[c])}: `,
            el("b", { text: fmtPercent(share == null ? null : share * 100) }),
            ` of the traffic (${(row.states[c] || "unknown").replace("_", " ")})`,
          );
          return;
        }
      }
      const key = (colour, text) =>
        el(
          "span",
          { class: "item" },
          el("span", { class: "swatch block", style: `background:${colour}` }),
          text,
        );
      this.legend.replaceChildren(
        key(this.cell(0, "healthy", 1), "none"),
        key(this.cell(0.5, "healthy", 1), "half"),
        key(this.cell(1, "healthy", 1), "fair share"),
        key(this.cell(2, "healthy", 1), "2× fair"),
        key(this.cell(0, "ejected", 1), "out of rotation"),
      );
    }
  }

  function heatmap(node) {
    let h = charts.get(node);
    if (!h) {
      h = new HeatMap(node);
      charts.set(node, h);
    }
    return h;
  }

  function chart(node, spec) {
    let c = charts.get(node);
    if (!c) {
      c = new Chart(node, spec);
      charts.set(node, c);
    }
    return c;
  }

  function chartIn(root, name, spec) {
    return chart(root.querySelector(`[data-chart="${name}"]`), spec);
  }

  function card(title, name, extraClass) {
    return el(
      "figure",
      { class: "card" + (extraClass ? " " + extraClass : "") },
      el("figcaption", { text: title }),
      el("div", { class: "chart", "data-chart": name }),
    );
  }

  // -- sections ---------------------------------------------------------------------------------

  function renderNumbers(stats, last) {
    const req = (last && last.requests) || {};
    setText("stat-rps", fmtCount(req.rate));
    setText("stat-p50", fmtMs(ms(req.p50)));
    setText("stat-p99", fmtMs(ms(req.p99)));
    setText("stat-errors", fmtCount(req.errors));
    document.getElementById("stat-errors").classList.toggle("nonzero", req.errors > 0);
    setText("stat-client-errors", fmtCount(req.client_errors));
    setText("stat-connections", last ? String(last.connections) : "–");
    let steps = null;
    for (const m of Object.values((last && last.models) || {})) {
      steps = (steps || 0) + (m.train_steps || 0);
    }
    setText("stat-train", fmtCount(steps));
    setText("stat-uptime", fmtDuration(stats.now - stats.started));
    setText("server-version", stats.version || "–");
    document.title = `${fmtCount(req.rate)} req/s · WebTorch`;
  }

  function setText(id, text) {
    const node = document.getElementById(id);
    if (node.textContent !== text) node.textContent = text;
  }

  function workerSlots(samples) {
    const slots = new Set();
    for (const p of samples) for (const slot of Object.keys(p.workers || {})) slots.add(slot);
    return [...slots].sort((a, b) => a - b);
  }

  function renderTraffic(samples, x) {
    const root = document.getElementById("panel-traffic");
    chartIn(root, "requests", { fmt: fmtCount, fill: true }).update(x, [
      { label: "requests/s", color: PALETTE[0], values: samples.map((p) => dig(p, "requests", "rate")) },
      { label: "4xx/s", color: AMBER, values: samples.map((p) => dig(p, "requests", "client_errors")) },
      { label: "5xx/s", color: RED, values: samples.map((p) => dig(p, "requests", "errors")) },
      // Several workers (server.workers > 1): each one's requests/s beside the total.
      ...workerSlots(samples).map((slot, i) => ({
        label: `worker ${slot}`,
        color: PALETTE[(3 + i) % PALETTE.length],
        values: samples.map((p) => dig(p, "workers", slot, "rate")),
      })),
    ]);
    chartIn(root, "latency", { fmt: fmtMs }).update(x, [
      { label: "p50", color: PALETTE[1], values: samples.map((p) => ms(dig(p, "requests", "p50"))) },
      { label: "p90", color: PALETTE[2], values: samples.map((p) => ms(dig(p, "requests", "p90"))) },
      { label: "p99", color: RED, values: samples.map((p) => ms(dig(p, "requests", "p99"))) },
    ]);
  }

  // Children of `container` keyed by `attr`: created by `make` when new, removed when gone.
  function keyed(container, attr, names, make) {
    const existing = new Map();
    for (const child of Array.from(container.children)) existing.set(child.getAttribute(attr), child);
    const out = new Map();
    for (const name of names) {
      let node = existing.get(name);
      if (!node) {
        node = make(name);
        node.setAttribute(attr, name);
        container.append(node);
      }
      out.set(name, node);
      existing.delete(name);
    }
    for (const [, node] of existing) {
      node.querySelectorAll(".chart").forEach((c) => {
        const ch = charts.get(c);
        if (ch && ch.plot) ch.plot.destroy();
        charts.delete(c);
      });
      node.remove();
    }
    return out;
  }

  function makeGroup() {
    const table = el(
      "table",
      { class: "table" },
      el(
        "thead",
        {},
        el(
          "tr",
          {},
          el("th", { text: "server" }),
          el("th", { text: "state" }),
          el("th", { class: "num", text: "weight" }),
          el("th", { class: "num", text: "in flight" }),
          el("th", { class: "num", text: "req/s" }),
          el("th", { class: "num", text: "share" }),
          el("th", { class: "num", text: "latency" }),
          el("th", { class: "num", text: "fail/s" }),
        ),
      ),
      el("tbody"),
    );
    const tableCard = el("figure", { class: "card" }, el("figcaption", { text: "Servers now" }), table);
    return el(
      "div",
      { class: "group" },
      el(
        "h3",
        {},
        el("span", { class: "name" }),
        el("span", { class: "facts" }),
        el("span", { class: "facts guard-rail", hidden: true }),
      ),
      el(
        "div",
        { class: "charts servers" },
        tableCard,
        card("Traffic share per server, over time", "share-map"),
        card("Mean latency per server (ms, log scale)", "server-latency"),
      ),
      el(
        "div",
        { class: "charts" },
        card("Traffic share per server (%)", "share"),
        card("In flight per server (stacked)", "inflight"),
        card("Learned policy: predicted vs observed (ms)", "prediction", "learned"),
        card("Predicted ÷ observed (log scale, ×1: exact)", "prediction-error", "learned"),
        card("Balancer decisions/s by reason", "reasons", "reasons"),
      ),
    );
  }

  function renderUpstreams(stats, samples, x) {
    const groups = stats.upstreams || {};
    const names = Object.keys(groups).sort();
    document.querySelector('[data-empty="upstreams"]').hidden = names.length > 0;
    const nodes = keyed(document.getElementById("upstream-groups"), "data-group", names, makeGroup);
    const last = samples[samples.length - 1];
    for (const name of names) {
      const group = groups[name];
      const node = nodes.get(name);
      // Servers: the configured ones first, then any that only the history still knows.
      const addresses = (group.servers || []).map((s) => s.address);
      for (const p of samples) {
        for (const address of Object.keys(dig(p, "upstreams", name, "servers") || {})) {
          if (!addresses.includes(address)) addresses.push(address);
        }
      }
      const color = new Map(addresses.map((a, i) => [a, PALETTE[i % PALETTE.length]]));
      const short = shortNames(addresses);
      const weight = new Map((group.servers || []).map((s) => [s.address, s.weight]));
      const totalWeight = addresses.reduce((sum, a) => sum + (weight.get(a) || 1), 0);
      const perServer = (field, scale) =>
        addresses.map((a) => ({
          label: short.get(a),
          color: color.get(a),
          values: samples.map((p) => {
            const v = dig(p, "upstreams", name, "servers", a, field);
            return v == null ? null : v * scale;
          }),
        }));

      node.querySelector(".name").textContent = name;
      const states = {};
      for (const server of group.servers || []) states[server.state] = (states[server.state] || 0) + 1;
      const stateText = Object.entries(states)
        .sort((a, b) => (a[0] === "healthy" ? -1 : b[0] === "healthy" ? 1 : a[0] < b[0] ? -1 : 1))
        .map(([state, n]) => `${n} ${state.replace("_", " ")}`)
        .join(", ");
      const facts = [
        `policy ${group.policy}`,
        `${(group.servers || []).length} servers: ${stateText || "none"}`,
        `${fmtInt(group.retries)} retries`,
      ];
      if (group.prediction_error != null) {
        // The policy's error is an average |log(predicted / observed)|: show it as a factor.
        facts.push(`typical prediction off by ${fmtRatio(Math.exp(group.prediction_error))}`);
      }
      if (group.train_steps != null) facts.push(`${fmtInt(group.train_steps)} training steps`);
      node.querySelector(".facts").textContent = facts.join(" · ");
      // The learned policy's guard rail: whether the network decides or, after doing worse than
      // its prior (peak-EWMA) where it overruled it, the prior does for a while.
      const rail = node.querySelector(".guard-rail");
      rail.hidden = group.guard_backoffs == null;
      if (!rail.hidden) {
        const off = (group.backed_off_for || 0) > 0;
        const times = `${fmtInt(group.guard_backoffs)} back-off${group.guard_backoffs === 1 ? "" : "s"}`;
        rail.dataset.backedOff = off ? "true" : "false";
        rail.textContent = off
          ? `guard rail: following peak-EWMA for ${Math.ceil(group.backed_off_for)} s more · ${times}`
          : `guard rail: the network decides · ${times}`;
      }

      // Share as lines: a server that gets nothing stands out as a line at zero, where a stacked
      // band would only vanish. In flight stacked: the total, and who holds it.
      chartIn(node, "share", { fmt: fmtPercent }).update(x, perServer("share", 100));
      heatmap(node.querySelector('[data-chart="share-map"]')).update(
        x,
        addresses.map((a) => ({
          label: short.get(a),
          color: color.get(a),
          fair: (weight.get(a) || 1) / totalWeight,
          values: samples.map((p) => dig(p, "upstreams", name, "servers", a, "share")),
          states: samples.map((p) => dig(p, "upstreams", name, "servers", a, "state")),
        })),
      );
      chartIn(node, "inflight", { fmt: fmtCount, stacked: true }).update(
        x,
        perServer("inflight", 1),
      );
      chartIn(node, "server-latency", { fmt: fmtMs, log: true }).update(
        x,
        perServer("latency", 1000),
      );

      renderServerTable(node, name, group, last, color);

      const learned =
        group.policy === "learned" || samples.some((p) => dig(p, "upstreams", name, "predicted") != null);
      node.querySelectorAll(".learned").forEach((c) => (c.hidden = !learned));
      if (learned) {
        const predicted = samples.map((p) => ms(dig(p, "upstreams", name, "predicted")));
        const observed = samples.map((p) => ms(dig(p, "upstreams", name, "observed")));
        chartIn(node, "prediction", { fmt: fmtMs }).update(x, [
          { label: "predicted", color: PALETTE[3], values: predicted },
          { label: "observed", color: PALETTE[1], values: observed },
        ]);
        chartIn(node, "prediction-error", { fmt: fmtRatio, log: true, axisFmt: fmtRatio, include: 1 }).update(
          x,
          [
            {
              label: "predicted ÷ observed",
              color: PALETTE[2],
              values: predicted.map((p, i) =>
                p == null || observed[i] == null || observed[i] <= 0 ? null : p / observed[i],
              ),
            },
          ],
        );
      }
      const reasons = [];
      for (const p of samples) {
        for (const r of Object.keys(dig(p, "upstreams", name, "reasons") || {})) {
          if (!reasons.includes(r)) reasons.push(r);
        }
      }
      reasons.sort();
      const reasonsCard = node.querySelector(".reasons");
      reasonsCard.hidden = reasons.length === 0;
      if (reasons.length) {
        chartIn(node, "reasons", { fmt: fmtCount }).update(
          x,
          reasons.map((r, i) => ({
            label: r,
            color: PALETTE[(i + 4) % PALETTE.length],
            // A reason absent from a second's sample was not picked in that second.
            values: samples.map((p) => {
              const rs = dig(p, "upstreams", name, "reasons");
              return rs == null ? null : rs[r] || 0;
            }),
          })),
        );
      }
    }
  }

  function renderServerTable(node, name, group, last, color) {
    const table = node.querySelector("table");
    table.setAttribute("data-upstream-table", name);
    const tbody = table.querySelector("tbody");
    const rows = (group.servers || []).map((s) => {
      const now = dig(last, "upstreams", name, "servers", s.address) || {};
      const state = s.state || now.state || "unknown";
      return el(
        "tr",
        { "data-server": s.address },
        el(
          "td",
          {},
          el("span", { class: "swatch", style: `background:${color.get(s.address)}` }),
          s.address,
        ),
        el("td", { class: `state state-${state}`, "data-col": "state", text: state.replace("_", " ") }),
        el("td", { class: "num", text: String(s.weight) }),
        el("td", { class: "num", "data-col": "inflight", text: String(s.inflight) }),
        el("td", { class: "num", text: fmtCount(now.rate) }),
        el("td", { class: "num", text: fmtPercent(now.share == null ? null : now.share * 100) }),
        el("td", { class: "num", text: fmtMs(ms(now.latency)) }),
        el("td", { class: "num", text: fmtCount(now.errors) }),
      );
    });
    tbody.replaceChildren(...rows);
  }

  function makeModel() {
    return el(
      "div",
      { class: "model" },
      el(
        "h3",
        {},
        el("span", { class: "name" }),
        el(
          "span",
          { class: "facts" },
          el("span", { "data-stat": "kind" }),
          " · ",
          el("span", { "data-stat": "steps" }),
          " steps · loss ",
          el("span", { "data-stat": "loss" }),
        ),
      ),
      el(
        "div",
        { class: "charts" },
        card("Rows/s", "rows"),
        card("Mean batch size (rows)", "batch"),
        card("Training steps/s", "train-steps", "trainable"),
        card("Training loss (log scale)", "loss", "trainable"),
      ),
    );
  }

  function renderModels(stats, samples, x) {
    const models = stats.models || {};
    const names = Object.keys(models).sort();
    document.querySelector('[data-empty="models"]').hidden = names.length > 0;
    const nodes = keyed(document.getElementById("model-list"), "data-model", names, makeModel);
    for (const name of names) {
      const model = models[name];
      const node = nodes.get(name);
      const series = (field) => samples.map((p) => dig(p, "models", name, field));
      node.querySelector(".name").textContent = name;
      node.querySelector('[data-stat="kind"]').textContent = model.trainable
        ? "serving and training"
        : "serving";
      node.querySelector('[data-stat="steps"]').textContent = fmtInt(model.steps || 0);
      node.querySelector('[data-stat="loss"]').textContent = fmtLoss(model.loss);
      chartIn(node, "rows", { fmt: fmtCount, fill: true }).update(x, [
        { label: "inference rows/s", color: PALETTE[0], values: series("rows") },
        { label: "inference requests/s", color: PALETTE[5], values: series("rate") },
        { label: "training rows/s", color: PALETTE[3], values: series("train_rows") },
      ]);
      chartIn(node, "batch", { fmt: fmtCount }).update(x, [
        { label: "rows per batch", color: PALETTE[6], values: series("batch") },
      ]);
      node.querySelectorAll(".trainable").forEach((c) => (c.hidden = !model.trainable));
      if (model.trainable) {
        chartIn(node, "train-steps", { fmt: fmtCount, fill: true }).update(x, [
          { label: "steps/s", color: PALETTE[3], values: series("train_steps") },
        ]);
        chartIn(node, "loss", { fmt: fmtLoss, log: true }).update(x, [
          { label: "loss", color: PALETTE[4], values: series("loss"), width: 2 },
        ]);
      }
    }
  }

  // The guard's stats are null until it exists; when present, each sample's `guard` is taken as
  // {action: decisions/s} (or {actions: {...}}) and the snapshot's `top_blocked` as a list of rows.
  function renderGuard(stats, samples, x) {
    const on = stats.guard != null;
    document.getElementById("guard-off").hidden = on;
    document.getElementById("guard-on").hidden = !on;
    if (!on) return;
    const actionsOf = (p) => {
      const g = p.guard;
      if (g == null) return null;
      return g.actions && typeof g.actions === "object" ? g.actions : g;
    };
    const actions = [];
    for (const p of samples) {
      for (const [a, v] of Object.entries(actionsOf(p) || {})) {
        if (typeof v === "number" && !actions.includes(a)) actions.push(a);
      }
    }
    actions.sort();
    chart(document.querySelector('[data-chart="guard"]'), { fmt: fmtCount }).update(
      x,
      actions.map((a, i) => ({
        label: a,
        color: a === "block" ? RED : a === "throttle" ? AMBER : PALETTE[i % PALETTE.length],
        values: samples.map((p) => {
          const acts = actionsOf(p);
          return acts == null ? null : acts[a] || 0;
        }),
      })),
    );
    const top = Array.isArray(stats.guard.top_blocked) ? stats.guard.top_blocked : [];
    const table = document.getElementById("guard-top");
    const columns = top.length ? Object.keys(top[0]) : ["client", "blocked"];
    table
      .querySelector("thead")
      .replaceChildren(el("tr", {}, ...columns.map((c) => el("th", { text: c }))));
    table.querySelector("tbody").replaceChildren(
      ...(top.length
        ? top.map((row) =>
            el("tr", {}, ...columns.map((c) => el("td", { text: row[c] == null ? "" : String(row[c]) }))),
          )
        : [el("tr", {}, el("td", { colspan: String(columns.length), text: "nobody blocked" }))]),
    );
  }

  // Pipelines: each poll brings running totals per stage; a stage's live numbers are the
  // differences from the previous poll (mean ms per request over that interval, rows/s...).
  function makePipeline() {
    return el(
      "div",
      { class: "pipeline" },
      el("h3", {}, el("span", { class: "name" })),
      el("div", { class: "stages" }),
      el("div", { class: "time-share" }),
      el("div", { class: "time-legend" }),
    );
  }

  function renderPipelines(stats) {
    const pipelines = stats.pipelines || {};
    const names = Object.keys(pipelines).sort();
    document.querySelector('[data-empty="pipelines"]').hidden = names.length > 0;
    const nodes = keyed(document.getElementById("pipeline-list"), "data-pipeline", names, makePipeline);
    const now = Date.now() / 1000;
    const prev = store.pipelines || { at: now, data: {} };
    const span = Math.max(now - prev.at, 1e-3);
    for (const name of names) {
      const node = nodes.get(name);
      node.querySelector(".name").textContent = name;
      const before = {};
      for (const s of prev.data[name] || []) before[s.stage] = s;
      const boxes = [];
      const shares = [];
      pipelines[name].forEach((s, i) => {
        const b = before[s.stage] || s;
        const requests = s.requests - b.requests;
        const mean = requests > 0 ? (s.seconds - b.seconds) / requests : null;
        const wait = requests > 0 ? (s.wait - b.wait) / requests : null;
        const batches = s.batches - b.batches;
        const color = PALETTE[i % PALETTE.length];
        const fact = (label, value) => [el("dt", { text: label }), el("dd", { text: value })];
        if (i > 0) boxes.push(el("span", { class: "stage-arrow", text: "→" }));
        boxes.push(
          el(
            "div",
            { class: "stage", "data-stage": s.stage, style: `border-top: 3px solid ${color}` },
            el("span", { class: "stage-name", text: s.stage }),
            el("span", { class: "stage-ms", "data-stat": "ms", text: fmtMs(ms(mean)) }),
            el(
              "dl",
              {},
              ...fact("queue wait", fmtMs(ms(wait))),
              ...fact("rows/s", fmtCount((s.rows - b.rows) / span)),
              ...fact("rows/batch", batches > 0 ? fmtCount((s.rows - b.rows) / batches) : "–"),
              ...fact("errors", fmtInt(s.errors)),
              ...fact("bytes in/s", fmtCount((s.bytes_in - b.bytes_in) / span)),
              ...fact("bytes out/s", fmtCount((s.bytes_out - b.bytes_out) / span)),
            ),
          ),
        );
        shares.push({ stage: s.stage, color, mean: mean || 0 });
      });
      node.querySelector(".stages").replaceChildren(...boxes);
      const total = shares.reduce((sum, s) => sum + s.mean, 0);
      node.querySelector(".time-share").replaceChildren(
        ...shares.map((s) =>
          el("span", {
            title: `${s.stage}: ${fmtMs(ms(s.mean))}`,
            style: `width: ${total > 0 ? (100 * s.mean) / total : 0}%; background: ${s.color}`,
          }),
        ),
      );
      node.querySelector(".time-legend").textContent =
        total > 0
          ? "where the time goes: " +
            shares.map((s) => `${s.stage} ${Math.round((100 * s.mean) / total)}%`).join(" · ")
          : "no requests in the last second";
    }
    store.pipelines = { at: now, data: pipelines };
  }

  function render(stats) {
    const samples = store.samples;
    const x = samples.map((p) => p.t);
    const last = samples[samples.length - 1];
    renderNumbers(stats, last);
    renderTraffic(samples, x);
    renderUpstreams(stats, samples, x);
    renderModels(stats, samples, x);
    renderPipelines(stats);
    renderGuard(stats, samples, x);
    renderPlugins(stats);
  }

  // Plugins: per plugin and phase, running totals; the time per call is over the whole run.
  function renderPlugins(stats) {
    const rows = Array.isArray(stats.plugins) ? stats.plugins : [];
    document.getElementById("plugins-off").hidden = rows.length > 0;
    const table = document.getElementById("plugins-table");
    table.hidden = rows.length === 0;
    const columns = ["plugin", "phase", "calls", "errors", "timeouts", "us per call"];
    table
      .querySelector("thead")
      .replaceChildren(el("tr", {}, ...columns.map((c) => el("th", { text: c }))));
    table.querySelector("tbody").replaceChildren(
      ...rows.map((r) => {
        const us = r.calls ? ((r.seconds / r.calls) * 1e6).toFixed(1) : "";
        const cells = [r.plugin, r.phase, r.calls, r.errors, r.timeouts, us];
        return el("tr", {}, ...cells.map((v) => el("td", { text: String(v) })));
      }),
    );
  }

  // -- polling ----------------------------------------------------------------------------------

  // Appends what the server sent; false when the server restarted (its history is not ours).
  function ingest(stats) {
    // A restart is another start time. (Not an older seq: with several workers a poll may
    // reach a worker whose newest second is one behind the last one's.)
    const restarted = store.started !== null && stats.started !== store.started;
    if (restarted) {
      store.samples = [];
      store.seq = 0;
      store.started = null;
      return false;
    }
    store.started = stats.started;
    for (const sample of stats.samples || []) {
      if (sample.seq > store.seq) {
        store.samples.push(sample);
        store.seq = sample.seq;
      }
    }
    if (store.samples.length > MAX_POINTS) store.samples.splice(0, store.samples.length - MAX_POINTS);
    store.seq = Math.max(store.seq, stats.seq || 0);
    return true;
  }

  function setState(state, message) {
    document.body.setAttribute("data-state", state);
    const pill = document.getElementById("state-pill");
    pill.textContent = { live: "live", error: "no contact", unauthorized: "needs token" }[state] || state;
    const banner = document.getElementById("banner");
    banner.hidden = !message;
    banner.textContent = message || "";
  }

  function lostContact(reason) {
    const since = store.lastOk
      ? ` Last answer ${fmtDuration((Date.now() - store.lastOk) / 1000)} ago.`
      : "";
    setState("error", `Lost contact with the server — retrying (${reason}).${since}`);
  }

  async function poll() {
    const began = performance.now();
    let again = POLL_MS;
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), TIMEOUT_MS);
    try {
      const url = "/dashboard/stats" + (store.seq ? `?since=${store.seq}` : "");
      const resp = await fetch(url, { cache: "no-store", signal: controller.signal });
      if (resp.status === 401) {
        setState(
          "unauthorized",
          "This dashboard needs the server's token: reload the page and sign in with any user " +
            "name and the token as the password.",
        );
      } else if (!resp.ok) {
        lostContact(`HTTP ${resp.status}`);
      } else {
        const stats = await resp.json();
        store.lastOk = Date.now();
        if (!ingest(stats)) {
          again = 0; // a restarted server: fetch its whole history now
        } else {
          setState("live", "");
          try {
            render(stats);
          } catch (err) {
            // A drawing bug is not a lost server; say so where tests and people can see it (and
            // keep saying it: the attribute is never cleared).
            console.error(err);
            document.body.setAttribute("data-render-error", String(err && err.stack || err));
          }
          setText("last-update", new Date().toLocaleTimeString());
          document.body.setAttribute("data-seq", String(store.seq));
        }
      }
    } catch (err) {
      lostContact(err && err.name === "AbortError" ? "no answer in 4 s" : "server unreachable");
    } finally {
      clearTimeout(timer);
      setTimeout(poll, Math.max(0, again - (performance.now() - began)));
    }
  }

  // uPlot draws in an animation frame, outside render()'s try: its errors are drawing bugs too.
  window.addEventListener("error", (event) => {
    document.body.setAttribute("data-render-error", String(event.message));
  });

  // For a console (and the browser tests): what the page holds.
  window.webtorchDashboard = { store, charts };
  poll();
})();
