// STADI front-end extension for ComfyUI.
//
// After a run, the "STADI Sampler" node shows the plan it executed: the latent's row bands as
// stacked stripes (height proportional to rows, one colour per device, labelled with device,
// rows, stride and network evaluations), per-device busy / communication / idle bars, the mode,
// steps and wall time, and the run's notes. The "GPU Cluster Profile (STADI)" node shows the
// devices it found (name, label, memory, utilisation) and its notes.
//
// Data comes from the nodes' execution "ui" (nodes/types.py plan_ui_payload and
// StadiCluster.to_ui) through node.onExecuted(output). Everything is drawn on the node canvas
// (onDrawForeground) below the widgets; the node grows to fit. No dependencies.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const SAMPLER = "STADISampler";
const PROFILE = "STADIClusterProfile";
const KEY = "__stadiPanel"; // per-node state: { kind, data, stale }

const PAD = 10;
const LINE = 16;
const FONT = "12px Arial, sans-serif";
const FONT_BOLD = "bold 12px Arial, sans-serif";
const FONT_SMALL = "11px Arial, sans-serif";
const MIN_NODE_WIDTH = { plan: 460, devices: 400 }; // with a panel shown
const MAX_NOTE_LINES = 8;

// Tableau-10: distinct on dark and light node backgrounds.
const PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2",
                 "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];

// ------------------------------------------------------------------------------------------
// Small helpers (all tolerant of missing or malformed fields)

function num(x) {
  const v = typeof x === "string" ? Number(x) : x;
  return typeof v === "number" && Number.isFinite(v) ? v : null;
}

function fmtSeconds(x) {
  const v = num(x);
  if (v === null) return "–";
  if (v >= 100) return `${v.toFixed(0)} s`;
  if (v >= 10) return `${v.toFixed(1)} s`;
  return `${v.toFixed(2)} s`;
}

function fmtPct(x) {
  const v = num(x);
  return v === null ? "–" : `${v.toFixed(0)}%`;
}

function fmtMiB(x) {
  const v = num(x);
  if (v === null) return "?";
  return v >= 1024 ? `${(v / 1024).toFixed(1)} GiB` : `${v.toFixed(0)} MiB`;
}

function str(x, fallback = "") {
  return x === null || x === undefined ? fallback : String(x);
}

function asList(x) {
  return Array.isArray(x) ? x : [];
}

function hashString(s) {
  let h = 0;
  for (let i = 0; i < s.length; i++) h = (h * 31 + s.charCodeAt(i)) | 0;
  return Math.abs(h);
}

// Same device, same colour, on every node: "cuda:N" / "cpu:N" use palette[N]; other names hash.
function deviceColor(device, fallbackIndex = 0) {
  const name = str(device);
  const m = /^(cuda|cpu|mps|xpu|npu)(?::(\d+))?$/i.exec(name.trim());
  let idx;
  if (m) {
    idx = Number(m[2] || 0) + (m[1].toLowerCase() === "cpu" ? 5 : 0);
  } else if (name) {
    idx = hashString(name);
  } else {
    idx = fallbackIndex;
  }
  return PALETTE[idx % PALETTE.length];
}

function textColor() {
  return globalThis.LiteGraph?.NODE_TEXT_COLOR || "#aaa";
}

function brightTextColor() {
  return globalThis.LiteGraph?.NODE_SELECTED_TITLE_COLOR || "#fff";
}

// Truncate to a pixel width with an ellipsis.
function fit(ctx, text, width) {
  text = str(text);
  if (width <= 0) return "";
  if (ctx.measureText(text).width <= width) return text;
  let lo = 0, hi = text.length;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (ctx.measureText(text.slice(0, mid) + "…").width <= width) lo = mid;
    else hi = mid - 1;
  }
  return text.slice(0, lo) + "…";
}

// Greedy word wrap to a pixel width (long words are cut by fit()).
function wrap(ctx, text, width) {
  const words = str(text).split(/\s+/).filter(Boolean);
  const lines = [];
  let line = "";
  for (const w of words) {
    const next = line ? `${line} ${w}` : w;
    if (!line || ctx.measureText(next).width <= width) line = next;
    else { lines.push(line); line = w; }
  }
  if (line) lines.push(line);
  return lines.map((l) => fit(ctx, l, width));
}

function drawNotes(ctx, notes, x, y, w) {
  const list = asList(notes).map((n) => str(n)).filter(Boolean);
  if (!list.length) return 0;
  ctx.font = FONT_SMALL;
  ctx.fillStyle = textColor();
  let lines = [];
  for (const n of list) {
    const wrapped = wrap(ctx, n, w - 12);
    wrapped.forEach((l, i) => lines.push((i === 0 ? "• " : "   ") + l));
  }
  if (lines.length > MAX_NOTE_LINES) {
    const hidden = lines.length - (MAX_NOTE_LINES - 1);
    lines = lines.slice(0, MAX_NOTE_LINES - 1);
    lines.push(`   (+${hidden} more lines)`);
  }
  let yy = y;
  for (const l of lines) {
    ctx.fillText(l, x, yy + 11);
    yy += 14;
  }
  return yy - y + 4;
}

// A measuring context for sizing the node outside a draw call.
let measureCtx = null;
function getMeasureCtx() {
  if (!measureCtx) {
    const c = document.createElement("canvas");
    c.width = c.height = 1;
    measureCtx = c.getContext("2d");
  }
  return measureCtx;
}

// ------------------------------------------------------------------------------------------
// STADI Sampler: the plan

function normalizeBands(plan) {
  const bands = asList(plan.bands).filter((b) => b && typeof b === "object").map((b, i) => ({
    rank: num(b.rank) ?? i,
    device: str(b.device, `rank ${i}`),
    row_start: num(b.row_start),
    rows: Math.max(0, num(b.rows) ?? 0),
    stride: num(b.stride),
    evals: num(b.evals),
    busy_s: num(b.busy_s),
    comm_s: num(b.comm_s),
    wall_s: num(b.wall_s),
    idle_pct: num(b.idle_pct),
  }));
  const groups = asList(plan.groups).filter((g) => g && typeof g === "object");
  if (groups.length) return branchUnits(plan, groups, bands);
  // Bands are drawn top to bottom in latent order.
  if (bands.every((b) => b.row_start !== null)) bands.sort((a, b) => a.row_start - b.row_start);
  return bands;
}

// A CFG-branch split: every rank's units, drawn as the branch-major strip (all cond rows, then
// all uncond rows), each unit labelled with its branch and its rows inside that branch.
function branchUnits(plan, groups, bands) {
  const byRank = new Map(bands.map((b) => [b.rank, b]));
  const order = [...groups].sort((a, b) => (asList(a.branches).includes("cond") ? 0 : 1) -
                                          (asList(b.branches).includes("cond") ? 0 : 1));
  const units = [];
  let offset = 0;
  for (const g of order) {
    const ranks = asList(g.ranks);
    const rows = asList(g.rows).map((r) => Math.max(0, num(r) ?? 0));
    let start = 0;
    ranks.forEach((rank, i) => {
      const b = byRank.get(num(rank)) || { rank: num(rank), device: `rank ${rank}` };
      units.push({ ...b, row_start: offset + start, rows: rows[i], branch: asList(g.branches).join("+"),
                   branch_start: start });
      start += rows[i];
    });
    offset += start;
  }
  return units;
}

// Draws the plan panel at (x, y), width w; returns the height used.
function drawPlan(ctx, plan, x, y, w, stale) {
  const bands = normalizeBands(plan);
  let yy = y;
  ctx.textAlign = "left";
  ctx.textBaseline = "alphabetic";

  // Header: mode, steps, timing.
  const mode = str(plan.mode, "?");
  const steps = num(plan.steps);
  const warmup = num(plan.warmup);
  const L = num(plan.sync_period);
  const height = num(plan.height) ?? bands.reduce((s, b) => s + b.rows, 0);
  ctx.font = FONT_BOLD;
  ctx.fillStyle = brightTextColor();
  const title = `STADI plan${stale ? " (previous run)" : ""} · ${mode}`;
  ctx.fillText(fit(ctx, title, w), x, yy + 12);
  yy += LINE + 2;
  ctx.font = FONT;
  ctx.fillStyle = textColor();
  const parts = [];
  if (steps !== null) parts.push(`${steps} steps`);
  if (warmup !== null) parts.push(`warmup ${warmup}`);
  if (L !== null) parts.push(`sync every ${L}`);
  parts.push(`wall ${fmtSeconds(plan.wall_s)}`);
  ctx.fillText(fit(ctx, parts.join(" · "), w), x, yy + 12);
  yy += LINE;
  const rankWord = bands.length === 1 ? "rank" : "ranks";
  ctx.fillText(fit(ctx, `latent ${height || "?"} rows in ${bands.length} ${rankWord} (top to bottom)`, w), x, yy + 12);
  yy += LINE + 6;

  if (!bands.length) {
    ctx.fillText("no bands in this plan", x, yy + 12);
    yy += LINE;
    return yy - y + drawNotes(ctx, plan.notes, x, yy, w);
  }

  // Latent stripes (proportional to rows) with labels on the right.
  const boxW = Math.min(120, Math.max(60, Math.round(w * 0.24)));
  const labelGap = 22;
  const labelX = x + boxW + labelGap;
  const labelW = w - boxW - labelGap;
  const labelH = 15;
  const boxH = Math.max(120, bands.length * (labelH + 3) + 8);
  const totalRows = bands.reduce((s, b) => s + b.rows, 0) || bands.length;
  let sy = yy;
  const centres = [];
  bands.forEach((b, i) => {
    const rows = totalRows === bands.length && !b.rows ? 1 : b.rows;
    const h = (boxH * rows) / totalRows;
    ctx.fillStyle = deviceColor(b.device, i);
    ctx.fillRect(x, sy, boxW, h);
    if (b.stride !== null && b.stride > 1) {
      // Strided bands are hatched: they skip network evaluations.
      ctx.save();
      ctx.beginPath();
      ctx.rect(x, sy, boxW, h);
      ctx.clip();
      ctx.strokeStyle = "rgba(0,0,0,0.35)";
      ctx.lineWidth = 2;
      for (let d = -h; d < boxW; d += 8) {
        ctx.beginPath();
        ctx.moveTo(x + d, sy + h);
        ctx.lineTo(x + d + h, sy);
        ctx.stroke();
      }
      ctx.restore();
    }
    if (h >= 13) {
      ctx.font = FONT_BOLD;
      ctx.fillStyle = "#111";
      ctx.textAlign = "center";
      ctx.fillText(fit(ctx, `r${b.rank}`, boxW - 4), x + boxW / 2, sy + h / 2 + 4);
      ctx.textAlign = "left";
    }
    centres.push(sy + h / 2);
    sy += h;
  });
  // Band borders.
  ctx.strokeStyle = "rgba(0,0,0,0.6)";
  ctx.lineWidth = 1;
  ctx.strokeRect(x + 0.5, yy + 0.5, boxW - 1, boxH - 1);
  sy = yy;
  for (const b of bands.slice(0, -1)) {
    sy += (boxH * (totalRows === bands.length && !b.rows ? 1 : b.rows)) / totalRows;
    ctx.beginPath();
    ctx.moveTo(x, Math.round(sy) + 0.5);
    ctx.lineTo(x + boxW, Math.round(sy) + 0.5);
    ctx.stroke();
  }
  // Label positions: at the stripe centre, pushed apart so they never overlap.
  const ly = centres.map((c) => c);
  for (let i = 0; i < ly.length; i++) {
    ly[i] = Math.max(ly[i], yy + labelH / 2, i ? ly[i - 1] + labelH : -Infinity);
  }
  for (let i = ly.length - 1; i >= 0; i--) {
    ly[i] = Math.min(ly[i], yy + boxH - labelH / 2, i < ly.length - 1 ? ly[i + 1] - labelH : Infinity);
  }
  bands.forEach((b, i) => {
    const colour = deviceColor(b.device, i);
    ctx.strokeStyle = colour;
    ctx.lineWidth = 1;
    ctx.beginPath();
    ctx.moveTo(x + boxW + 2, centres[i]);
    ctx.lineTo(labelX - 4, ly[i]);
    ctx.stroke();
    const rowsText = b.branch
      ? `${b.branch} rows ${b.branch_start}–${b.branch_start + b.rows - 1} (${b.rows})`
      : b.row_start !== null
        ? `rows ${b.row_start}–${b.row_start + b.rows - 1} (${b.rows})`
        : `${b.rows} rows`;
    const strideText = b.stride !== null ? `stride ${b.stride}` : "stride –";
    const evalText = b.evals !== null ? `${b.evals} evals` : "evals –";
    ctx.font = FONT_BOLD;
    ctx.fillStyle = colour;
    const dev = fit(ctx, b.device, Math.min(90, labelW));
    ctx.fillText(dev, labelX, ly[i] + 4);
    const dw = ctx.measureText(dev).width + 6;
    ctx.font = FONT;
    ctx.fillStyle = textColor();
    ctx.fillText(fit(ctx, `${rowsText} · ${strideText} · ${evalText}`, labelW - dw), labelX + dw, ly[i] + 4);
  });
  yy += boxH + 10;

  // Busy / communication / idle per rank, scaled to the slowest rank's wall time.
  ctx.font = FONT_BOLD;
  ctx.fillStyle = brightTextColor();
  ctx.fillText("time per rank", x, yy + 12);
  // Legend.
  ctx.font = FONT_SMALL;
  const legend = [["busy", "device"], ["comm", "#888"], ["idle", "rgba(128,128,128,0.25)"]];
  let lx = x + ctx.measureText("time per rank").width + 30;
  for (const [name, col] of legend) {
    ctx.fillStyle = col === "device" ? deviceColor(bands[0].device, 0) : col;
    ctx.fillRect(lx, yy + 3, 10, 10);
    ctx.strokeStyle = "rgba(200,200,200,0.7)";
    ctx.lineWidth = 1;
    ctx.strokeRect(lx + 0.5, yy + 3.5, 9, 9);
    ctx.fillStyle = textColor();
    ctx.fillText(name, lx + 13, yy + 12);
    lx += 13 + ctx.measureText(name).width + 12;
  }
  yy += LINE + 4;
  const walls = bands.map((b) => b.wall_s).filter((v) => v !== null && v > 0);
  const maxWall = walls.length ? Math.max(...walls) : null;
  const nameW = Math.min(80, Math.round(w * 0.18));
  const textW = Math.min(190, Math.round(w * 0.42));
  const barX = x + nameW;
  const barW = Math.max(20, w - nameW - textW - 8);
  const barH = 12;
  bands.forEach((b, i) => {
    const colour = deviceColor(b.device, i);
    ctx.font = FONT;
    ctx.fillStyle = colour;
    ctx.fillText(fit(ctx, b.device, nameW - 6), x, yy + 11);
    // Track.
    ctx.fillStyle = "rgba(128,128,128,0.25)";
    ctx.fillRect(barX, yy + 1, barW, barH);
    if (maxWall !== null && b.wall_s !== null) {
      const scale = barW / maxWall;
      const wallPx = Math.max(1, b.wall_s * scale);
      const busyPx = Math.min(wallPx, Math.max(0, (b.busy_s ?? 0) * scale));
      const commPx = Math.min(wallPx - busyPx, Math.max(0, (b.comm_s ?? 0) * scale));
      ctx.fillStyle = colour;
      ctx.fillRect(barX, yy + 1, busyPx, barH);
      ctx.fillStyle = "#888";
      ctx.fillRect(barX + busyPx, yy + 1, commPx, barH);
      ctx.strokeStyle = "rgba(200,200,200,0.7)";
      ctx.lineWidth = 1;
      ctx.strokeRect(barX + 0.5, yy + 1.5, Math.max(1, wallPx - 1), barH - 1);
    }
    let idle = b.idle_pct;
    if (idle === null && b.busy_s !== null && b.wall_s) idle = 100 * Math.max(0, 1 - b.busy_s / b.wall_s);
    ctx.font = FONT_SMALL;
    ctx.fillStyle = textColor();
    const t = `busy ${fmtSeconds(b.busy_s)} / ${fmtSeconds(b.wall_s)} · idle ${fmtPct(idle)}`;
    ctx.fillText(fit(ctx, t, textW), barX + barW + 8, yy + 11);
    yy += barH + 6;
  });
  yy += 4;

  yy += drawNotes(ctx, plan.notes, x, yy, w);
  return yy - y;
}

// ------------------------------------------------------------------------------------------
// GPU Cluster Profile: the device list

function drawDevices(ctx, info, x, y, w, stale) {
  let yy = y;
  const devices = asList(info.devices).filter((d) => d && typeof d === "object");
  ctx.textAlign = "left";
  ctx.font = FONT_BOLD;
  ctx.fillStyle = brightTextColor();
  const backend = info.backend ? ` · backend ${info.backend}` : "";
  ctx.fillText(fit(ctx, `STADI devices${stale ? " (previous run)" : ""}: ${devices.length}${backend}`, w), x, yy + 12);
  yy += LINE + 4;
  devices.forEach((d, i) => {
    const name = str(d.name, `device ${i}`);
    const colour = deviceColor(name, i);
    ctx.fillStyle = colour;
    ctx.fillRect(x, yy + 2, 10, 10);
    ctx.font = FONT_BOLD;
    ctx.fillText(fit(ctx, name, 80), x + 15, yy + 12);
    const nameW = Math.min(80, ctx.measureText(name).width) + 22;
    ctx.font = FONT;
    ctx.fillStyle = textColor();
    const label = [str(d.label), d.kind && !str(d.label).toLowerCase().includes(str(d.kind).toLowerCase()) ? `(${d.kind})` : ""]
      .filter(Boolean).join(" ");
    ctx.fillText(fit(ctx, label || "–", w - nameW), x + nameW, yy + 12);
    yy += LINE;
    // Memory bar + utilisation.
    const total = num(d.memory_total_mb);
    const used = num(d.memory_used_mb);
    const barX = x + 15;
    const barW = Math.max(40, Math.round(w * 0.32));
    ctx.fillStyle = "rgba(128,128,128,0.25)";
    ctx.fillRect(barX, yy + 2, barW, 9);
    if (total && used !== null) {
      ctx.fillStyle = colour;
      ctx.fillRect(barX, yy + 2, Math.min(barW, (barW * used) / total), 9);
    }
    ctx.font = FONT_SMALL;
    ctx.fillStyle = textColor();
    const mem = total !== null || used !== null ? `mem ${fmtMiB(used)} / ${fmtMiB(total)}` : "mem –";
    const util = num(d.utilization_pct) !== null ? `util ${fmtPct(d.utilization_pct)}` : "util –";
    const src = d.source ? ` · ${d.source}` : "";
    ctx.fillText(fit(ctx, `${mem} · ${util}${src}`, w - barW - 24), barX + barW + 8, yy + 10);
    yy += LINE;
  });
  if (!devices.length) {
    ctx.font = FONT;
    ctx.fillStyle = textColor();
    ctx.fillText("no devices reported", x, yy + 12);
    yy += LINE;
  }
  yy += 4;
  yy += drawNotes(ctx, info.notes, x, yy, w);
  return yy - y;
}

// ------------------------------------------------------------------------------------------
// Node wiring

function panelWidth(node) {
  return Math.max(node.size?.[0] ?? 0, MIN_NODE_WIDTH[node[KEY]?.kind] ?? 400) - 2 * PAD;
}

function drawPanel(node, ctx, x, y, w) {
  const st = node[KEY];
  if (!st || !st.data) return 0;
  return st.kind === "plan" ? drawPlan(ctx, st.data, x, y, w, st.stale) : drawDevices(ctx, st.data, x, y, w, st.stale);
}

// Height of the panel at the node's width (measured by drawing it off-screen; cached).
function panelHeight(node) {
  const st = node[KEY];
  if (!st || !st.data) return 0;
  const w = panelWidth(node);
  const key = `${w}|${st.stale}`;
  if (st.heightKey === key) return st.height;
  const ctx = getMeasureCtx();
  ctx.save();
  try {
    st.height = drawPanel(node, ctx, 0, 0, w) + PAD;
    st.heightKey = key;
    return st.height;
  } finally {
    ctx.restore();
  }
}

// Bottom of the widget area (widget.y / computedHeight are set by the last arrange()).
function widgetsBottom(node) {
  let bottom = 0;
  for (const w of asList(node.widgets)) {
    if (!w || w.hidden || typeof w.y !== "number") continue;
    const h = num(w.computedHeight) ?? (globalThis.LiteGraph?.NODE_WIDGET_HEIGHT ?? 20) + 4;
    bottom = Math.max(bottom, w.y + h);
  }
  return bottom;
}

function fitNode(node) {
  const want = node.computeSize();
  const w = Math.max(node.size[0], want[0]);
  const h = Math.max(node.size[1], want[1]);
  if (w !== node.size[0] || h !== node.size[1]) node.setSize([w, h]);
  node.setDirtyCanvas?.(true, true);
  app.graph?.setDirtyCanvas?.(true, true);
}

function patchNodeType(nodeType, outputKey, kind) {
  const proto = nodeType.prototype;

  const onExecuted = proto.onExecuted;
  proto.onExecuted = function (output) {
    const r = onExecuted?.apply(this, arguments);
    try {
      const list = output && typeof output === "object" ? output[outputKey] : undefined;
      const data = Array.isArray(list) ? list[list.length - 1] : list;
      if (data && typeof data === "object") {
        this[KEY] = { kind, data, stale: false };
        fitNode(this);
      }
    } catch (e) {
      console.warn("STADI: could not show the run's output", e);
    }
    return r;
  };

  const onExecutionStart = proto.onExecutionStart;
  proto.onExecutionStart = function () {
    const r = onExecutionStart?.apply(this, arguments);
    if (this[KEY]) this[KEY].stale = true;
    return r;
  };

  const computeSize = proto.computeSize;
  proto.computeSize = function (out) {
    const size = computeSize.apply(this, arguments);
    try {
      const h = panelHeight(this);
      if (h > 0) {
        size[0] = Math.max(size[0], MIN_NODE_WIDTH[this[KEY].kind] ?? 400);
        size[1] += h;
      }
    } catch (e) {
      console.warn("STADI: could not size the panel", e);
    }
    return size;
  };

  const onDrawForeground = proto.onDrawForeground;
  proto.onDrawForeground = function (ctx) {
    const r = onDrawForeground?.apply(this, arguments);
    const st = this[KEY];
    if (!st || !st.data || this.flags?.collapsed) return r;
    ctx.save();
    try {
      const w = panelWidth(this);
      const need = panelHeight(this);
      let y0 = widgetsBottom(this) + 6;
      if (!(y0 > 6)) y0 = this.size[1] - need;
      ctx.beginPath();
      ctx.rect(0, y0 - 4, this.size[0], Math.max(0, this.size[1] - y0 + 4));
      ctx.clip();
      ctx.fillStyle = "rgba(0,0,0,0.18)";
      ctx.beginPath();
      ctx.roundRect
        ? ctx.roundRect(PAD / 2, y0 - 2, this.size[0] - PAD, Math.min(need, this.size[1] - y0 - 2), 6)
        : ctx.rect(PAD / 2, y0 - 2, this.size[0] - PAD, Math.min(need, this.size[1] - y0 - 2));
      ctx.fill();
      drawPanel(this, ctx, PAD, y0 + 4, w);
      if (y0 + need > this.size[1] + 1 && !this._stadiGrowing) {
        // The widgets moved down (or the node was shrunk): grow once on the next frame.
        this._stadiGrowing = true;
        requestAnimationFrame(() => {
          this._stadiGrowing = false;
          const h = y0 + need + 2;
          if (this.size[1] < h) this.setSize([this.size[0], h]);
          this.setDirtyCanvas?.(true, true);
        });
      }
    } catch (e) {
      console.warn("STADI: could not draw the panel", e);
    } finally {
      ctx.restore();
    }
    return r;
  };
}

app.registerExtension({
  name: "stadi.plan",
  async setup() {
    // A node whose result comes from ComfyUI's cache is not executed again, and gets no
    // "executed" message (only output nodes are re-sent theirs): what it shows is still current.
    api.addEventListener("execution_cached", (event) => {
      try {
        for (const id of asList(event?.detail?.nodes)) {
          const node = app.graph?.getNodeById?.(id);
          if (node?.[KEY]) node[KEY].stale = false;
        }
        app.graph?.setDirtyCanvas?.(true, false);
      } catch (e) {
        console.warn("STADI: could not handle execution_cached", e);
      }
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name === SAMPLER) patchNodeType(nodeType, "stadi_plan", "plan");
    else if (nodeData?.name === PROFILE) patchNodeType(nodeType, "stadi_devices", "devices");
  },
});

// For tests and other extensions: the drawing functions, without a node.
export const stadiPanels = { drawPlan, drawDevices, deviceColor };
