/**
 * One run's map in the small multiples: its scatter view (sharing the camera of the
 * others), title with the run's letter (runs are told apart by letter and line style,
 * never by the hues that mean layers or categories), status and unplaced list, and the
 * data it shows now plus the few steps before (for transitions and trails).
 */
import type { AnchorsResponse } from "./api";
import { Bounds, Labels, PointSet, neuronId, runLetter } from "./data";
import { clear, h } from "./dom";
import { Camera, ScatterCallbacks, ScatterView } from "./scatter";

/** How many earlier steps a trail shows. */
export const TRAIL_STEPS = 3;

export class Panel {
  readonly element: HTMLElement;
  readonly view: ScatterView;
  readonly statusBox: HTMLElement;
  readonly meta: HTMLElement;
  readonly unplacedBox: HTMLElement;
  points: PointSet | null = null;
  labels: Record<string, Labels | undefined> = {};
  anchors: AnchorsResponse | null = null;
  shownStep: number | null = null;
  version = 0;
  bounds: Bounds | null = null;
  /** the point sets of the last few steps shown (oldest first), for trails */
  history: PointSet[] = [];
  /** anchors of the current space (never rejects): awaited before the first fit */
  anchorsLoading: Promise<void> = Promise.resolve();

  constructor(readonly run: string, readonly index: number, camera: Camera, callbacks: ScatterCallbacks, forceCanvas: boolean) {
    this.view = new ScatterView(camera, callbacks, forceCanvas);
    this.view.setLabel(`concept map of run ${run} (${runLetter(index)}): arrow keys step through training, Home/End jump, ` +
      "Enter opens the hovered neuron's story, Esc closes it");
    this.statusBox = h("div", { class: "ce-panel-status" });
    this.meta = h("span", { class: "ce-panel-meta" });
    this.unplacedBox = h("div", { class: "ce-unplaced" });
    const body = h("div", { class: "ce-panel-body" }, [this.view.element, this.statusBox]);
    this.element = h("section", { class: "ce-panel", attrs: { "data-run": run, "data-run-index": String(index % 6),
      "aria-label": `concept map of run ${run}` } }, [
      h("div", { class: "ce-panel-head" }, [
        h("span", { class: "ce-run-letter", text: runLetter(index), attrs: { "aria-hidden": "true" } }),
        h("span", { class: "ce-panel-title", text: run, title: run }),
        this.meta,
      ]),
      body,
      this.unplacedBox,
    ]);
  }

  setStatus(node: HTMLElement | null): void {
    this.statusBox.replaceChildren(...(node ? [node] : []));
  }

  /** Remember a shown point set (a new step) for trails; at most TRAIL_STEPS earlier ones are kept. */
  remember(points: PointSet): void {
    if (this.points && this.points !== points) this.history.push(this.points);
    while (this.history.length > TRAIL_STEPS) this.history.shift();
  }

  /** The kept steps' positions in the order of the current points (NaN where a neuron was absent). */
  trails(): Float32Array[] {
    const now = this.points;
    if (!now) return [];
    return this.history.map((old) => {
      const out = new Float32Array(now.channel.length * 2).fill(NaN);
      for (let i = 0; i < now.channel.length; i++) {
        const j = old.index.get(neuronId(now.layers[now.layerIndex[i]], now.channel[i]));
        if (j !== undefined) { out[2 * i] = old.positions[2 * j]; out[2 * i + 1] = old.positions[2 * j + 1]; }
      }
      return out;
    });
  }

  renderUnplaced(): void {
    const u = this.points?.unplaced ?? [];
    clear(this.unplacedBox);
    if (!u.length) return;
    const list = h("ul", {}, u.slice(0, 500).map((n) => h("li", { text: neuronId(n.layer, n.channel) })));
    this.unplacedBox.append(h("details", {}, [
      h("summary", { text: `${u.length} neuron${u.length === 1 ? "" : "s"} could not be placed (not drawn)` }), list,
    ]));
  }

  destroy(): void {
    this.view.destroy();
    this.element.remove();
  }
}
