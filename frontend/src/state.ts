/**
 * The dashboard's view state: what is persisted (localStorage, for a reload), what is
 * shared (the URL: run(s), layer, space, step, selected neuron), and the defaults of a
 * first visit.  The URL wins over storage, so a shared link opens what its sender saw.
 */
import type { RunsResponse } from "./api";
import type { ColourBy } from "./data";
import type { Tool } from "./scatter";

const STORAGE_KEY = "tb-conceptevo:state:v1";
/** query parameter of TensorBoard's own URL holding the plugin's state (the frame's URL is not shareable) */
export const URL_PARAM = "conceptevo";

export interface Persisted {
  /** undefined = never chosen (defaults apply); [] = the user unticked every run */
  runs?: string[];
  space?: string;
  layer?: string;
  detector?: string;
  colourBy?: ColourBy;
  step?: number;
  tool?: Tool;
  tab?: string;
  anchors?: boolean;
  /** pinned neuron: run and "layer:channel" */
  neuron?: { run: string; id: string };
  speed?: number;
  loop?: boolean;
  trails?: boolean;
  sharedY?: boolean;
  compareStory?: boolean;
}

/** The shareable part of the state as a query string (`run=a&run=b&space=text&step=3&neuron=a~f.3:2`). */
export function encodeUrlState(s: Persisted): string {
  const q = new URLSearchParams();
  for (const r of s.runs ?? []) q.append("run", r);
  if (s.runs && !s.runs.length) q.set("runs", "none");
  if (s.space) q.set("space", s.space);
  if (s.layer) q.set("layer", s.layer);
  if (s.step !== undefined) q.set("step", String(s.step));
  if (s.neuron) q.set("neuron", `${s.neuron.run}~${s.neuron.id}`);
  return q.toString();
}

/** Inverse of {@link encodeUrlState}; malformed fields are ignored (a stale link still opens). */
export function decodeUrlState(text: string): Persisted {
  const q = new URLSearchParams(text.replace(/^[#?]/, ""));
  const out: Persisted = {};
  const runs = q.getAll("run").filter(Boolean);
  if (runs.length) out.runs = runs;
  else if (q.get("runs") === "none") out.runs = [];
  const space = q.get("space"), layer = q.get("layer"), step = q.get("step"), neuron = q.get("neuron");
  if (space) out.space = space;
  if (layer) out.layer = layer;
  if (step !== null && /^-?\d+$/.test(step)) out.step = Number(step);
  if (neuron) {
    const at = neuron.lastIndexOf("~");
    if (at > 0 && /:\d+$/.test(neuron.slice(at + 1))) out.neuron = { run: neuron.slice(0, at), id: neuron.slice(at + 1) };
  }
  return out;
}

/** TensorBoard's window when the frame may touch it (same origin), else null. */
function hostWindow(): Window | null {
  try {
    if (window.parent === window) return null;
    void window.parent.location.href; // throws across origins
    return window.parent;
  } catch {
    return null;
  }
}

export function loadState(): Persisted {
  let stored: Persisted = {};
  try {
    stored = JSON.parse(localStorage.getItem(STORAGE_KEY) || "{}") as Persisted;
  } catch {
    stored = {};
  }
  const host = hostWindow();
  const shared = host ? new URL(host.location.href).searchParams.get(URL_PARAM) : null;
  const fromUrl = decodeUrlState(shared ?? location.hash);
  // A link's neuron belongs to the link: do not bring back a stored one along with its runs.
  if (Object.keys(fromUrl).length) delete stored.neuron;
  return { ...stored, ...fromUrl };
}

export function saveState(state: Persisted): void {
  try {
    localStorage.setItem(STORAGE_KEY, JSON.stringify(state));
  } catch {
    /* storage disabled: the state simply does not survive a reload */
  }
  const encoded = encodeUrlState(state);
  try {
    history.replaceState(history.state, "", `${location.pathname}${location.search}#${encoded}`);
    const host = hostWindow();
    if (host) {
      const url = new URL(host.location.href);
      if (url.searchParams.get(URL_PARAM) !== encoded) {
        url.searchParams.set(URL_PARAM, encoded);
        host.history.replaceState(host.history.state, "", url.toString());
      }
    }
  } catch {
    /* a sandboxed frame: the state stays in storage only */
  }
}

/**
 * Fill in what the state lacks for these runs: the first probe group's runs (up to
 * three), the most informative space (one with anchors, else ConceptEvo's, else the
 * first), colouring by concept category when a detector exists.
 */
export function normaliseState(state: Persisted, info: RunsResponse): void {
  const runs = info.runs;
  const known = (state.runs ?? []).filter((r) => runs.some((x) => x.run === r));
  if (state.runs === undefined || (state.runs.length && !known.length)) {
    // never chosen, or only runs that are gone (a stale link): the first probe group, up to three
    const group = (info.probe_groups ?? []).find((g) => g.runs.includes(runs[0].run));
    state.runs = (group ? group.runs : [runs[0].run]).slice(0, 3);
  } else {
    state.runs = known; // [] stays []: the user unticked every run
  }
  const selected = runs.filter((r) => state.runs!.includes(r.run));
  const pool = selected.length ? selected : runs;
  const spaces = [...new Set(pool.flatMap((r) => Object.keys(r.spaces)))];
  if (!state.space || !spaces.includes(state.space)) {
    const anchored = spaces.find((s) => pool.some((r) => r.anchors.includes(s)));
    state.space = anchored ?? spaces.find((s) => /conceptevo/i.test(s)) ?? spaces[0] ?? "";
  }
  const detectors = [...new Set(pool.flatMap((r) => Object.keys(r.detectors)))];
  if (state.detector === undefined || (state.detector && !detectors.includes(state.detector))) state.detector = detectors[0] ?? "";
  const layers = new Set(pool.flatMap((r) => r.layers));
  if (!state.layer || (state.layer !== "all" && !layers.has(state.layer))) state.layer = "all";
  if (!state.colourBy) state.colourBy = state.detector ? "category" : "layer";
  if (!state.tool) state.tool = "pan";
  if (state.anchors === undefined) state.anchors = true;
  if (!state.speed) state.speed = 1;
  if (state.loop === undefined) state.loop = false;
  if (state.trails === undefined) state.trails = false;
  if (state.sharedY === undefined) state.sharedY = true;
  if (state.neuron && !selected.some((r) => r.run === state.neuron!.run)) delete state.neuron;
}

/** One line under the legend: what a point and its position mean in this space. */
export function spaceCaption(space: string, hasAnchors: boolean): string {
  const stars = hasAnchors ? " Stars are anchor words placed in the same space: near a star means similar, not proof the neuron detects that word." : "";
  if (/conceptevo/i.test(space)) {
    return "Each dot is a neuron; dots close together respond to the same probe images (ConceptEvo's shared embedding, " +
      `aligned across steps, so a moving dot is a changing concept).${stars}`;
  }
  if (hasAnchors || /text|clip/i.test(space)) {
    return `Each dot is a neuron, placed by the text embedding of what it detects.${stars}`;
  }
  return `Each dot is a neuron, placed by space "${space}"; nearby dots behave alike.`;
}
