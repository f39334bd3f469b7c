/**
 * Client of the plugin's HTTP API (docs/http_api.md).  Routes are resolved against
 * the plugin's base URL `/data/plugin/conceptevo/`, i.e. the directory above the
 * `static/index.js` module, so the module works both in TensorBoard's iframe (whose
 * document base is that directory) and in any page that imports it.
 */
import { LayerMap, Labels, ProbeInfo, ImportanceResponse, parseMap } from "./data";

export interface RunInfo {
  run: string;
  probe_hash: string;
  layers: string[];
  steps: number[];
  spaces: Record<string, Record<string, number[]>>;
  detectors: Record<string, Record<string, number[]>>;
  importance: { class: number; layer: string; steps: number[] }[];
  revert: { class: number; steps: number[] }[];
  anchors: string[];
}

export interface RunsResponse {
  runs: RunInfo[];
  probe_groups: { probe_hash: string; runs: string[] }[];
  comparable: boolean;
  warnings: string[];
}

export interface NeuronStory {
  id: string;
  step: number;
  invalid: boolean;
  stimuli: { image: number; activation: number | null; box: number[] }[];
  trajectory?: { step: number; x: number | null; y: number | null }[];
  /** `interpretable`: the label passes its detector's bar; `threshold`: that bar (newer servers) */
  labels?: { step: number; concept: string | null; category: string | null; similarity: number | null; interpretable?: boolean;
    threshold?: number | null }[];
  stimuli_by_step?: { step: number; images: number[]; boxes: number[][] }[];
}

export interface AnchorsResponse {
  words: string[];
  kind: string[];
  layout: [number | null, number | null][];
}

export interface RevertResponse {
  bins: string[];
  accuracy_change: number[];
  accuracy_change_std: number[];
  random_change: number;
  random_change_std: number;
  base_accuracy: number;
  layers: string[];
  from_step?: number | null;
  to_step?: number | null;
}

export interface CategoriesResponse {
  layers: string[];
  categories: string[];
  counts: Record<string, Record<string, number>>;
}

/** An HTTP or decoding failure with the server's own explanation when it gave one. */
export class ApiError extends Error {
  constructor(message: string, readonly status: number) {
    super(message);
  }
}

type Params = Record<string, string | number | undefined>;

export function pluginBase(moduleUrl: string): URL {
  // .../conceptevo/static/index.js -> .../conceptevo/
  return new URL("../", moduleUrl);
}

export class Api {
  /** Per-step data never changes once written: cache it (bounded) in memory. */
  private cache = new Map<string, Promise<unknown>>();
  private readonly cacheLimit = 400;

  constructor(readonly base: URL) {}

  url(route: string, params: Params = {}): string {
    const u = new URL(route, this.base);
    for (const [k, v] of Object.entries(params)) if (v !== undefined) u.searchParams.set(k, String(v));
    return u.toString();
  }

  private async request(route: string, params: Params): Promise<Response> {
    const url = this.url(route, params);
    let response: Response;
    try {
      response = await fetch(url, { credentials: "same-origin" });
    } catch (e) {
      throw new ApiError(`cannot reach TensorBoard (${route}): ${(e as Error).message}`, 0);
    }
    if (!response.ok) {
      let message = `${route}: HTTP ${response.status}`;
      try {
        const body = await response.json();
        if (body && typeof body.error === "string") message = body.error;
      } catch {
        /* not JSON: keep the status line */
      }
      throw new ApiError(message, response.status);
    }
    return response;
  }

  private cached<T>(key: string, load: () => Promise<T>): Promise<T> {
    const hit = this.cache.get(key);
    if (hit) {
      // refresh LRU position
      this.cache.delete(key);
      this.cache.set(key, hit);
      return hit as Promise<T>;
    }
    const p = load();
    this.cache.set(key, p);
    p.catch(() => this.cache.delete(key));
    while (this.cache.size > this.cacheLimit) this.cache.delete(this.cache.keys().next().value!);
    return p;
  }

  json<T>(route: string, params: Params = {}, cache = true): Promise<T> {
    const load = async () => (await this.request(route, params)).json() as Promise<T>;
    return cache ? this.cached(this.url(route, params), load) : load();
  }

  runs(): Promise<RunsResponse> {
    return this.json<RunsResponse>("runs", {}, false);
  }

  probe(run: string): Promise<ProbeInfo> {
    return this.json<ProbeInfo>("probe", { run });
  }

  map(run: string, space: string, layer: string, step: number): Promise<LayerMap> {
    const params = { run, space, layer, step };
    return this.cached(this.url("map", params), async () => parseMap(await (await this.request("map", params)).arrayBuffer()));
  }

  labels(run: string, detector: string, layer: string, step: number): Promise<Labels> {
    return this.json<Labels>("labels", { run, detector, layer, step });
  }

  neuron(run: string, layer: string, channel: number, step: number, space?: string, detector?: string): Promise<NeuronStory> {
    return this.json<NeuronStory>("neuron", { run, layer, channel, step, space, detector });
  }

  metrics(run: string): Promise<{ scalars: Record<string, [number, number][]> }> {
    return this.json("metrics", { run }, false);
  }

  categories(run: string, detector: string, step: number): Promise<CategoriesResponse> {
    return this.json("categories", { run, detector, step });
  }

  anchors(run: string, space: string): Promise<AnchorsResponse> {
    return this.json("anchors", { run, space });
  }

  importance(run: string, cls: number, layer: string, step: number): Promise<ImportanceResponse> {
    return this.json("importance", { run, class: cls, layer, step });
  }

  revert(run: string, cls: number, step: number): Promise<RevertResponse> {
    return this.json("revert", { run, class: cls, step });
  }

  /** A thumbnail atlas as a decoded image (cached; same-origin so canvases stay clean). */
  atlas(run: string, index: number): Promise<HTMLImageElement> {
    const url = this.url("atlas", { run, index });
    return this.cached(`img:${url}`, () => new Promise<HTMLImageElement>((resolve, reject) => {
      const img = new Image();
      img.decoding = "async";
      img.onload = () => resolve(img);
      img.onerror = () => reject(new ApiError(`cannot load thumbnail atlas ${index} of run ${run}`, 0));
      img.src = url;
    }));
  }
}
