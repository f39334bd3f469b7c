/**
 * Pure data transforms of the concept-map frontend (no DOM, no fetch), unit-tested in
 * `tests/data.test.ts`.  Everything the views draw goes through here, so the views
 * stay thin and the rules (what is unplaced, which step is shown, what a CSV row
 * holds) live in one tested place.
 */

/** One layer's layout at one step, as sent by `GET /map` (see docs/http_api.md). */
export interface LayerMap {
  n: number;
  /** x, y interleaved; NaN for neurons the space could not place */
  layout: Float32Array;
  channel: Int32Array;
  group: Int32Array;
}

/**
 * Decode the little-endian binary body of `GET /map`:
 * `uint32 n; float32 layout[n][2]; int32 channel[n]; int32 group[n]`.
 *
 * @example parseMap(await response.arrayBuffer()).n
 */
export function parseMap(buffer: ArrayBuffer): LayerMap {
  if (buffer.byteLength < 4) throw new Error(`map payload too short (${buffer.byteLength} bytes)`);
  const view = new DataView(buffer);
  const n = view.getUint32(0, true);
  const expected = 4 + n * 16;
  if (buffer.byteLength !== expected) {
    throw new Error(`map payload has ${buffer.byteLength} bytes, expected ${expected} for ${n} neurons`);
  }
  // Copies keep the arrays aligned and independent of the response buffer.
  const layout = new Float32Array(buffer.slice(4, 4 + n * 8));
  const channel = new Int32Array(buffer.slice(4 + n * 8, 4 + n * 12));
  const group = new Int32Array(buffer.slice(4 + n * 12, 4 + n * 16));
  if (!littleEndianHost()) {
    // Big-endian hosts are practically extinct; re-read through DataView to be exact.
    for (let i = 0; i < n * 2; i++) layout[i] = view.getFloat32(4 + i * 4, true);
    for (let i = 0; i < n; i++) {
      channel[i] = view.getInt32(4 + n * 8 + i * 4, true);
      group[i] = view.getInt32(4 + n * 12 + i * 4, true);
    }
  }
  return { n, layout, channel, group };
}

function littleEndianHost(): boolean {
  return new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;
}

/** Top concepts of one layer at one step, as sent by `GET /labels`. */
export interface Labels {
  concepts: string[];
  categories: string[];
  threshold: number;
  interpretable_counts?: Record<string, number>;
  interpretable_fraction?: number;
  top_concepts: number[][];
  top_similarity: (number | null)[][];
  /** per neuron: does its best concept pass the detector's threshold (or significance test)?
   * Older servers leave it out: then top similarity > threshold decides. */
  interpretable?: (boolean | null)[];
}

/** All neurons of the shown layers of one run at one step, flattened for drawing. */
export interface PointSet {
  layers: string[];
  /** placed points only: x, y interleaved */
  positions: Float32Array;
  /** per placed point: index into `layers` */
  layerIndex: Uint16Array;
  channel: Int32Array;
  group: Int32Array;
  /** neurons that could not be placed: listed, never drawn */
  unplaced: { layer: string; channel: number }[];
  /** lookup "layer:channel" -> index of the placed point */
  index: Map<string, number>;
}

export const neuronId = (layer: string, channel: number): string => `${layer}:${channel}`;

/**
 * Split a neuron id `layer:channel` (layer names may contain dots, never colons).
 * @example parseNeuronId("features.3:12") // {layer: "features.3", channel: 12}
 */
export function parseNeuronId(id: string): { layer: string; channel: number } | null {
  const at = id.lastIndexOf(":");
  if (at <= 0) return null;
  const channelText = id.slice(at + 1).trim();
  if (!/^\d+$/.test(channelText)) return null;
  return { layer: id.slice(0, at).trim(), channel: Number(channelText) };
}

/** Flatten several layers into one drawable set; NaN positions go to `unplaced`. */
export function combineLayers(maps: { layer: string; map: LayerMap }[]): PointSet {
  let placed = 0;
  for (const { map } of maps) {
    for (let i = 0; i < map.n; i++) {
      if (Number.isFinite(map.layout[2 * i]) && Number.isFinite(map.layout[2 * i + 1])) placed++;
    }
  }
  const positions = new Float32Array(placed * 2);
  const layerIndex = new Uint16Array(placed);
  const channel = new Int32Array(placed);
  const group = new Int32Array(placed);
  const unplaced: { layer: string; channel: number }[] = [];
  const index = new Map<string, number>();
  let at = 0;
  maps.forEach(({ layer, map }, li) => {
    for (let i = 0; i < map.n; i++) {
      const x = map.layout[2 * i];
      const y = map.layout[2 * i + 1];
      if (!Number.isFinite(x) || !Number.isFinite(y)) {
        unplaced.push({ layer, channel: map.channel[i] });
        continue;
      }
      positions[2 * at] = x;
      positions[2 * at + 1] = y;
      layerIndex[at] = li;
      channel[at] = map.channel[i];
      group[at] = map.group[i];
      index.set(neuronId(layer, map.channel[i]), at);
      at++;
    }
  });
  return { layers: maps.map((m) => m.layer), positions, layerIndex, channel, group, unplaced, index };
}

export interface Bounds {
  minX: number;
  minY: number;
  maxX: number;
  maxY: number;
}

/** Bounding box of interleaved positions, padded by `pad` of its size (never empty). */
export function bounds(positions: ArrayLike<number>, pad = 0.05): Bounds {
  let minX = Infinity, minY = Infinity, maxX = -Infinity, maxY = -Infinity;
  for (let i = 0; i + 1 < positions.length; i += 2) {
    const x = positions[i], y = positions[i + 1];
    if (!Number.isFinite(x) || !Number.isFinite(y)) continue;
    if (x < minX) minX = x;
    if (x > maxX) maxX = x;
    if (y < minY) minY = y;
    if (y > maxY) maxY = y;
  }
  if (!Number.isFinite(minX)) return { minX: -1, minY: -1, maxX: 1, maxY: 1 };
  const w = Math.max(maxX - minX, 1e-6), h = Math.max(maxY - minY, 1e-6);
  return { minX: minX - w * pad, minY: minY - h * pad, maxX: maxX + w * pad, maxY: maxY + h * pad };
}

export function unionBounds(all: Bounds[]): Bounds {
  if (!all.length) return { minX: -1, minY: -1, maxX: 1, maxY: 1 };
  return {
    minX: Math.min(...all.map((b) => b.minX)),
    minY: Math.min(...all.map((b) => b.minY)),
    maxX: Math.max(...all.map((b) => b.maxX)),
    maxY: Math.max(...all.map((b) => b.maxY)),
  };
}

// ---------------------------------------------------------------- steps

/** Sorted union of the steps of several runs. */
export function unionSteps(lists: number[][]): number[] {
  const all = new Set<number>();
  for (const list of lists) for (const s of list) all.add(s);
  return [...all].sort((a, b) => a - b);
}

/**
 * The step of `available` to show for the requested `step`: the step itself, else the
 * latest one before it, else the first one (runs logged at different steps still show
 * something sensible). `null` when nothing is available.
 * @example stepAtOrBefore([0, 5, 10], 7) // 5
 */
export function stepAtOrBefore(available: number[], step: number): number | null {
  if (!available.length) return null;
  let best: number | null = null;
  for (const s of available) if (s <= step && (best === null || s > best)) best = s;
  return best ?? Math.min(...available);
}

/**
 * Keep the slider where the user left it when the step list grows (live training):
 * same step if still present, else the nearest one; a user who was on the latest step
 * follows new steps when `follow` is set.
 */
export function keepStepIndex(oldSteps: number[], newSteps: number[], oldIndex: number, follow: boolean): number {
  if (!newSteps.length) return 0;
  if (!oldSteps.length) return follow ? newSteps.length - 1 : 0;
  const wasLast = oldIndex >= oldSteps.length - 1;
  if (follow && wasLast) return newSteps.length - 1;
  const step = oldSteps[Math.min(Math.max(oldIndex, 0), oldSteps.length - 1)];
  let best = 0;
  for (let i = 0; i < newSteps.length; i++) {
    if (Math.abs(newSteps[i] - step) < Math.abs(newSteps[best] - step)) best = i;
  }
  return best;
}

// ---------------------------------------------------------------- colours

/** Categorical palette (material 600s); orange is kept for TensorBoard's accent: hover, selection, current step. */
export const PALETTE = [
  "#1e88e5", "#e53935", "#43a047", "#8e24aa", "#00acc1", "#fdd835", "#6d4c41", "#d81b60",
  "#3949ab", "#7cb342", "#546e7a", "#c0ca33", "#5e35b1", "#00897b", "#ffb300", "#039be5",
];
export const NONE_COLOUR = "#b0b0b0";
/** Concept categories get their own hues, apart from the run and layer colours (PALETTE), so "blue" never means both. */
export const CATEGORY_PALETTE = ["#00897b", "#d81b60", "#7cb342", "#5e35b1", "#6d4c41", "#00acc1", "#c0ca33", "#3949ab",
  "#8d6e63", "#f06292"];

export function hexToRgb(hex: string): [number, number, number] {
  const m = /^#?([0-9a-f]{6})$/i.exec(hex);
  if (!m) throw new Error(`not a #rrggbb colour: ${hex}`);
  const v = parseInt(m[1], 16);
  return [(v >> 16) & 255, (v >> 8) & 255, v & 255];
}

export type ColourBy = "layer" | "category" | "group";

export interface Legend {
  entries: { label: string; colour: string }[];
}

/**
 * Per-point RGBA bytes for the chosen colouring, plus the legend.
 * `labelsByLayer[layer]` gives each neuron's top concept (needed for "category").
 * Neurons without a value (no label, group -1) are grey.
 */
export function colourPoints(points: PointSet, by: ColourBy, labelsByLayer: Record<string, Labels | undefined>): {
  rgba: Uint8Array;
  legend: Legend;
} {
  const n = points.channel.length;
  if (by === "layer") {
    // Fast path (first draw of large maps): colour straight from the layer index.
    const rgb = points.layers.map((_, i) => hexToRgb(PALETTE[i % PALETTE.length]));
    const rgba = new Uint8Array(n * 4);
    for (let i = 0; i < n; i++) {
      const c = rgb[points.layerIndex[i]];
      rgba[4 * i] = c[0];
      rgba[4 * i + 1] = c[1];
      rgba[4 * i + 2] = c[2];
      rgba[4 * i + 3] = 255;
    }
    return { rgba, legend: { entries: points.layers.map((l, i) => ({ label: l, colour: PALETTE[i % PALETTE.length] })) } };
  }
  const keys: (string | null)[] = new Array(n);
  let colourOf: Map<string, string>;
  let below = false;
  if (by === "group") {
    for (let i = 0; i < n; i++) keys[i] = points.group[i] >= 0 ? `group ${points.group[i]}` : null;
    // Sorted so colours do not jump between steps.
    const distinct = [...new Set(keys.filter((k): k is string => k !== null))].sort(naturalCompare);
    colourOf = new Map(distinct.map((k, i) => [k, PALETTE[i % PALETTE.length]]));
  } else {
    // A neuron counts for its category only when its best match passes the detector's
    // threshold (as in the category bar chart); weaker ones are drawn pale.
    for (let i = 0; i < n; i++) {
      const labels = labelsByLayer[points.layers[points.layerIndex[i]]];
      const top = topLabel(labels, points.channel[i]);
      if (!top) { keys[i] = null; continue; }
      const weak = !top.interpretable;
      below ||= weak;
      keys[i] = weak ? BELOW : top.category || "uncategorised";
    }
    const vocabulary = Object.values(labelsByLayer).flatMap((l) => l?.categories ?? []);
    colourOf = categoryColours([...vocabulary, ...keys.filter((k): k is string => k !== null && k !== BELOW)]);
  }
  const rgbOf = new Map<string, [number, number, number]>();
  for (const [k, c] of colourOf) rgbOf.set(k, hexToRgb(c));
  rgbOf.set(BELOW, hexToRgb(BELOW_COLOUR));
  const none = hexToRgb(NONE_COLOUR);
  const rgba = new Uint8Array(n * 4);
  for (let i = 0; i < n; i++) {
    const k = keys[i];
    const rgb = (k !== null && rgbOf.get(k)) || none;
    rgba[4 * i] = rgb[0];
    rgba[4 * i + 1] = rgb[1];
    rgba[4 * i + 2] = rgb[2];
    rgba[4 * i + 3] = 255;
  }
  const present = new Set(keys);
  const entries = [...colourOf].filter(([k]) => present.has(k)).map(([label, colour]) => ({ label, colour }));
  if (below) {
    const t = Object.values(labelsByLayer).find((l) => l)?.threshold;
    entries.push({ label: `below threshold${t ? ` (${Number(t.toPrecision(3))})` : ""}`, colour: BELOW_COLOUR });
  }
  if (keys.some((k) => k === null)) entries.push({ label: by === "group" ? "no group" : "no label", colour: NONE_COLOUR });
  return { rgba, legend: { entries } };
}

const BELOW = "\u0000below";
/** Neurons whose best concept is under the detector's threshold: present, but quiet. */
export const BELOW_COLOUR = "#d5d5d5";

/**
 * Colours of concept categories in the order they first appear in `categories` (the
 * vocabulary's order), so the map, its legend and the category bar chart agree and do
 * not change between steps.
 *
 * @example categoryColours(["shape", "shape", "colour"]).get("colour") // CATEGORY_PALETTE[1]
 */
export function categoryColours(categories: string[]): Map<string, string> {
  const out = new Map<string, string>();
  for (const c of categories) if (!out.has(c)) out.set(c, CATEGORY_PALETTE[out.size % CATEGORY_PALETTE.length]);
  return out;
}

export function naturalCompare(a: string, b: string): number {
  return a.localeCompare(b, undefined, { numeric: true, sensitivity: "base" });
}

/** A neuron's best concept with the evidence behind it: `interpretable` is false when it is only a best guess. */
export interface TopLabel {
  concept: string;
  category: string;
  similarity: number | null;
  interpretable: boolean;
  threshold: number | null;
}

/**
 * Does a label pass its detector's bar?  The server's verdict when it sends one, else
 * similarity > threshold (no threshold: any finite similarity).
 * @example isInterpretable(0.02, 0.04, undefined) // false
 */
export function isInterpretable(similarity: number | null, threshold: number | null | undefined, verdict: boolean | null | undefined): boolean {
  if (verdict === true || verdict === false) return verdict;
  if (similarity === null || !Number.isFinite(similarity)) return false;
  return threshold === null || threshold === undefined || !Number.isFinite(threshold) ? true : similarity > threshold;
}

/** Best concept of a neuron, or null when it has none. */
export function topLabel(labels: Labels | undefined, channel: number): TopLabel | null {
  if (!labels) return null;
  const row = labels.top_concepts[channel];
  if (!row || !row.length || row[0] < 0) return null;
  const c = row[0];
  const raw = labels.top_similarity[channel]?.[0];
  const similarity = raw === null || raw === undefined || !Number.isFinite(raw) ? null : raw;
  const threshold = labels.threshold ?? null;
  return {
    concept: labels.concepts[c] ?? `concept ${c}`,
    category: labels.categories[c] ?? "",
    similarity,
    interpretable: isInterpretable(similarity, threshold, labels.interpretable?.[channel]),
    threshold,
  };
}

/**
 * One line that never passes a best guess off as a concept:
 * "circle (shape) · score 0.124 > τ 0.04" or
 * "no interpretable concept; best guess ring (shape), score 0.0247 < τ 0.04".
 */
export function describeLabel(top: { concept: string | null; category?: string | null; similarity: number | null;
  interpretable: boolean; threshold?: number | null }): string {
  const cat = top.category ? ` (${top.category})` : "";
  const tau = top.threshold !== null && top.threshold !== undefined && Number.isFinite(top.threshold) ? top.threshold : null;
  const t = tau === null ? "" : String(Number(tau.toPrecision(3)));
  if (!top.concept) return "no concept scored";
  if (top.interpretable) return `${top.concept}${cat} · score ${formatNumber(top.similarity)}${tau !== null ? ` > τ ${t}` : ""}`;
  return `no interpretable concept; best guess ${top.concept}${cat}, score ${formatNumber(top.similarity)}` +
    (tau !== null ? ` < τ ${t}` : " (not significant)");
}

// ---------------------------------------------------------------- search

export interface SearchHit {
  index: number;
  id: string;
  why: string;
  /** for concept matches: which of the neuron's top concepts matched (1 = best), its score, and whether it passes */
  rank?: number;
  score?: number | null;
  interpretable?: boolean;
}

const ORDINAL = ["1st", "2nd", "3rd"];

/**
 * Find neurons by id (`features.3:12`, or a bare channel `12`, or a layer prefix
 * `features.3:`) or by concept word (case-insensitive substring of a top concept).
 * Concept matches are ranked: interpretable best-concept matches first, then by score;
 * `why` says which rank matched, its score and when it is below the threshold.
 */
export function searchPoints(points: PointSet, labelsByLayer: Record<string, Labels | undefined>, query: string,
  limit = 200): SearchHit[] {
  const q = query.trim().toLowerCase();
  if (!q) return [];
  const hits: SearchHit[] = [];
  const exact = parseNeuronId(query.trim());
  if (exact) {
    const i = points.index.get(neuronId(exact.layer, exact.channel));
    if (i !== undefined) return [{ index: i, id: neuronId(exact.layer, exact.channel), why: "id" }];
  }
  const bareChannel = /^\d+$/.test(q) ? Number(q) : null;
  const n = points.channel.length;
  const concepts: SearchHit[] = [];
  for (let i = 0; i < n; i++) {
    const layer = points.layers[points.layerIndex[i]];
    const id = neuronId(layer, points.channel[i]);
    if (bareChannel !== null && points.channel[i] === bareChannel) {
      hits.push({ index: i, id, why: "channel" });
      continue;
    }
    if (q.endsWith(":") && id.toLowerCase().startsWith(q)) {
      hits.push({ index: i, id, why: "layer" });
      continue;
    }
    const labels = labelsByLayer[layer];
    const ch = points.channel[i];
    const row = labels?.top_concepts[ch];
    if (!labels || !row) continue;
    for (let r = 0; r < row.length; r++) {
      const c = row[r];
      if (c < 0 || !(labels.concepts[c] ?? "").toLowerCase().includes(q)) continue;
      const raw = labels.top_similarity[ch]?.[r];
      const score = raw === null || raw === undefined || !Number.isFinite(raw) ? null : raw;
      const ok = r === 0 ? isInterpretable(score, labels.threshold, labels.interpretable?.[ch]) : isInterpretable(score, labels.threshold, undefined);
      const why = `${labels.concepts[c]} · ${ORDINAL[r] ?? `${r + 1}th`} concept · ${formatNumber(score)}` +
        (ok ? "" : Number.isFinite(labels.threshold) ? ` < τ ${Number(labels.threshold.toPrecision(3))}` : " (not interpretable)");
      concepts.push({ index: i, id, why, rank: r + 1, score, interpretable: ok });
      break;
    }
  }
  const key = (h: SearchHit) => (h.rank === 1 && h.interpretable ? 0 : h.interpretable ? 1 : 2);
  concepts.sort((a, b) => key(a) - key(b) || (b.score ?? -Infinity) - (a.score ?? -Infinity) || (a.rank ?? 0) - (b.rank ?? 0) ||
    naturalCompare(a.id, b.id));
  return [...hits, ...concepts].slice(0, limit);
}

// ---------------------------------------------------------------- selection geometry

/** Even-odd rule point-in-polygon; polygon as [x0, y0, x1, y1, ...]. */
export function pointInPolygon(x: number, y: number, polygon: ArrayLike<number>): boolean {
  let inside = false;
  const m = polygon.length / 2;
  for (let i = 0, j = m - 1; i < m; j = i++) {
    const xi = polygon[2 * i], yi = polygon[2 * i + 1], xj = polygon[2 * j], yj = polygon[2 * j + 1];
    if ((yi > y) !== (yj > y) && x < ((xj - xi) * (y - yi)) / (yj - yi) + xi) inside = !inside;
  }
  return inside;
}

/** Indices of points inside a polygon (data coordinates). */
export function selectInPolygon(positions: Float32Array, polygon: number[]): number[] {
  if (polygon.length < 6) return [];
  const b = bounds(polygon, 0);
  const out: number[] = [];
  for (let i = 0; i < positions.length / 2; i++) {
    const x = positions[2 * i], y = positions[2 * i + 1];
    if (x < b.minX || x > b.maxX || y < b.minY || y > b.maxY) continue;
    if (pointInPolygon(x, y, polygon)) out.push(i);
  }
  return out;
}

/**
 * Uniform grid over the points for O(1)-ish nearest-point queries (hover on 100k
 * points must not scan them all on every mouse move).
 */
export class PointGrid {
  private cells: Map<number, number[]> = new Map();
  private readonly size: number;
  private readonly b: Bounds;
  private readonly cols: number;

  constructor(private readonly positions: Float32Array, cellsPerSide = 0) {
    const n = positions.length / 2;
    this.b = bounds(positions, 0.001);
    const side = cellsPerSide || Math.max(1, Math.ceil(Math.sqrt(n / 4)));
    this.size = Math.max(this.b.maxX - this.b.minX, this.b.maxY - this.b.minY) / side || 1;
    this.cols = side + 1;
    for (let i = 0; i < n; i++) {
      const key = this.key(positions[2 * i], positions[2 * i + 1]);
      let list = this.cells.get(key);
      if (!list) this.cells.set(key, (list = []));
      list.push(i);
    }
  }

  private cell(v: number, min: number): number {
    return Math.floor((v - min) / this.size);
  }

  private key(x: number, y: number): number {
    return this.cell(y, this.b.minY) * this.cols + this.cell(x, this.b.minX);
  }

  /** Index of the nearest point within `radius` (data units) of (x, y), or -1. */
  nearest(x: number, y: number, radius: number): number {
    const c0 = this.cell(x - radius, this.b.minX), c1 = this.cell(x + radius, this.b.minX);
    const r0 = this.cell(y - radius, this.b.minY), r1 = this.cell(y + radius, this.b.minY);
    let best = -1, bestD = radius * radius;
    const maxCells = this.cols * this.cols;
    if ((c1 - c0 + 1) * (r1 - r0 + 1) > maxCells * 4) return this.scan(x, y, radius);
    for (let r = Math.max(r0, 0); r <= Math.min(r1, this.cols); r++) {
      for (let c = Math.max(c0, 0); c <= Math.min(c1, this.cols); c++) {
        const list = this.cells.get(r * this.cols + c);
        if (!list) continue;
        for (const i of list) {
          const dx = this.positions[2 * i] - x, dy = this.positions[2 * i + 1] - y;
          const d = dx * dx + dy * dy;
          if (d <= bestD) { bestD = d; best = i; }
        }
      }
    }
    return best;
  }

  private scan(x: number, y: number, radius: number): number {
    let best = -1, bestD = radius * radius;
    for (let i = 0; i < this.positions.length / 2; i++) {
      const dx = this.positions[2 * i] - x, dy = this.positions[2 * i + 1] - y;
      const d = dx * dx + dy * dy;
      if (d <= bestD) { bestD = d; best = i; }
    }
    return best;
  }
}

// ---------------------------------------------------------------- patches

export interface ProbeInfo {
  probe_hash: string;
  n_images: number;
  image_size: [number, number];
  thumbnail_size: [number, number];
  atlas_grid: number;
  n_atlases: number;
  class_names: string[] | null;
  labels?: number[] | null;
  vocabulary?: { names: string[]; categories: string[] } | null;
}

/**
 * Where a patch lies in the thumbnail atlases: atlas index and source rectangle
 * (atlas pixels) of the box `[x0, y0, x1, y1]` given in input pixels.
 * @example patchSource(probe, 300, [0, 0, 32, 32]).atlas // 1 when the grid is 16
 */
export function patchSource(probe: ProbeInfo, image: number, box: number[] | null):
  { atlas: number; sx: number; sy: number; sw: number; sh: number } | null {
  if (image < 0 || image >= probe.n_images) return null;
  const perAtlas = probe.atlas_grid * probe.atlas_grid;
  const atlas = Math.floor(image / perAtlas);
  if (atlas >= probe.n_atlases) return null;
  const cell = image % perAtlas;
  const [th, tw] = probe.thumbnail_size;
  const cellX = (cell % probe.atlas_grid) * tw, cellY = Math.floor(cell / probe.atlas_grid) * th;
  const [ih, iw] = probe.image_size;
  const b = box && box.length === 4 ? box : [0, 0, iw, ih];
  const sx = clamp((b[0] * tw) / iw, 0, tw), sy = clamp((b[1] * th) / ih, 0, th);
  const ex = clamp((b[2] * tw) / iw, 0, tw), ey = clamp((b[3] * th) / ih, 0, th);
  return { atlas, sx: cellX + sx, sy: cellY + sy, sw: Math.max(1, ex - sx), sh: Math.max(1, ey - sy) };
}

export const clamp = (v: number, lo: number, hi: number): number => Math.min(hi, Math.max(lo, v));

// ---------------------------------------------------------------- metrics

export interface Series {
  tag: string;
  points: [number, number][];
}

/**
 * Group `/metrics` scalars: the plugin's `concepts/<metric>/<source>/<layer>` series by
 * metric, and the run's own scalars (loss, accuracy...) apart.
 */
export function groupMetrics(scalars: Record<string, [number, number][]>, source?: string): {
  concept: Record<string, { layer: string; source: string; points: [number, number][] }[]>;
  training: Series[];
} {
  const concept: Record<string, { layer: string; source: string; points: [number, number][] }[]> = {};
  const training: Series[] = [];
  for (const tag of Object.keys(scalars).sort(naturalCompare)) {
    const parts = tag.split("/");
    if (parts[0] === "concepts" && parts.length >= 4) {
      const [, metric, src] = parts;
      const layer = parts.slice(3).join("/");
      if (source && src !== source && metric !== "interpretable_fraction" && metric !== "invalid_neurons") continue;
      (concept[metric] ||= []).push({ layer, source: src, points: scalars[tag] });
    } else {
      training.push({ tag, points: scalars[tag] });
    }
  }
  return { concept, training };
}

/**
 * The run's own scalars in reading order: losses first, then accuracies, then the rest.
 *
 * @example orderTrainingTags(["test/accuracy", "train/loss"]) // ["train/loss", "test/accuracy"]
 */
export function orderTrainingTags(tags: string[]): string[] {
  const rank = (t: string) => (/loss/i.test(t) ? 0 : /acc/i.test(t) ? 1 : 2);
  return [...new Set(tags)].sort((a, b) => rank(a) - rank(b) || naturalCompare(a, b));
}

/**
 * One whole-model series out of a metric's per-layer series: the logged "all" series when
 * there is one, else the mean over layers at each step (`mean: true`).
 */
export function wholeModel(list: { layer: string; points: [number, number][] }[]): { points: [number, number][]; mean: boolean } {
  const all = list.find((x) => x.layer === "all");
  if (all) return { points: all.points, mean: false };
  if (!list.length) return { points: [], mean: false };
  const sums = new Map<number, [number, number]>();
  for (const x of list) {
    for (const [step, v] of x.points) {
      if (!Number.isFinite(v)) continue;
      const acc = sums.get(step) ?? [0, 0];
      acc[0] += v; acc[1] += 1;
      sums.set(step, acc);
    }
  }
  const points = [...sums].sort((a, b) => a[0] - b[0]).map(([step, [sum, n]]) => [step, sum / n] as [number, number]);
  return { points, mean: list.length > 1 };
}

/** Nice axis ticks (1, 2, 5 x 10^k) covering [lo, hi]. */
export function niceTicks(lo: number, hi: number, count = 4): number[] {
  if (!Number.isFinite(lo) || !Number.isFinite(hi)) return [];
  if (hi === lo) return [lo];
  const raw = (hi - lo) / Math.max(1, count);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) ?? 10 * mag;
  const ticks: number[] = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(Number(t.toPrecision(12)));
  return ticks;
}

/** Compact number for labels: 3 significant digits, k/M suffixes for big ones. */
export function formatNumber(v: number | null | undefined): string {
  if (v === null || v === undefined || !Number.isFinite(v)) return "–";
  const a = Math.abs(v);
  if (a >= 1e6) return `${(v / 1e6).toPrecision(3)}M`;
  if (a >= 1e4) return `${(v / 1e3).toPrecision(3)}k`;
  if (a >= 100 || Number.isInteger(v)) return String(Math.round(v));
  return v.toPrecision(3);
}

// ---------------------------------------------------------------- importance

export interface ImportanceResponse {
  class: number;
  class_name: string | null;
  from_step: number | null;
  to_step: number | null;
  layer: string;
  importance: (number | null)[];
  mean_sensitivity: (number | null)[];
  flagged: number[];
}

/** Neurons ranked by importance (then mean sensitivity, then channel); flagged/NaN last out. */
export function rankImportance(r: ImportanceResponse): { channel: number; importance: number; sensitivity: number }[] {
  const flagged = new Set(r.flagged ?? []);
  const rows: { channel: number; importance: number; sensitivity: number }[] = [];
  r.importance.forEach((v, channel) => {
    if (flagged.has(channel) || v === null || !Number.isFinite(v)) return;
    const s = r.mean_sensitivity[channel];
    rows.push({ channel, importance: v, sensitivity: s === null || s === undefined || !Number.isFinite(s) ? 0 : s });
  });
  rows.sort((a, b) => b.importance - a.importance || b.sensitivity - a.sensitivity || a.channel - b.channel);
  return rows;
}

// ---------------------------------------------------------------- export

export interface TableRow {
  run: string;
  layer: string;
  channel: number;
  id: string;
  step: number | null;
  x: number | null;
  y: number | null;
  label: string;
  category: string;
  similarity: number | null;
  interpretable: boolean | null;
  threshold: number | null;
  importance: number | null;
}

/** RFC 4180 field quoting; also defuses spreadsheet formulas in user strings. */
export function csvField(v: string | number | boolean | null): string {
  if (v === null || (typeof v === "number" && !Number.isFinite(v))) return "";
  let s = String(v);
  if (typeof v === "string" && /^[=+\-@\t\r]/.test(s)) s = `'${s}`;
  return /[",\n\r]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
}

export const CSV_COLUMNS = ["run", "layer", "channel", "id", "step", "x", "y", "label", "category", "similarity",
  "interpretable", "threshold", "importance"] as const;

/** CSV of the neuron table, header {@link CSV_COLUMNS}; `label` stays the best concept, `interpretable` says whether it passes. */
export function toCsv(rows: TableRow[]): string {
  const lines = [CSV_COLUMNS.join(",")];
  for (const r of rows) lines.push(CSV_COLUMNS.map((k) => csvField(r[k])).join(","));
  return lines.join("\n") + "\n";
}

/** Build the table rows of one map (placed and unplaced neurons) of `run` at `step`. */
export function tableRows(points: PointSet, labelsByLayer: Record<string, Labels | undefined>,
  importance: Map<string, number> | null, run = "", step: number | null = null): TableRow[] {
  const row = (layer: string, channel: number, x: number | null, y: number | null): TableRow => {
    const top = topLabel(labelsByLayer[layer], channel);
    const id = neuronId(layer, channel);
    return { run, layer, channel, id, step, x, y, label: top?.concept ?? "", category: top?.category ?? "",
      similarity: top?.similarity ?? null, interpretable: top ? top.interpretable : null, threshold: top?.threshold ?? null,
      importance: importance?.get(id) ?? null };
  };
  const rows: TableRow[] = [];
  for (let i = 0; i < points.channel.length; i++) {
    rows.push(row(points.layers[points.layerIndex[i]], points.channel[i], points.positions[2 * i], points.positions[2 * i + 1]));
  }
  for (const u of points.unplaced) rows.push(row(u.layer, u.channel, null, null));
  return rows;
}

export function escapeXml(s: string): string {
  return s.replace(/[<>&"']/g, (c) => ({ "<": "&lt;", ">": "&gt;", "&": "&amp;", '"': "&quot;", "'": "&apos;" })[c]!);
}

export interface SvgMap {
  width: number;
  height: number;
  title: string;
  /** screen-space circles */
  points: { x: number; y: number; r: number; fill: string; id: string }[];
  anchors: { x: number; y: number; label: string }[];
}

/** Standalone SVG of a map (user strings escaped). */
export function toSvg(m: SvgMap): string {
  const out: string[] = [];
  out.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${m.width}" height="${m.height}" viewBox="0 0 ${m.width} ${m.height}" font-family="Roboto, Arial, sans-serif">`);
  out.push(`<title>${escapeXml(m.title)}</title>`);
  out.push(`<rect width="100%" height="100%" fill="#ffffff"/>`);
  out.push(`<g fill-opacity="0.85">`);
  for (const p of m.points) {
    out.push(`<circle cx="${p.x.toFixed(1)}" cy="${p.y.toFixed(1)}" r="${p.r}" fill="${p.fill}"><title>${escapeXml(p.id)}</title></circle>`);
  }
  out.push(`</g><g font-size="11" fill="#212121">`);
  for (const a of m.anchors) {
    out.push(`<path d="${starPath(a.x, a.y, 6)}" fill="#f57c00" stroke="#ffffff" stroke-width="1"/>`);
    out.push(`<text x="${(a.x + 8).toFixed(1)}" y="${(a.y + 4).toFixed(1)}">${escapeXml(a.label)}</text>`);
  }
  out.push(`</g></svg>`);
  return out.join("\n");
}

/** Five-pointed star polygon vertices around (x, y). */
export function starVertices(x: number, y: number, r: number): number[] {
  const v: number[] = [];
  for (let i = 0; i < 10; i++) {
    const radius = i % 2 ? r * 0.45 : r;
    const a = -Math.PI / 2 + (i * Math.PI) / 5;
    v.push(x + radius * Math.cos(a), y + radius * Math.sin(a));
  }
  return v;
}

function starPath(x: number, y: number, r: number): string {
  const v = starVertices(x, y, r);
  let d = "";
  for (let i = 0; i < v.length; i += 2) d += `${i ? "L" : "M"}${v[i].toFixed(1)} ${v[i + 1].toFixed(1)}`;
  return d + "Z";
}

/**
 * Label timeline: merge consecutive steps with the same concept and the same verdict
 * (interpretable or best guess) into spans; `best` is the span's highest score.
 */
export function labelSpans(labels: { step: number; concept: string | null; similarity: number | null; interpretable?: boolean }[]):
  { from: number; to: number; concept: string | null; best: number | null; interpretable: boolean }[] {
  const spans: { from: number; to: number; concept: string | null; best: number | null; interpretable: boolean }[] = [];
  for (const l of [...labels].sort((a, b) => a.step - b.step)) {
    const ok = l.interpretable ?? l.concept !== null;
    const last = spans[spans.length - 1];
    if (last && last.concept === l.concept && last.interpretable === ok) {
      last.to = l.step;
      if (l.similarity !== null && (last.best === null || l.similarity > last.best)) last.best = l.similarity;
    } else {
      spans.push({ from: l.step, to: l.step, concept: l.concept, best: l.similarity, interpretable: ok });
    }
  }
  return spans;
}

// ---------------------------------------------------------------- step transitions

/**
 * What a step change animates: for every point of `next`, where it starts (its place in
 * `prev`, or its own place when it is new) and whether it fades in; the points of `prev`
 * missing from `next` fade out where they were (appended after next's points).
 */
export interface Transition {
  from: Float32Array;
  /** per point of next + vanishing: 0 stays, 1 appears, 2 vanishes */
  fade: Uint8Array;
  /** positions and indices (into prev) of the vanishing points */
  vanishPositions: Float32Array;
  vanishIndex: Int32Array;
}

export function stepTransition(prev: PointSet, next: PointSet): Transition {
  const n = next.channel.length;
  const from = new Float32Array(n * 2);
  const seen = new Uint8Array(prev.channel.length);
  const fadeNext = new Uint8Array(n);
  for (let i = 0; i < n; i++) {
    const j = prev.index.get(neuronId(next.layers[next.layerIndex[i]], next.channel[i]));
    if (j === undefined) {
      from[2 * i] = next.positions[2 * i];
      from[2 * i + 1] = next.positions[2 * i + 1];
      fadeNext[i] = 1;
    } else {
      from[2 * i] = prev.positions[2 * j];
      from[2 * i + 1] = prev.positions[2 * j + 1];
      seen[j] = 1;
    }
  }
  const gone: number[] = [];
  for (let j = 0; j < seen.length; j++) if (!seen[j]) gone.push(j);
  const vanishPositions = new Float32Array(gone.length * 2);
  gone.forEach((j, k) => { vanishPositions[2 * k] = prev.positions[2 * j]; vanishPositions[2 * k + 1] = prev.positions[2 * j + 1]; });
  const fade = new Uint8Array(n + gone.length);
  fade.set(fadeNext);
  fade.fill(2, n);
  return { from, fade, vanishPositions, vanishIndex: Int32Array.from(gone) };
}

/** Ease in and out (cubic): slow start, slow landing, so the eye can follow a point. */
export function easeInOut(t: number): number {
  const x = clamp(t, 0, 1);
  return x < 0.5 ? 4 * x * x * x : 1 - Math.pow(-2 * x + 2, 3) / 2;
}

// ---------------------------------------------------------------- metric hints

/** Which direction of a concept metric means what (shown under each chart title). */
export const METRIC_HINTS: Record<string, string> = {
  entropy: "higher = concepts more spread out (more diverse)",
  d_anchor: "lower = more diverse concepts",
  speed: "higher = concepts still changing; low = settled",
  interpretable_fraction: "higher = more neurons with a concept",
  invalid_neurons: "lower is better (NaN/Inf activations)",
};

/** Dash pattern of run `i` in line charts: runs are told apart by line style and letter, never by hue. */
export const RUN_DASHES: number[][] = [[], [6, 3], [2, 2], [8, 3, 2, 3], [1, 3], [10, 4]];
/** Neutral ink of run `i` (layers and categories own the hues). */
export const RUN_INKS = ["#212121", "#5c5c5c", "#3a3a3a", "#7a7a7a", "#2b2b2b", "#6a6a6a"];
export const runLetter = (i: number): string => String.fromCharCode(65 + (i % 26));
