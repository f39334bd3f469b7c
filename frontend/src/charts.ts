/**
 * Small Canvas-2D charts for the metrics strip, category counts and the revert
 * evaluation.  Text goes through `fillText` (never HTML), so series names coming from
 * logs are safe.
 */
import { PALETTE, categoryColours, formatNumber, niceTicks } from "./data";
import { MAP_THEME } from "./scatter";

const FONT = "11px Roboto, 'Helvetica Neue', Arial, sans-serif";

/** In dark mode neutral inks (greys: text, axes, run lines) flip their lightness; hues stay as they are. */
export function neutralInk(colour: string): string {
  const m = /^#([0-9a-f]{6})$/i.exec(colour);
  if (!MAP_THEME.dark || !m) return colour;
  const v = parseInt(m[1], 16);
  const rgb = [(v >> 16) & 255, (v >> 8) & 255, v & 255];
  if (Math.max(...rgb) - Math.min(...rgb) > 40) return colour;
  return `#${rgb.map((x) => (255 - x).toString(16).padStart(2, "0")).join("")}`;
}
const axis = () => neutralInk("#9e9e9e");
const text = () => neutralInk("#616161");
const grid = () => (MAP_THEME.dark ? "#505050" : "#eeeeee");

function setup(canvas: HTMLCanvasElement, width: number, height: number): CanvasRenderingContext2D {
  const dpr = window.devicePixelRatio || 1;
  canvas.width = Math.round(width * dpr);
  canvas.height = Math.round(height * dpr);
  canvas.style.width = `${width}px`;
  canvas.style.height = `${height}px`;
  const ctx = canvas.getContext("2d")!;
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, width, height);
  ctx.font = FONT;
  return ctx;
}

/** A cleared chart canvas with its title drawn at the top left. */
function titled(canvas: HTMLCanvasElement, width: number, height: number, title: string): CanvasRenderingContext2D {
  const ctx = setup(canvas, width, height);
  ctx.fillStyle = neutralInk("#212121");
  ctx.font = "500 12px Roboto, 'Helvetica Neue', Arial, sans-serif";
  ctx.fillText(title, 8, 14);
  ctx.font = FONT;
  return ctx;
}

/** Axis numbers without trailing zeros ("0.5", not "0.500"). */
function tickLabel(v: number): string {
  return formatNumber(v).replace(/(\.\d*?)0+$/, "$1").replace(/\.$/, "");
}

/** The value box drawn beside the hovered step or bar: at `x`, flipped left when it would leave the chart. */
function hoverBox(ctx: CanvasRenderingContext2D, lines: string[], x: number, top: number, width: number): void {
  ctx.font = FONT;
  ctx.textAlign = "left";
  const w = Math.max(...lines.map((t) => ctx.measureText(t).width)) + 10;
  const bx = x + 6 + w > width ? Math.max(0, x - 6 - w) : x + 6;
  ctx.fillStyle = "rgba(33,33,33,0.88)";
  ctx.fillRect(bx, top, w, 14 * lines.length + 4);
  ctx.fillStyle = "#ffffff";
  lines.forEach((t, k) => ctx.fillText(t, bx + 5, top + 13 + 14 * k));
}

/** Repaint `paint(i)` with the index under the pointer (`at(x)`, or null outside), and null on leave. */
function hoverable(canvas: HTMLCanvasElement, at: (x: number) => number | null, paint: (hover: number | null) => void): void {
  let shown: number | null = null;
  canvas.addEventListener("mousemove", (e) => {
    const i = at(e.clientX - canvas.getBoundingClientRect().left);
    if (i !== shown) { shown = i; paint(i); }
  });
  canvas.addEventListener("mouseleave", () => { shown = null; paint(null); });
}

export interface LineSeries {
  name: string;
  points: [number, number][];
  colour?: string;
  /** line dash (runs are told apart by dash, layers by hue) */
  dash?: number[];
}

/**
 * Line chart with x = step; `marker` draws the current step as an orange rule.  `xRange`
 * aligns the x-axes of charts shown together; `hint` says which direction is better.
 * Hovering shows each series' value at the nearest step; clicking calls `onStep`.
 */
export function lineChart(canvas: HTMLCanvasElement, series: LineSeries[], opts: {
  width: number; height: number; title: string; marker?: number | null; yLabel?: string; xRange?: [number, number] | null;
  hint?: string; onStep?: (step: number) => void; yRange?: [number, number] | null;
}): void {
  const { width, height } = opts;
  const m = { l: 44, r: 10, t: opts.hint ? 34 : 22, b: 20 };
  const all = series.flatMap((s) => s.points).filter((p) => Number.isFinite(p[0]) && Number.isFinite(p[1]));
  let x0 = Math.min(...all.map((p) => p[0])), x1 = Math.max(...all.map((p) => p[0]));
  if (opts.xRange) { x0 = Math.min(x0, opts.xRange[0]); x1 = Math.max(x1, opts.xRange[1]); }
  let y0 = Math.min(...all.map((p) => p[1])), y1 = Math.max(...all.map((p) => p[1]));
  if (opts.yRange) { y0 = Math.min(y0, opts.yRange[0]); y1 = Math.max(y1, opts.yRange[1]); } // shared across small multiples
  if (opts.marker !== null && opts.marker !== undefined) { x0 = Math.min(x0, opts.marker); x1 = Math.max(x1, opts.marker); }
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (y1 === y0) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
  const pw = width - m.l - m.r, ph = height - m.t - m.b;
  const sx = (x: number) => m.l + ((x - x0) / (x1 - x0)) * pw;
  const sy = (y: number) => m.t + ph - ((y - y0) / (y1 - y0)) * ph;
  const sorted = series.map((s) => s.points.filter((p) => Number.isFinite(p[1])).sort((a, b) => a[0] - b[0]));
  const steps = [...new Set(sorted.flatMap((pts) => pts.map((p) => p[0])))].sort((a, b) => a - b);
  const paint = (hover: number | null) => {
    const ctx = setup(canvas, width, height);
    ctx.fillStyle = neutralInk("#212121");
    ctx.font = "500 12px Roboto, 'Helvetica Neue', Arial, sans-serif";
    ctx.fillText(ellipsis(ctx, opts.title, width - 12), m.l - 36, 14);
    ctx.font = FONT;
    if (opts.hint) { ctx.fillStyle = text(); ctx.fillText(ellipsis(ctx, opts.hint, width - 12), m.l - 36, 27); }
    if (!all.length) {
      ctx.fillStyle = text();
      ctx.fillText("no data logged", m.l, height / 2);
      return;
    }
    ctx.strokeStyle = grid();
    ctx.fillStyle = text();
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    for (const t of niceTicks(y0, y1, 4)) {
      ctx.beginPath();
      ctx.moveTo(m.l, sy(t) + 0.5);
      ctx.lineTo(width - m.r, sy(t) + 0.5);
      ctx.stroke();
      ctx.fillText(tickLabel(t), m.l - 4, sy(t) + 4);
    }
    ctx.textAlign = "center";
    for (const t of niceTicks(x0, x1, 4)) ctx.fillText(tickLabel(t), sx(t), height - 5);
    ctx.textAlign = "left";
    ctx.strokeStyle = axis();
    ctx.beginPath();
    ctx.moveTo(m.l, m.t + ph + 0.5);
    ctx.lineTo(width - m.r, m.t + ph + 0.5);
    ctx.stroke();
    if (opts.marker !== null && opts.marker !== undefined) {
      ctx.strokeStyle = "#f57c00";
      ctx.lineWidth = 1.5;
      ctx.beginPath();
      ctx.moveTo(sx(opts.marker), m.t);
      ctx.lineTo(sx(opts.marker), m.t + ph);
      ctx.stroke();
    }
    series.forEach((s, i) => {
      const colour = neutralInk(s.colour ?? PALETTE[i % PALETTE.length]);
      const pts = sorted[i];
      ctx.strokeStyle = colour;
      ctx.fillStyle = colour;
      ctx.lineWidth = 1.6;
      ctx.setLineDash(s.dash ?? []);
      ctx.beginPath();
      pts.forEach(([x, y], j) => (j ? ctx.lineTo(sx(x), sy(y)) : ctx.moveTo(sx(x), sy(y))));
      ctx.stroke();
      ctx.setLineDash([]);
      if (pts.length <= 40) for (const [x, y] of pts) { ctx.beginPath(); ctx.arc(sx(x), sy(y), 2, 0, Math.PI * 2); ctx.fill(); }
    });
    if (hover !== null) {
      ctx.strokeStyle = "#9e9e9e";
      ctx.lineWidth = 1;
      ctx.beginPath(); ctx.moveTo(sx(hover) + 0.5, m.t); ctx.lineTo(sx(hover) + 0.5, m.t + ph); ctx.stroke();
      const lines = [`step ${hover}`, ...series.map((s, i) => {
        const p = sorted[i].find((q) => q[0] === hover);
        return p ? `${s.name}: ${formatNumber(p[1])}` : null;
      }).filter((t): t is string => !!t)].slice(0, 6);
      hoverBox(ctx, lines, sx(hover), m.t, width);
    }
  };
  paint(null);
  if (!all.length) return;
  const nearest = (px: number): number | null => {
    const x = x0 + ((px - m.l) / pw) * (x1 - x0);
    let best: number | null = null;
    for (const s of steps) if (best === null || Math.abs(s - x) < Math.abs(best - x)) best = s;
    return best;
  };
  hoverable(canvas, nearest, paint);
  if (opts.onStep) {
    canvas.style.cursor = "pointer";
    canvas.title = "Click to move the step slider here";
    canvas.addEventListener("click", (e) => { const s = nearest(e.clientX - canvas.getBoundingClientRect().left); if (s !== null) opts.onStep!(s); });
  }
}

/** Grouped bars: one group per `groups` entry, one bar per `keys` entry; hovering a group shows its values. */
export function groupedBarChart(canvas: HTMLCanvasElement, groups: string[], keys: string[],
  value: (group: string, key: string) => number, opts: { width: number; height: number; title: string; max?: number }): void {
  const { width, height } = opts;
  const m = { l: 36, r: 8, t: 22, b: 34 };
  const colours = categoryColours(keys);
  const colour = (k: string) => colours.get(k) ?? "#9e9e9e";
  // `max` shares the y-scale across small multiples (so equal bars mean equal counts)
  const max = opts.max ?? Math.max(1, ...groups.flatMap((g) => keys.map((k) => value(g, k))));
  const pw = width - m.l - m.r, ph = height - m.t - m.b;
  const gw = pw / Math.max(1, groups.length);
  const bw = Math.max(2, (gw * 0.8) / Math.max(1, keys.length));
  const paint = (hover: number | null) => {
    const ctx = titled(canvas, width, height, opts.title);
    if (!groups.length || !keys.length) {
      ctx.fillStyle = text();
      ctx.fillText("no labels at this step", m.l, height / 2);
      return;
    }
    ctx.textAlign = "right";
    ctx.fillStyle = text();
    ctx.strokeStyle = grid();
    for (const t of niceTicks(0, max, 3)) {
      const y = m.t + ph - (t / max) * ph;
      ctx.beginPath(); ctx.moveTo(m.l, y + 0.5); ctx.lineTo(width - m.r, y + 0.5); ctx.stroke();
      ctx.fillText(formatNumber(t), m.l - 4, y + 4);
    }
    ctx.textAlign = "center";
    groups.forEach((g, gi) => {
      if (gi === hover) { ctx.fillStyle = MAP_THEME.dark ? "rgba(255,255,255,0.08)" : "rgba(0,0,0,0.05)"; ctx.fillRect(m.l + gi * gw, m.t, gw, ph); }
      keys.forEach((k, ki) => {
        const v = value(g, k);
        const h = (v / max) * ph;
        ctx.fillStyle = colour(k);
        ctx.fillRect(m.l + gi * gw + gw * 0.1 + ki * bw, m.t + ph - h, bw - 1, h);
      });
      ctx.fillStyle = text();
      ctx.fillText(ellipsis(ctx, g, gw - 4), m.l + gi * gw + gw / 2, m.t + ph + 14);
    });
    // legend
    ctx.textAlign = "left";
    let x = m.l;
    keys.forEach((k) => {
      ctx.fillStyle = colour(k);
      ctx.fillRect(x, height - 11, 9, 9);
      ctx.fillStyle = text();
      ctx.fillText(k, x + 12, height - 3);
      x += ctx.measureText(k).width + 24;
    });
    if (hover !== null) hoverBox(ctx, [groups[hover], ...keys.map((k) => `${k}: ${formatNumber(value(groups[hover], k))}`)].slice(0, 8),
      m.l + (hover + 1) * gw, m.t, width);
  };
  paint(null);
  if (groups.length && keys.length) hoverable(canvas, (px) => (px < m.l || px >= m.l + pw ? null : Math.min(groups.length - 1, Math.floor((px - m.l) / gw))), paint);
}

/** Revert evaluation: bars with error whiskers per importance bin, random baseline band; hovering a bar shows its values. */
export function revertChart(canvas: HTMLCanvasElement, bins: string[], mean: number[], std: number[],
  random: number, randomStd: number, opts: { width: number; height: number; title: string }): void {
  const { width, height } = opts;
  const m = { l: 48, r: 10, t: 22, b: 22 };
  const values = [...mean.map((v, i) => v - (std[i] || 0)), ...mean.map((v, i) => v + (std[i] || 0)),
    random - randomStd, random + randomStd, 0].filter(Number.isFinite);
  let lo = Math.min(...values), hi = Math.max(...values);
  if (hi === lo) { lo -= 0.01; hi += 0.01; }
  const pw = width - m.l - m.r, ph = height - m.t - m.b;
  const sy = (v: number) => m.t + ph - ((v - lo) / (hi - lo)) * ph;
  const bw = pw / Math.max(1, bins.length);
  const percent = (v: number) => `${v >= 0 ? "+" : ""}${(v * 100).toFixed(1)}%`;
  const paint = (hover: number | null) => {
    const ctx = titled(canvas, width, height, opts.title);
    ctx.textAlign = "right";
    ctx.fillStyle = text();
    ctx.strokeStyle = grid();
    for (const t of niceTicks(lo, hi, 4)) {
      ctx.beginPath(); ctx.moveTo(m.l, sy(t) + 0.5); ctx.lineTo(width - m.r, sy(t) + 0.5); ctx.stroke();
      const pct = Math.abs(t) < 1e-9 ? 0 : t * 100;
      ctx.fillText(`${pct.toFixed(Math.abs(hi - lo) < 0.05 ? 1 : 0)}%`, m.l - 4, sy(t) + 4);
    }
    // random baseline band
    ctx.fillStyle = "rgba(158,158,158,0.25)";
    ctx.fillRect(m.l, sy(random + randomStd), pw, Math.max(1, sy(random - randomStd) - sy(random + randomStd)));
    ctx.strokeStyle = neutralInk("#757575");
    ctx.setLineDash([4, 3]);
    ctx.beginPath(); ctx.moveTo(m.l, sy(random)); ctx.lineTo(width - m.r, sy(random)); ctx.stroke();
    ctx.setLineDash([]);
    ctx.textAlign = "center";
    bins.forEach((b, i) => {
      const x = m.l + i * bw + bw * 0.2, w = bw * 0.6;
      const y0 = sy(0), y1 = sy(mean[i]);
      if (i === hover) { ctx.fillStyle = MAP_THEME.dark ? "rgba(255,255,255,0.08)" : "rgba(0,0,0,0.05)"; ctx.fillRect(m.l + i * bw, m.t, bw, ph); }
      ctx.fillStyle = "#f57c00";
      ctx.fillRect(x, Math.min(y0, y1), w, Math.max(1, Math.abs(y1 - y0)));
      ctx.strokeStyle = neutralInk("#424242");
      ctx.beginPath();
      ctx.moveTo(x + w / 2, sy(mean[i] - (std[i] || 0)));
      ctx.lineTo(x + w / 2, sy(mean[i] + (std[i] || 0)));
      ctx.stroke();
      ctx.fillStyle = text();
      ctx.fillText(b, x + w / 2, height - 6);
    });
    ctx.textAlign = "right";
    ctx.fillStyle = neutralInk("#757575");
    ctx.fillText("random bin", width - m.r - 2, sy(random) - 4);
    ctx.strokeStyle = axis();
    ctx.beginPath(); ctx.moveTo(m.l, sy(0) + 0.5); ctx.lineTo(width - m.r, sy(0) + 0.5); ctx.stroke();
    if (hover !== null) hoverBox(ctx, [`bin ${bins[hover]}`, `accuracy change ${percent(mean[hover])} ± ${((std[hover] || 0) * 100).toFixed(1)}`,
      `random neurons ${percent(random)} ± ${(randomStd * 100).toFixed(1)}`], m.l + (hover + 1) * bw, m.t, width);
  };
  paint(null);
  if (bins.length) hoverable(canvas, (px) => (px < m.l || px >= m.l + pw ? null : Math.min(bins.length - 1, Math.floor((px - m.l) / bw))), paint);
}

function ellipsis(ctx: CanvasRenderingContext2D, text: string, max: number): string {
  if (ctx.measureText(text).width <= max) return text;
  let t = text;
  while (t.length > 1 && ctx.measureText(`${t}…`).width > max) t = t.slice(0, -1);
  return `${t}…`;
}
