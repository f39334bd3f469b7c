/**
 * Loading and drawing the maps: one panel per selected run, each step's layouts and
 * labels fetched together (a step lands in its final colours), the glide from the old
 * step, trails, anchors, the shared fit, and warming the cache with neighbouring steps.
 */
import type { App } from "./app";
import type { RunInfo } from "./api";
import { Bounds, bounds, colourPoints, combineLayers, stepAtOrBefore, stepTransition, unionBounds } from "./data";
import { status } from "./dom";
import { Panel } from "./panel";
import type { ScatterView } from "./scatter";
import { renderLegend, renderSidebar } from "./sidebar";

/** time per step at speed 1 while playing; a transition takes at most 45 % of it */
export const PLAY_MS = 1200;

export class Maps {
  private firstDrawMarked = false;
  /** refit once every panel has loaded (the first panel fits alone to draw at once) */
  private fullFitPending = true;

  constructor(private readonly app: App) {}

  requestMaps(run: RunInfo, step: number): void {
    const space = this.app.state.space ?? "";
    for (const layer of this.app.layersOf(run)) {
      const s = stepAtOrBefore(run.spaces[space]?.[layer] ?? [], step);
      if (s !== null) this.app.api.map(run.run, space, layer, s).catch(() => undefined);
    }
  }

  /** Length of a step transition now: shorter when playing fast, none when the user prefers reduced motion. */
  transitionLength(): number {
    if (window.matchMedia?.("(prefers-reduced-motion: reduce)").matches) return 0;
    const playing = this.app.playing ? (0.45 * PLAY_MS) / (this.app.state.speed || 1) : Infinity;
    return Math.min(this.app.transitionMs, playing);
  }

  rebuildPanels(): void {
    for (const p of this.app.panels) p.destroy();
    this.app.panels = [];
    const runs = this.app.selectedRuns();
    this.app.mapsBox.dataset.count = String(runs.length);
    this.app.mapsBox.replaceChildren();
    if (!runs.length) {
      this.app.mapsBox.append(status("empty", "No run selected: tick a run in the sidebar to see its concept map."));
      renderLegend(this.app, null);
      return;
    }
    for (const run of runs) {
      const panel: Panel = new Panel(run.run, this.app.runIndex(run.run), this.app.camera, {
        hover: (i, x, y) => this.app.detail.onHover(panel, i, x, y),
        click: (i) => this.app.detail.onClick(panel, i),
        select: (indices) => this.app.onSelect(panel, indices),
        key: (e) => this.app.onMapKey(e),
      }, this.app.forceCanvas);
      panel.view.tool = this.app.state.tool ?? "pan";
      panel.view.overlay.showAnchors = !!this.app.state.anchors;
      if (!this.firstDrawMarked) {
        panel.view.onFirstPoints = () => {
          if (this.firstDrawMarked) return;
          this.firstDrawMarked = true;
          performance.mark("conceptevo-first-draw");
          document.body.dataset.conceptevoReady = "true";
        };
      }
      this.app.panels.push(panel);
      this.app.mapsBox.append(panel.element);
    }
    this.app.camera.fitted = false;
    this.fullFitPending = true;
    for (const p of this.app.panels) p.anchorsLoading = this.loadAnchors(p);
    void this.loadAllPanels(false);
  }

  reloadAll(refit: boolean): void {
    if (refit) { this.app.camera.fitted = false; this.fullFitPending = true; }
    for (const p of this.app.panels) { p.points = null; p.history = []; p.anchors = null; p.anchorsLoading = this.loadAnchors(p); }
    renderSidebar(this.app);
    void this.loadAllPanels(false);
  }

  private async loadAnchors(panel: Panel): Promise<void> {
    const run = this.app.runInfo(panel.run);
    const space = this.app.state.space ?? "";
    panel.view.overlay.anchors = [];
    if (!run || !run.anchors.includes(space)) { panel.view.requestDraw(); return; }
    try {
      const a = await this.app.api.anchors(panel.run, space);
      panel.anchors = a;
      panel.view.overlay.anchors = a.words.map((w, i) => ({ label: w, kind: a.kind[i] ?? "anchor",
        x: a.layout[i]?.[0] ?? NaN, y: a.layout[i]?.[1] ?? NaN })).filter((p) => Number.isFinite(p.x) && Number.isFinite(p.y));
      panel.view.requestDraw();
    } catch {
      panel.view.overlay.anchors = []; // anchors are decoration: the map stands without them
    }
  }

  async loadAllPanels(animate = false): Promise<void> {
    const step = this.app.step;
    await Promise.all(this.app.panels.map((p) => this.loadPanel(p, step, animate)));
    this.afterLoad();
  }

  private async loadPanel(panel: Panel, step: number | null, animate: boolean): Promise<void> {
    const version = ++panel.version;
    const run = this.app.runInfo(panel.run);
    const space = this.app.state.space ?? "";
    if (!run) return;
    const layers = this.app.layersOf(run);
    if (step === null || !layers.length) {
      panel.view.setData(new Float32Array(0), new Uint8Array(0));
      panel.points = null;
      panel.setStatus(status("empty", space ? `Run ${panel.run} has no layout in space "${space}" yet.` : `Run ${panel.run} has no concept map yet.`));
      panel.meta.textContent = "";
      return;
    }
    const pending = setTimeout(() => { if (panel.version === version) panel.setStatus(status("loading", "Loading map…")); }, 150);
    try {
      const wanted = layers.map((layer) => ({ layer, step: stepAtOrBefore(run.spaces[space]?.[layer] ?? [], step) }));
      const detector = this.app.state.detector;
      // Labels travel with the map so a step lands in its final colours (no recolouring flash mid-glide).
      const labelsP = detector ? this.loadLabels(panel, detector, step, layers) : Promise.resolve({});
      const maps = await Promise.all(wanted.filter((w) => w.step !== null).map(async (w) => ({
        layer: w.layer, map: await this.app.api.map(panel.run, space, w.layer, w.step!) })));
      if (version !== panel.version) return;
      if (!this.firstDrawMarked) performance.mark("conceptevo-maps");
      const points = combineLayers(maps);
      const first = !panel.points;
      const labels = first && this.app.state.colourBy !== "category" ? {} : await labelsP;
      if (version !== panel.version) return;
      const prev = panel.points, prevColours = panel.view.colourBytes;
      const shown = Math.max(...wanted.map((w) => w.step ?? -1));
      const moved = panel.shownStep !== shown;
      if (moved) panel.remember(points); // trails keep one entry per step shown
      panel.points = points;
      panel.labels = labels;
      panel.bounds = bounds(points.positions);
      panel.shownStep = shown;
      panel.element.dataset.step = String(shown);
      panel.element.dataset.points = String(points.channel.length);
      panel.meta.textContent = `${shown === step ? "" : `showing step ${shown} · `}${points.channel.length.toLocaleString()} neurons` +
        (points.unplaced.length ? ` · ${points.unplaced.length} unplaced` : "");
      panel.renderUnplaced();
      const duration = animate && prev && moved ? this.transitionLength() : 0;
      this.colourPanel(panel, duration ? { t: stepTransition(prev!, points), colours: prevColours, duration } : undefined);
      // Announced after this frame's draw (rAF callbacks run in order): benchmarks and tests listen.
      requestAnimationFrame(() => document.dispatchEvent(new CustomEvent("conceptevo:drawn", { detail: { run: panel.run, step: shown } })));
      panel.setStatus(null);
      if (!this.app.camera.fitted) {
        await panel.anchorsLoading;
        if (version !== panel.version) return;
        this.fit(false);
      }
      this.app.applyHighlights(panel);
      if (first) {
        const l = await labelsP;
        if (version !== panel.version) return;
        panel.labels = l;
        if (this.app.state.colourBy === "category") this.colourPanel(panel);
      }
      if (this.app.searchInput.value.trim() && panel === this.app.panels[0]) this.app.detail.runSearch();
      this.prefetch(panel, run);
    } catch (e) {
      if (version !== panel.version) return;
      panel.setStatus(status("error", (e as Error).message, { label: "Retry", run: () => void this.loadPanel(panel, this.app.step, false) }));
    } finally {
      clearTimeout(pending);
    }
  }

  /** Warm the cache with the neighbouring steps so the slider and play move without waiting. */
  private prefetch(panel: Panel, run: RunInfo): void {
    const detector = this.app.state.detector;
    const app = this.app;
    for (const neighbour of [app.steps[app.stepIndex + 1], app.steps[app.stepIndex - 1], app.state.loop ? app.steps[0] : undefined]) {
      if (neighbour === undefined) continue;
      this.requestMaps(run, neighbour);
      // labels too: a step lands in its final colours, so its labels are on the critical path
      if (detector) void this.loadLabels(panel, detector, neighbour, app.layersOf(run));
    }
  }

  private async loadLabels(panel: Panel, detector: string, step: number, layers: string[]): Promise<Panel["labels"]> {
    const run = this.app.runInfo(panel.run)!;
    const entries = await Promise.all(layers.map(async (layer) => {
      const s = stepAtOrBefore(run.detectors[detector]?.[layer] ?? [], step);
      if (s === null) return [layer, undefined] as const;
      try {
        return [layer, await this.app.api.labels(panel.run, detector, layer, s)] as const;
      } catch {
        return [layer, undefined] as const;
      }
    }));
    return Object.fromEntries(entries);
  }

  colourPanel(panel: Panel, transition?: Parameters<ScatterView["setData"]>[2]): void {
    if (!panel.points) return;
    const { rgba, legend } = colourPoints(panel.points, this.app.state.colourBy ?? "layer", panel.labels);
    panel.view.setData(panel.points.positions, rgba, transition);
    panel.view.overlay.trails = this.app.state.trails ? panel.trails() : null;
    if (panel === this.app.panels[0]) renderLegend(this.app, legend);
  }

  applyTrails(): void {
    for (const p of this.app.panels) { p.view.overlay.trails = this.app.state.trails ? p.trails() : null; p.view.requestDraw(); }
  }

  recolourAll(): void {
    for (const p of this.app.panels) { this.colourPanel(p); this.app.applyHighlights(p); }
  }

  /** Frame the neurons (and the anchor stars too with `withAnchors`). */
  fit(withAnchors: boolean): void {
    const all = this.app.panels.map((p) => p.bounds).filter((b): b is Bounds => !!b);
    if (withAnchors || !all.length) {
      for (const p of this.app.panels) {
        if (p.view.overlay.showAnchors && p.view.overlay.anchors.length) all.push(bounds(p.view.overlay.anchors.flatMap((a) => [a.x, a.y]), 0.08));
      }
    }
    if (!all.length || !this.app.panels.length) return;
    for (const p of this.app.panels) p.view.resize();
    const { width, height } = this.app.panels[0].view.size;
    this.app.camera.fit(unionBounds(all), Math.max(width, 50), Math.max(height, 50));
  }

  private afterLoad(): void {
    if (this.fullFitPending && this.app.panels.every((p) => p.points)) {
      this.fullFitPending = false;
      this.fit(false);
    }
    this.app.detail.followStep();
    this.app.tabs.renderContent();
  }

}
