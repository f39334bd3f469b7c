import { describe, expect, it } from "vitest";
import {
  CATEGORY_PALETTE, PointGrid, bounds, categoryColours, colourPoints, combineLayers, csvField, escapeXml, groupMetrics, keepStepIndex, labelSpans,
  niceTicks, parseMap, parseNeuronId, patchSource, pointInPolygon, rankImportance, searchPoints, selectInPolygon,
  stepAtOrBefore, tableRows, toCsv, toSvg, topLabel, unionSteps, type Labels, type LayerMap, type ProbeInfo,
  describeLabel, easeInOut, isInterpretable, stepTransition,
} from "../src/data";
import { decodeUrlState, encodeUrlState, normaliseState, type Persisted } from "../src/state";
import type { RunInfo, RunsResponse } from "../src/api";

function mapBuffer(layout: number[][], channels: number[], groups: number[]): ArrayBuffer {
  const n = channels.length;
  const buf = new ArrayBuffer(4 + n * 16);
  const v = new DataView(buf);
  v.setUint32(0, n, true);
  layout.forEach(([x, y], i) => { v.setFloat32(4 + 8 * i, x, true); v.setFloat32(8 + 8 * i, y, true); });
  channels.forEach((c, i) => v.setInt32(4 + n * 8 + 4 * i, c, true));
  groups.forEach((g, i) => v.setInt32(4 + n * 12 + 4 * i, g, true));
  return buf;
}

const layerA: LayerMap = parseMap(mapBuffer([[0, 0], [1, 1], [NaN, NaN]], [0, 1, 2], [0, -1, 1]));
const layerB: LayerMap = parseMap(mapBuffer([[2, 0], [3, 3]], [0, 1], [1, 1]));
const labels: Labels = {
  concepts: ["red", "circle", "striped"], categories: ["colour", "shape", "texture"], threshold: 0.1,
  top_concepts: [[0, 1], [2, -1], [-1]], top_similarity: [[0.3, 0.1], [0.2, null], [null]],
};

describe("parseMap", () => {
  it("decodes the binary layout of /map", () => {
    expect(layerA.n).toBe(3);
    expect(Array.from(layerA.channel)).toEqual([0, 1, 2]);
    expect(Array.from(layerA.group)).toEqual([0, -1, 1]);
    expect(layerA.layout[2]).toBe(1);
    expect(Number.isNaN(layerA.layout[4])).toBe(true);
  });
  it("rejects truncated payloads with a clear message", () => {
    expect(() => parseMap(mapBuffer([[0, 0]], [0], [0]).slice(0, 10))).toThrow(/expected 20/);
    expect(() => parseMap(new ArrayBuffer(2))).toThrow(/too short/);
  });
});

describe("combineLayers", () => {
  const points = combineLayers([{ layer: "f.0", map: layerA }, { layer: "f.3", map: layerB }]);
  it("keeps placed neurons and lists NaN ones as unplaced (never at the origin)", () => {
    expect(points.channel.length).toBe(4);
    expect(points.unplaced).toEqual([{ layer: "f.0", channel: 2 }]);
    expect(points.index.get("f.3:1")).toBe(3);
    expect(Array.from(points.positions.slice(6, 8))).toEqual([3, 3]);
    expect(Array.from(points.layerIndex)).toEqual([0, 0, 1, 1]);
  });
  it("colours by layer, by group and by concept category with a legend", () => {
    const byLayer = colourPoints(points, "layer", {});
    expect(byLayer.legend.entries.map((e) => e.label)).toEqual(["f.0", "f.3"]);
    expect(byLayer.rgba.length).toBe(16);
    const byGroup = colourPoints(points, "group", {});
    expect(byGroup.legend.entries.map((e) => e.label)).toEqual(["group 0", "group 1", "no group"]);
    const byCategory = colourPoints(points, "category", { "f.0": labels });
    expect(byCategory.legend.entries.map((e) => e.label)).toEqual(["colour", "texture", "no label"]);
    // neuron f.3:* have no labels -> grey
    expect(Array.from(byCategory.rgba.slice(8, 11))).toEqual([0xb0, 0xb0, 0xb0]);
  });
  it("colours categories in vocabulary order (as the bar chart) and pales neurons below the threshold", () => {
    expect([...categoryColours(["shape", "shape", "colour", "texture"])]).toEqual(
      [["shape", CATEGORY_PALETTE[0]], ["colour", CATEGORY_PALETTE[1]], ["texture", CATEGORY_PALETTE[2]]]);
    const strict = { ...labels, threshold: 0.25 };
    const byCategory = colourPoints(points, "category", { "f.0": strict });
    expect(byCategory.legend.entries.map((e) => e.label)).toEqual(["colour", "below threshold (0.25)", "no label"]);
    expect(byCategory.legend.entries[0].colour).toBe(categoryColours(strict.categories).get("colour"));
    expect(Array.from(byCategory.rgba.slice(4, 7))).toEqual([0xd5, 0xd5, 0xd5]);
  });
  it("searches by id, bare channel, layer prefix and concept word", () => {
    const by = { "f.0": labels };
    expect(searchPoints(points, by, "f.3:1").map((h) => h.id)).toEqual(["f.3:1"]);
    expect(searchPoints(points, by, "1").map((h) => h.id)).toEqual(["f.0:1", "f.3:1"]);
    expect(searchPoints(points, by, "f.3:").map((h) => h.id)).toEqual(["f.3:0", "f.3:1"]);
    expect(searchPoints(points, by, "STRIP").map((h) => h.id)).toEqual(["f.0:1"]);
    const circle = searchPoints(points, by, "circle");
    expect(circle.map((h) => h.id)).toEqual(["f.0:0"]);
    expect(circle[0].rank).toBe(2); // "circle" is f.0:0's second concept, and says so
    expect(circle[0].why).toMatch(/2nd concept/);
    expect(searchPoints(points, by, "  ")).toEqual([]);
  });
  it("builds CSV rows for placed and unplaced neurons", () => {
    const rows = tableRows(points, { "f.0": labels }, new Map([["f.0:0", 0.5]]), "base", 7);
    expect(rows).toHaveLength(5);
    const csv = toCsv(rows).trim().split("\n");
    expect(csv[0]).toBe("run,layer,channel,id,step,x,y,label,category,similarity,interpretable,threshold,importance");
    expect(csv[1]).toMatch(/^base,f\.0,0,f\.0:0,7,0,0,red,colour,0\.3\d*,true,0\.1\d*,0\.5$/);
    expect(csv[5]).toBe("base,f.0,2,f.0:2,7,,,,,,,,");
  });
});

describe("ids and labels", () => {
  it("parses layer:channel ids with dotted layer names", () => {
    expect(parseNeuronId("layer4.1.conv2:511")).toEqual({ layer: "layer4.1.conv2", channel: 511 });
    expect(parseNeuronId("features.3")).toBeNull();
    expect(parseNeuronId("features.3:x")).toBeNull();
  });
  it("gives the top label or null", () => {
    expect(topLabel(labels, 0)).toEqual({ concept: "red", category: "colour", similarity: 0.3, interpretable: true, threshold: 0.1 });
    // the server's verdict wins over the threshold fallback
    expect(topLabel({ ...labels, interpretable: [false, true, null] }, 0)?.interpretable).toBe(false);
    expect(topLabel({ ...labels, threshold: 0.5 }, 0)?.interpretable).toBe(false);
    expect(topLabel(labels, 2)).toBeNull();
    expect(topLabel(undefined, 0)).toBeNull();
  });
  it("merges the label timeline into spans", () => {
    const spans = labelSpans([
      { step: 2, concept: "red", similarity: 0.2 }, { step: 0, concept: "dark", similarity: 0.1 },
      { step: 1, concept: "red", similarity: 0.3 }, { step: 3, concept: null, similarity: null },
    ]);
    expect(spans).toEqual([
      { from: 0, to: 0, concept: "dark", best: 0.1, interpretable: true }, { from: 1, to: 2, concept: "red", best: 0.3, interpretable: true },
      { from: 3, to: 3, concept: null, best: null, interpretable: false },
    ]);
    // same concept, but a best guess at one step: its own greyed span
    const split = labelSpans([{ step: 0, concept: "red", similarity: 0.3, interpretable: true },
      { step: 1, concept: "red", similarity: 0.01, interpretable: false }]);
    expect(split.map((x) => [x.from, x.interpretable])).toEqual([[0, true], [1, false]]);
  });
  it("says when a label is only a best guess, with its score and the threshold", () => {
    expect(isInterpretable(0.0247, 0.04, undefined)).toBe(false);
    expect(isInterpretable(0.05, 0.04, undefined)).toBe(true);
    expect(isInterpretable(0.05, 0.04, false)).toBe(false);
    expect(isInterpretable(null, 0.04, undefined)).toBe(false);
    const weak = describeLabel({ concept: "ring", category: "shape", similarity: 0.0247, interpretable: false, threshold: 0.04 });
    expect(weak).toBe("no interpretable concept; best guess ring (shape), score 0.0247 < τ 0.04");
    expect(describeLabel({ concept: "circle", category: "shape", similarity: 0.124, interpretable: true, threshold: 0.04 }))
      .toBe("circle (shape) · score 0.124 > τ 0.04");
  });
});

describe("steps", () => {
  it("unions and picks the step at or before", () => {
    expect(unionSteps([[0, 10], [5, 10]])).toEqual([0, 5, 10]);
    expect(stepAtOrBefore([0, 5, 10], 7)).toBe(5);
    expect(stepAtOrBefore([5, 10], 2)).toBe(5);
    expect(stepAtOrBefore([], 2)).toBeNull();
  });
  it("keeps the slider on its step when new steps arrive, follows the end when asked", () => {
    expect(keepStepIndex([0, 10, 20], [0, 5, 10, 20, 30], 1, true)).toBe(2);
    expect(keepStepIndex([0, 10, 20], [0, 10, 20, 30], 2, true)).toBe(3);
    expect(keepStepIndex([0, 10, 20], [0, 10, 20, 30], 2, false)).toBe(2);
    expect(keepStepIndex([], [0, 1], 0, false)).toBe(0);
  });
});

describe("geometry", () => {
  it("bounds ignore NaN and pad", () => {
    expect(bounds([0, 0, NaN, NaN, 10, 20], 0)).toEqual({ minX: 0, minY: 0, maxX: 10, maxY: 20 });
    expect(bounds([], 0)).toEqual({ minX: -1, minY: -1, maxX: 1, maxY: 1 });
  });
  it("selects points in a lasso polygon", () => {
    const pos = new Float32Array([0, 0, 1, 1, 5, 5, 0.5, 0.2]);
    expect(pointInPolygon(0.5, 0.5, [0, 0, 1, 0, 1, 1, 0, 1])).toBe(true);
    expect(selectInPolygon(pos, [-0.1, -0.1, 1.2, -0.1, 1.2, 1.2])).toEqual([0, 1, 3]);
  });
  it("finds the nearest point with the grid like a full scan", () => {
    const n = 5000;
    const pos = new Float32Array(n * 2);
    let seed = 7;
    const rnd = () => ((seed = (seed * 16807) % 2147483647) / 2147483647);
    for (let i = 0; i < 2 * n; i++) pos[i] = rnd() * 100;
    const grid = new PointGrid(pos);
    for (let q = 0; q < 200; q++) {
      const x = rnd() * 100, y = rnd() * 100, r = 3;
      let best = -1, bestD = r * r;
      for (let i = 0; i < n; i++) {
        const d = (pos[2 * i] - x) ** 2 + (pos[2 * i + 1] - y) ** 2;
        if (d <= bestD) { bestD = d; best = i; }
      }
      const got = grid.nearest(x, y, r);
      if (best === -1) expect(got).toBe(-1);
      else expect((pos[2 * got] - x) ** 2 + (pos[2 * got + 1] - y) ** 2).toBeCloseTo(bestD, 6);
    }
  });
});

describe("patches", () => {
  const probe: ProbeInfo = { probe_hash: "h", n_images: 300, image_size: [64, 64], thumbnail_size: [32, 32], atlas_grid: 16,
    n_atlases: 2, class_names: null };
  it("maps an input-pixel box to the atlas cell in thumbnail pixels", () => {
    expect(patchSource(probe, 17, [0, 0, 32, 32])).toEqual({ atlas: 0, sx: 32, sy: 32, sw: 16, sh: 16 });
    expect(patchSource(probe, 256, [32, 16, 64, 48])).toEqual({ atlas: 1, sx: 16, sy: 8, sw: 16, sh: 16 });
    expect(patchSource(probe, 5, null)).toEqual({ atlas: 0, sx: 160, sy: 0, sw: 32, sh: 32 });
    expect(patchSource(probe, 300, [0, 0, 1, 1])).toBeNull();
    expect(patchSource(probe, -1, [0, 0, 1, 1])).toBeNull();
  });
});

describe("metrics and importance", () => {
  it("groups concept scalars by metric and keeps training scalars apart", () => {
    const g = groupMetrics({
      "concepts/entropy/text/f.0": [[0, 1]], "concepts/entropy/conceptevo/f.0": [[0, 2]],
      "concepts/interpretable_fraction/netdissect/f.0": [[0, 0.2]], "train/loss": [[0, 2.3]],
    }, "conceptevo");
    expect(g.concept.entropy).toEqual([{ layer: "f.0", source: "conceptevo", points: [[0, 2]] }]);
    expect(g.concept.interpretable_fraction).toHaveLength(1);
    expect(g.training.map((s) => s.tag)).toEqual(["train/loss"]);
  });
  it("ranks importance, dropping flagged and NaN neurons", () => {
    const ranked = rankImportance({ class: 0, class_name: null, from_step: 0, to_step: 1, layer: "f",
      importance: [0.2, 0.9, null, 0.9, 0.5], mean_sensitivity: [0, 0.1, 0, 0.3, 0], flagged: [4] });
    expect(ranked.map((r) => r.channel)).toEqual([3, 1, 0]);
  });
  it("makes nice ticks", () => {
    expect(niceTicks(0, 1, 4)).toEqual([0, 0.5, 1]);
    expect(niceTicks(0, 1, 5)).toEqual([0, 0.2, 0.4, 0.6, 0.8, 1]);
    expect(niceTicks(3, 3)).toEqual([3]);
  });
});

describe("export safety", () => {
  it("quotes CSV fields and defuses formulas", () => {
    expect(csvField('a,"b"')).toBe('"a,""b"""');
    expect(csvField("=cmd()")).toBe("'=cmd()");
    expect(csvField(NaN)).toBe("");
  });
  it("escapes user strings in SVG", () => {
    const svg = toSvg({ width: 10, height: 10, title: "<run>", points: [{ x: 1, y: 2, r: 3, fill: "#000000", id: "a&b" }],
      anchors: [{ x: 1, y: 1, label: "<script>" }] });
    expect(svg).not.toContain("<script>");
    expect(svg).toContain("&lt;script&gt;");
    expect(svg).toContain("a&amp;b");
    expect(escapeXml(`"'`)).toBe("&quot;&apos;");
  });
});

describe("search ranking", () => {
  it("puts interpretable best-concept matches first, then by score, and marks below-threshold ones", () => {
    const pts = combineLayers([{ layer: "L", map: parseMap(mapBuffer([[0, 0], [1, 0], [2, 0], [3, 0]], [0, 1, 2, 3], [0, 0, 0, 0])) }]);
    const lab: Labels = { concepts: ["circle", "red"], categories: ["shape", "colour"], threshold: 0.04,
      top_concepts: [[0], [1, 0], [0], [0]], top_similarity: [[0.05], [0.3, 0.2], [0.02], [0.124]] };
    const hits = searchPoints(pts, { L: lab }, "circle");
    expect(hits.map((h) => h.id)).toEqual(["L:3", "L:0", "L:1", "L:2"]);
    expect(hits.map((h) => h.rank)).toEqual([1, 1, 2, 1]);
    expect(hits[3].interpretable).toBe(false);
    expect(hits[3].why).toMatch(/< τ/);
  });
});

describe("step transitions", () => {
  it("matches neurons by id: movers start at their old place, new ones fade in, gone ones fade out", () => {
    const prev = combineLayers([{ layer: "L", map: parseMap(mapBuffer([[0, 0], [1, 1], [5, 5]], [0, 1, 2], [0, 0, 0])) }]);
    const next = combineLayers([{ layer: "L", map: parseMap(mapBuffer([[2, 2], [3, 3], [9, 9]], [1, 0, 7], [0, 0, 0])) }]);
    const t = stepTransition(prev, next);
    expect(Array.from(t.from)).toEqual([1, 1, 0, 0, 9, 9]);
    expect(Array.from(t.fade)).toEqual([0, 0, 1, 2]);
    expect(Array.from(t.vanishPositions)).toEqual([5, 5]);
    expect(Array.from(t.vanishIndex)).toEqual([2]);
  });
  it("eases in and out between 0 and 1", () => {
    expect(easeInOut(0)).toBe(0);
    expect(easeInOut(0.5)).toBe(0.5);
    expect(easeInOut(1)).toBe(1);
    expect(easeInOut(0.25)).toBeLessThan(0.25);
    expect(easeInOut(2)).toBe(1);
  });
});

describe("view state", () => {
  it("round-trips runs, layer, space, step and neuron through the URL", () => {
    const s: Persisted = { runs: ["base", "lr too high"], space: "text", layer: "features.3", step: 12, neuron: { run: "base", id: "features.3:5" } };
    expect(decodeUrlState(encodeUrlState(s))).toEqual(s);
    expect(decodeUrlState(encodeUrlState({ runs: [] }))).toEqual({ runs: [] });
    expect(decodeUrlState("#step=x&neuron=bad")).toEqual({});
  });
  const run = (name: string, anchors: string[]): RunInfo => ({ run: name, probe_hash: "p", layers: ["a"], steps: [0],
    spaces: { conceptevo: { a: [0] }, text: { a: [0] } }, detectors: { clip: { a: [0] } }, importance: [], revert: [], anchors });
  const info: RunsResponse = { runs: [run("r1", ["text"]), run("r2", ["text"])], probe_groups: [{ probe_hash: "p", runs: ["r1", "r2"] }],
    comparable: true, warnings: [] };
  it("opens on the space with anchors, coloured by category, and keeps an empty run choice empty", () => {
    const s: Persisted = {};
    normaliseState(s, info);
    expect(s.runs).toEqual(["r1", "r2"]);
    expect(s.space).toBe("text");
    expect(s.colourBy).toBe("category");
    const none: Persisted = { runs: [] };
    normaliseState(none, info);
    expect(none.runs).toEqual([]);
    const stale: Persisted = { runs: ["deleted"], neuron: { run: "deleted", id: "a:1" } };
    normaliseState(stale, info);
    expect(stale.runs).toEqual(["r1", "r2"]);
    expect(stale.neuron).toBeUndefined();
  });
});
