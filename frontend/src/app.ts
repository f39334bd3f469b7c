/**
 * The Concept Evolution dashboard: sidebar (runs, space, layer, detector, colouring,
 * tools, search, export, legend), step bar, one aligned map per selected run (small
 * multiples sharing one camera, hover and selection), tabs for metrics, categories and
 * importance, and a detail pane with the hovered / clicked neuron's story.
 */
import { Api, ApiError, AnchorsResponse, NeuronStory, RunInfo, RunsResponse } from "./api";
import { LineSeries, groupedBarChart, lineChart, revertChart } from "./charts";
import {
  Bounds, ColourBy, Labels, PALETTE, PointSet, ProbeInfo, bounds, colourPoints, combineLayers, formatNumber,
  groupMetrics, keepStepIndex, orderTrainingTags, wholeModel, labelSpans, naturalCompare, neuronId, parseNeuronId, patchSource, rankImportance,
  searchPoints, stepAtOrBefore, tableRows, toCsv, toSvg, topLabel, unionBounds, unionSteps,
} from "./data";
import { clear, download, h, select, status } from "./dom";
import { Camera, ScatterView, Tool, pointSize } from "./scatter";

const STORAGE_KEY = "tb-conceptevo:state:v1";
const POLL_MS = 5000;
const PLAY_MS = 900;

interface Persisted {
  runs?: string[];
  space?: string;
  layer?: string;
  detector?: string;
  colourBy?: ColourBy;
  step?: number;
  tool?: Tool;
  tab?: string;
  anchors?: boolean;
}

interface Neuron {
  layer: string;
  channel: number;
}

/** One run's map. */
class Panel {
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
  /** anchors of the current space (never rejects): awaited before the first fit */
  anchorsLoading: Promise<void> = Promise.resolve();

  constructor(readonly run: string, readonly colour: string, camera: Camera, app: App) {
    this.view = new ScatterView(camera, {
      hover: (i, x, y) => app.onHover(this, i, x, y),
      click: (i) => app.onClick(this, i),
      select: (indices) => app.onSelect(this, indices),
    }, app.forceCanvas);
    this.statusBox = h("div", { class: "ce-panel-status" });
    this.meta = h("span", { class: "ce-panel-meta" });
    this.unplacedBox = h("div", { class: "ce-unplaced" });
    const body = h("div", { class: "ce-panel-body" }, [this.view.element, this.statusBox]);
    this.element = h("section", { class: "ce-panel", attrs: { "data-run": run, "aria-label": `concept map of run ${run}` } }, [
      h("div", { class: "ce-panel-head" }, [
        h("span", { class: "ce-swatch-dot" }),
        h("span", { class: "ce-panel-title", text: run, title: run }),
        this.meta,
      ]),
      body,
      this.unplacedBox,
    ]);
    const dot = this.element.querySelector<HTMLElement>(".ce-swatch-dot")!;
    dot.style.cssText = "";
    dot.style.width = "10px";
    dot.style.height = "10px";
    dot.style.borderRadius = "50%";
    dot.style.background = colour;
    dot.style.flex = "none";
    dot.style.alignSelf = "center";
  }

  setStatus(node: HTMLElement | null): void {
    this.statusBox.replaceChildren(...(node ? [node] : []));
  }

  destroy(): void {
    this.view.destroy();
    this.element.remove();
  }
}

export class App {
  readonly api: Api;
  readonly forceCanvas: boolean;
  private root: HTMLElement;
  private runsInfo: RunsResponse | null = null;
  private state: Persisted;
  private camera = new Camera();
  panels: Panel[] = [];
  private steps: number[] = [];
  private stepIndex = 0;
  private playing = 0;
  private pollTimer = 0;
  private probes = new Map<string, Promise<ProbeInfo>>();
  private hovered: Neuron | null = null;
  private pinned: (Neuron & { run: string }) | null = null;
  private selection: Set<string> | null = null;
  private importanceByRun = new Map<string, Map<string, number>>();
  private hoverSeq = 0;
  private pinSeq = 0;
  private firstDrawMarked = false;
  /** refit once every panel has loaded (the first panel fits alone to draw at once) */
  private fullFitPending = true;

  // persistent DOM pieces
  private sidebar = h("aside", { class: "ce-sidebar", attrs: { "aria-label": "settings" } });
  private main = h("main", { class: "ce-main" });
  private detail = h("aside", { class: "ce-detail", attrs: { "aria-label": "neuron details", "aria-live": "polite" } });
  private mapsBox = h("div", { class: "ce-maps" });
  private bannerBox = h("div");
  private slider = h("input", { class: "ce-slider", attrs: { type: "range", min: "0", max: "0", step: "1", "aria-label": "training step" } });
  private stepLabel = h("span", { class: "ce-step-label", attrs: { "aria-live": "polite" } });
  private playButton = h("button", { class: "ce-play", attrs: { "aria-label": "play", title: "Play / pause (space)" } });
  private liveBadge = h("span", { class: "ce-live", text: "live", attrs: { title: "Checks for new steps and runs every 5 s" } });
  private legendBox = h("div", { class: "ce-legend" });
  private hitsBox = h("ul", { class: "ce-hits", attrs: { "aria-label": "search results" } });
  private searchInput = h("input", { class: "ce-search", attrs: { type: "search", placeholder: "neuron id or concept word", "aria-label": "search neurons" } });
  private controls = h("div");
  private tooltip = h("div", { class: "ce-tooltip ce-hidden", attrs: { role: "tooltip" } });
  private tabsBox = h("section", { class: "ce-tabs" });
  private tabPanel = h("div", { class: "ce-tabpanel" });

  constructor(root: HTMLElement, api: Api, options: { forceCanvas?: boolean } = {}) {
    this.root = root;
    this.api = api;
    this.forceCanvas = !!options.forceCanvas;
    this.state = this.load();
    (window as unknown as { __conceptevo: unknown }).__conceptevo = this.debugHooks();
  }

  // ------------------------------------------------------------------ persistence
  private load(): Persisted {
    try {
      return JSON.parse(localStorage.getItem(STORAGE_KEY) || "{}") as Persisted;
    } catch {
      return {};
    }
  }

  private save(): void {
    try {
      localStorage.setItem(STORAGE_KEY, JSON.stringify(this.state));
    } catch {
      /* storage disabled: the state simply does not survive a reload */
    }
  }

  // ------------------------------------------------------------------ start
  async start(): Promise<void> {
    this.root.replaceChildren(h("div", { class: "ce-page-status" }, [status("loading", "Loading concept data…")]));
    let runs: RunsResponse;
    try {
      runs = await this.api.runs();
    } catch (e) {
      this.root.replaceChildren(h("div", { class: "ce-page-status" }, [
        status("error", `Could not load the list of runs: ${(e as Error).message}`, { label: "Retry", run: () => void this.start() }),
      ]));
      return;
    }
    this.runsInfo = runs;
    performance.mark("conceptevo-runs");
    if (!runs.runs.length) {
      this.root.replaceChildren(h("div", { class: "ce-page-status" }, [
        status("empty", "No concept data in this log directory yet. Log snapshots with " +
          "ConceptWriter(log_dir, probe=...).add_concepts(model, step); this page checks for new data every few seconds."),
      ]));
      this.schedulePoll();
      return;
    }
    this.normaliseState();
    this.requestInitialMaps(); // network first, then build the page while the answers travel
    this.buildLayout();
    this.renderSidebar();
    this.rebuildPanels();
    this.schedulePoll();
  }

  private requestInitialMaps(): void {
    const step = this.step;
    const space = this.state.space ?? "";
    if (step === null) return;
    for (const run of this.selectedRuns()) {
      for (const layer of this.layersOf(run)) {
        const s = stepAtOrBefore(run.spaces[space]?.[layer] ?? [], step);
        if (s !== null) this.api.map(run.run, space, layer, s).catch(() => undefined);
      }
    }
  }

  private buildLayout(): void {
    this.playButton.addEventListener("click", () => this.togglePlay());
    this.slider.addEventListener("input", () => this.setStepIndex(Number(this.slider.value), true));
    this.slider.addEventListener("keydown", (e) => {
      if (e.key === " " || e.key === "k") {
        e.preventDefault();
        this.togglePlay();
      }
    });
    this.searchInput.addEventListener("input", () => this.runSearch());
    this.searchInput.addEventListener("keydown", (e) => {
      if (e.key === "Enter") {
        const first = this.hitsBox.querySelector<HTMLElement>("li");
        first?.click();
      }
    });
    this.setPlayIcon(false);
    const stepbar = h("div", { class: "ce-stepbar" }, [this.playButton, this.slider, this.stepLabel, this.liveBadge]);
    this.main.append(stepbar, this.bannerBox, this.mapsBox, this.tabsBox);
    this.root.replaceChildren(h("div", { class: "ce-app" }, [this.sidebar, this.main, this.detail]), this.tooltip);
    this.renderDetail();
    this.renderTabs(false); // content after the first maps: the map comes first
  }

  private setPlayIcon(playing: boolean): void {
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", "0 0 24 24");
    const path = document.createElementNS(ns, "path");
    path.setAttribute("d", playing ? "M6 5h4v14H6zm8 0h4v14h-4z" : "M8 5v14l11-7z");
    svg.append(path);
    this.playButton.replaceChildren(svg);
    this.playButton.setAttribute("aria-label", playing ? "pause" : "play");
    this.playButton.setAttribute("aria-pressed", String(playing));
  }

  // ------------------------------------------------------------------ state helpers
  private runInfo(run: string): RunInfo | undefined {
    return this.runsInfo?.runs.find((r) => r.run === run);
  }

  private selectedRuns(): RunInfo[] {
    return (this.state.runs ?? []).map((r) => this.runInfo(r)).filter((r): r is RunInfo => !!r);
  }

  private allSpaces(): string[] {
    const s = new Set<string>();
    for (const r of this.selectedRuns()) for (const k of Object.keys(r.spaces)) s.add(k);
    return [...s];
  }

  private allDetectors(): string[] {
    const s = new Set<string>();
    for (const r of this.selectedRuns()) for (const k of Object.keys(r.detectors)) s.add(k);
    return [...s];
  }

  private layersOf(run: RunInfo): string[] {
    const inSpace = Object.keys(run.spaces[this.state.space ?? ""] ?? {});
    const ordered = run.layers.filter((l) => inSpace.includes(l));
    const all = ordered.length ? ordered : inSpace;
    return this.state.layer && this.state.layer !== "all" ? all.filter((l) => l === this.state.layer) : all;
  }

  private normaliseState(): void {
    const runs = this.runsInfo!.runs;
    const groups = this.runsInfo!.probe_groups ?? [];
    let selected = (this.state.runs ?? []).filter((r) => runs.some((x) => x.run === r));
    if (!selected.length) {
      // Default: the runs sharing the first run's probe set, up to three side by side.
      const group = groups.find((g) => g.runs.includes(runs[0].run));
      selected = (group ? group.runs : [runs[0].run]).slice(0, 3);
    }
    this.state.runs = selected;
    const spaces = this.allSpaces();
    if (!this.state.space || !spaces.includes(this.state.space)) this.state.space = spaces[0] ?? "";
    const detectors = this.allDetectors();
    if (this.state.detector === undefined || (this.state.detector && !detectors.includes(this.state.detector))) {
      this.state.detector = detectors[0] ?? "";
    }
    const layers = new Set(this.selectedRuns().flatMap((r) => r.layers));
    if (!this.state.layer || (this.state.layer !== "all" && !layers.has(this.state.layer))) this.state.layer = "all";
    if (!this.state.colourBy) this.state.colourBy = "layer";
    if (!this.state.tool) this.state.tool = "pan";
    if (this.state.anchors === undefined) this.state.anchors = true;
    this.recomputeSteps(false);
  }

  private recomputeSteps(follow: boolean): void {
    const lists: number[][] = [];
    for (const run of this.selectedRuns()) {
      for (const layer of this.layersOf(run)) lists.push(run.spaces[this.state.space ?? ""]?.[layer] ?? []);
    }
    const steps = unionSteps(lists);
    let index: number;
    if (!this.steps.length) {
      // First load (or page reload): go back to the step the user left, else the latest.
      const wanted = this.state.step;
      index = wanted !== undefined && steps.includes(wanted) ? steps.indexOf(wanted) : steps.length - 1;
    } else {
      index = keepStepIndex(this.steps, steps, this.stepIndex, follow);
    }
    this.steps = steps;
    this.stepIndex = Math.max(0, index);
    this.slider.max = String(Math.max(0, steps.length - 1));
    this.slider.value = String(this.stepIndex);
    this.slider.disabled = steps.length <= 1;
    this.updateStepLabel();
  }

  get step(): number | null {
    return this.steps.length ? this.steps[this.stepIndex] : null;
  }

  private updateStepLabel(): void {
    const step = this.step;
    this.stepLabel.textContent = step === null ? "no steps" : `step ${step}`;
    this.slider.setAttribute("aria-valuetext", step === null ? "no steps" : `step ${step} (${this.stepIndex + 1} of ${this.steps.length})`);
  }

  private setStepIndex(index: number, fromUser: boolean): void {
    if (!this.steps.length) return;
    this.stepIndex = Math.min(Math.max(0, index), this.steps.length - 1);
    this.slider.value = String(this.stepIndex);
    this.state.step = this.step ?? undefined;
    this.save();
    this.updateStepLabel();
    if (fromUser && this.playing) this.togglePlay();
    void this.loadAllPanels();
  }

  private togglePlay(): void {
    if (this.playing) {
      clearTimeout(this.playing);
      this.playing = 0;
      this.setPlayIcon(false);
      return;
    }
    if (this.steps.length <= 1) return;
    if (this.stepIndex >= this.steps.length - 1) this.setStepIndex(0, false);
    this.setPlayIcon(true);
    const tick = async () => {
      if (!this.playing) return;
      if (this.stepIndex >= this.steps.length - 1) {
        this.togglePlay();
        return;
      }
      this.setStepIndex(this.stepIndex + 1, false);
      await this.loadAllPanels();
      if (this.playing) this.playing = window.setTimeout(tick, PLAY_MS);
    };
    this.playing = window.setTimeout(tick, PLAY_MS / 2);
  }

  // ------------------------------------------------------------------ sidebar
  private renderSidebar(): void {
    const info = this.runsInfo!;
    const runsSection = h("div", { class: "ce-section" }, [h("h3", { text: "Runs" })]);
    info.runs.forEach((r, i) => {
      const box = h("input", { attrs: { type: "checkbox" } });
      box.checked = (this.state.runs ?? []).includes(r.run);
      box.addEventListener("change", () => this.toggleRun(r.run, box.checked));
      const sw = h("span", { class: "ce-swatch" });
      sw.style.background = PALETTE[i % PALETTE.length];
      runsSection.append(h("label", { class: "ce-run", title: r.run }, [
        box, sw, h("span", { class: "ce-run-name", text: r.run }),
        h("span", { class: "ce-run-meta", text: `${r.steps.length} steps` }),
      ]));
    });
    if (!info.comparable) {
      runsSection.append(h("div", { class: "ce-muted", text: "Runs use different probe sets: only runs of the same probe set are shown side by side." }));
    }
    const spaces = this.allSpaces();
    const detectors = this.allDetectors();
    const layers = [...new Set(this.selectedRuns().flatMap((r) => r.layers))];
    const field = (label: string, control: HTMLElement) => h("div", { class: "ce-field" }, [h("label", { text: label }), control]);
    const view = h("div", { class: "ce-section" }, [
      h("h3", { text: "Map" }),
      field("Space", select(spaces.map((s) => ({ value: s, label: s })), this.state.space ?? "", (v) => {
        this.state.space = v; this.save(); this.recomputeSteps(false); this.reloadAll(true);
      }, "space")),
      field("Layer", select([{ value: "all", label: "all layers" }, ...layers.map((l) => ({ value: l, label: l }))],
        this.state.layer ?? "all", (v) => { this.state.layer = v; this.save(); this.recomputeSteps(false); this.reloadAll(true); }, "layer")),
      field("Detector", select([...detectors.map((d) => ({ value: d, label: d })), { value: "", label: "none" }],
        this.state.detector ?? "", (v) => { this.state.detector = v; this.save(); this.reloadAll(false); this.renderTabs(); }, "detector")),
      field("Colour by", select([
        { value: "layer", label: "layer" }, { value: "category", label: "concept category" }, { value: "group", label: "concept group" },
      ], this.state.colourBy ?? "layer", (v) => { this.state.colourBy = v as ColourBy; this.save(); this.recolourAll(); }, "colour by")),
    ]);
    const toolButtons = (["pan", "box", "lasso"] as Tool[]).map((t) => {
      const b = h("button", { text: t[0].toUpperCase() + t.slice(1), attrs: { "aria-pressed": String(this.state.tool === t), "data-tool": t } });
      b.addEventListener("click", () => {
        this.state.tool = t; this.save();
        for (const p of this.panels) p.view.tool = t;
        toolButtons.forEach((x) => x.setAttribute("aria-pressed", String(x === b)));
      });
      return b;
    });
    const anchorsBox = h("input", { attrs: { type: "checkbox", "aria-label": "show anchors" } });
    this.anchorsNote = h("span", { class: "ce-muted ce-note" });
    this.updateAnchorsNote();
    anchorsBox.checked = !!this.state.anchors;
    anchorsBox.addEventListener("change", () => {
      this.state.anchors = anchorsBox.checked; this.save();
      for (const p of this.panels) { p.view.overlay.showAnchors = anchorsBox.checked; p.view.requestDraw(); }
    });
    const tools = h("div", { class: "ce-section" }, [
      h("h3", { text: "Tools" }),
      h("div", { class: "ce-row" }, [h("div", { class: "ce-seg", attrs: { role: "group", "aria-label": "drag tool" } }, toolButtons),
        h("button", { class: "ce-button", text: "Fit", title: "Fit the map to the view", on: { click: () => this.fit() } })]),
      h("div", { class: "ce-muted", text: "Wheel zooms; shift-drag selects a box, alt-drag a lasso; click a neuron for its story." }),
      h("label", { class: "ce-run" }, [anchorsBox, h("span", { text: "Show anchors" }), this.anchorsNote]),
      h("button", { class: "ce-link", text: "Clear selection", on: { click: () => this.setSelection(null) } }),
    ]);
    const search = h("div", { class: "ce-section" }, [h("h3", { text: "Search" }), this.searchInput, this.hitsBox]);
    const exporter = h("div", { class: "ce-section" }, [
      h("h3", { text: "Export" }),
      h("div", { class: "ce-row" }, [
        h("button", { class: "ce-button", text: "PNG", attrs: { "data-export": "png" }, on: { click: () => void this.exportPng() } }),
        h("button", { class: "ce-button", text: "SVG", attrs: { "data-export": "svg" }, on: { click: () => this.exportSvg() } }),
        h("button", { class: "ce-button", text: "CSV", attrs: { "data-export": "csv" }, on: { click: () => this.exportCsv() } }),
      ]),
    ]);
    const legend = h("div", { class: "ce-section" }, [h("h3", { text: "Legend" }), this.legendBox]);
    this.sidebar.replaceChildren(runsSection, view, tools, search, exporter, legend);
    this.renderBanner();
  }

  private anchorsNote = h("span");

  /** Say so when the chosen space has no anchors (e.g. a ConceptEvo space), instead of silently drawing none. */
  private updateAnchorsNote(): void {
    const space = this.state.space ?? "";
    const has = this.selectedRuns().some((r) => r.anchors.includes(space));
    this.anchorsNote.textContent = has ? "" : `(none in "${space}")`;
  }

  private renderBanner(): void {
    const warnings = this.runsInfo?.warnings ?? [];
    clear(this.bannerBox);
    if (warnings.length) {
      this.bannerBox.append(h("div", { class: "ce-banner", attrs: { role: "status" } },
        warnings.slice(0, 5).map((w) => h("div", { text: w }))));
    }
  }

  private toggleRun(run: string, on: boolean): void {
    let runs = (this.state.runs ?? []).filter((r) => r !== run);
    if (on) {
      const info = this.runsInfo!;
      if (!info.comparable) {
        const group = info.probe_groups.find((g) => g.runs.includes(run));
        runs = runs.filter((r) => group?.runs.includes(r));
      }
      runs.push(run);
      const order = info.runs.map((r) => r.run);
      runs.sort((a, b) => order.indexOf(a) - order.indexOf(b));
    }
    this.state.runs = runs;
    this.save();
    this.normaliseState();
    this.renderSidebar();
    this.rebuildPanels();
    this.renderTabs();
  }

  // ------------------------------------------------------------------ panels
  private rebuildPanels(): void {
    for (const p of this.panels) p.destroy();
    this.panels = [];
    const runs = this.selectedRuns();
    this.mapsBox.dataset.count = String(runs.length);
    clear(this.mapsBox);
    if (!runs.length) {
      this.mapsBox.append(status("empty", "Select a run in the sidebar to see its concept map."));
      return;
    }
    const order = this.runsInfo!.runs.map((r) => r.run);
    for (const run of runs) {
      const panel = new Panel(run.run, PALETTE[order.indexOf(run.run) % PALETTE.length], this.camera, this);
      panel.view.tool = this.state.tool ?? "pan";
      panel.view.overlay.showAnchors = !!this.state.anchors;
      if (!this.firstDrawMarked) {
        panel.view.onFirstPoints = () => {
          if (this.firstDrawMarked) return;
          this.firstDrawMarked = true;
          performance.mark("conceptevo-first-draw");
          document.body.dataset.conceptevoReady = "true";
        };
      }
      this.panels.push(panel);
      this.mapsBox.append(panel.element);
    }
    this.camera.fitted = false;
    this.fullFitPending = true;
    for (const p of this.panels) p.anchorsLoading = this.loadAnchors(p);
    void this.loadAllPanels();
  }

  private reloadAll(refit: boolean): void {
    this.updateAnchorsNote();
    if (refit) { this.camera.fitted = false; this.fullFitPending = true; }
    for (const p of this.panels) { p.points = null; p.anchors = null; p.anchorsLoading = this.loadAnchors(p); }
    void this.loadAllPanels();
  }

  private async loadAnchors(panel: Panel): Promise<void> {
    const run = this.runInfo(panel.run);
    const space = this.state.space ?? "";
    if (!run || !run.anchors.includes(space)) {
      panel.view.overlay.anchors = [];
      panel.view.requestDraw();
      return;
    }
    try {
      const a = await this.api.anchors(panel.run, space);
      panel.anchors = a;
      panel.view.overlay.anchors = a.words.map((w, i) => ({ label: w, kind: a.kind[i] ?? "anchor",
        x: a.layout[i]?.[0] ?? NaN, y: a.layout[i]?.[1] ?? NaN })).filter((p) => Number.isFinite(p.x) && Number.isFinite(p.y));
      panel.view.requestDraw();
    } catch {
      panel.view.overlay.anchors = []; // anchors are decoration: the map stands without them
    }
  }

  async loadAllPanels(): Promise<void> {
    const step = this.step;
    await Promise.all(this.panels.map((p) => this.loadPanel(p, step)));
    this.afterLoad();
  }

  private async loadPanel(panel: Panel, step: number | null): Promise<void> {
    const version = ++panel.version;
    const run = this.runInfo(panel.run);
    const space = this.state.space ?? "";
    if (!run) return;
    const layers = this.layersOf(run);
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
      const maps = await Promise.all(wanted.filter((w) => w.step !== null).map(async (w) => ({
        layer: w.layer, map: await this.api.map(panel.run, space, w.layer, w.step!) })));
      if (version !== panel.version) return;
      if (!this.firstDrawMarked) performance.mark("conceptevo-maps");
      const points = combineLayers(maps);
      panel.points = points;
      panel.bounds = bounds(points.positions);
      const shown = Math.max(...wanted.map((w) => w.step ?? -1));
      panel.shownStep = shown;
      panel.element.dataset.step = String(shown);
      panel.element.dataset.points = String(points.channel.length);
      panel.meta.textContent = `${shown === step ? "" : `showing step ${shown} · `}${points.channel.length.toLocaleString()} neurons` +
        (points.unplaced.length ? ` · ${points.unplaced.length} unplaced` : "");
      this.renderUnplaced(panel);
      // Draw now with what we have; labels (for colours and hover) follow.
      this.colourPanel(panel);
      // Announced after this frame's draw (rAF callbacks run in order): benchmarks and tests listen.
      requestAnimationFrame(() => document.dispatchEvent(new CustomEvent("conceptevo:drawn", { detail: { run: panel.run, step: shown } })));
      panel.setStatus(null);
      if (!this.camera.fitted) {
        await panel.anchorsLoading;
        if (version !== panel.version) return;
        this.fit();
      }
      this.applyHighlights(panel);
      const detector = this.state.detector;
      if (detector) {
        void this.loadLabels(panel, detector, step, version);
      } else {
        panel.labels = {};
      }
      this.prefetch(panel, run, layers, space);
    } catch (e) {
      if (version !== panel.version) return;
      panel.setStatus(status("error", (e as Error).message, { label: "Retry", run: () => void this.loadPanel(panel, this.step) }));
    } finally {
      clearTimeout(pending);
    }
  }

  /** Warm the cache with the neighbouring steps so the slider and play move without waiting. */
  private prefetch(panel: Panel, run: RunInfo, layers: string[], space: string): void {
    for (const neighbour of [this.steps[this.stepIndex + 1], this.steps[this.stepIndex - 1]]) {
      if (neighbour === undefined) continue;
      for (const layer of layers) {
        const s = stepAtOrBefore(run.spaces[space]?.[layer] ?? [], neighbour);
        if (s !== null) this.api.map(panel.run, space, layer, s).catch(() => undefined);
      }
    }
  }

  private async loadLabels(panel: Panel, detector: string, step: number, version: number): Promise<void> {
    const run = this.runInfo(panel.run)!;
    const layers = panel.points?.layers ?? [];
    const entries = await Promise.all(layers.map(async (layer) => {
      const s = stepAtOrBefore(run.detectors[detector]?.[layer] ?? [], step);
      if (s === null) return [layer, undefined] as const;
      try {
        return [layer, await this.api.labels(panel.run, detector, layer, s)] as const;
      } catch {
        return [layer, undefined] as const;
      }
    }));
    if (version !== panel.version) return;
    panel.labels = Object.fromEntries(entries);
    if (this.state.colourBy === "category") this.colourPanel(panel);
    if (this.searchInput.value.trim()) this.runSearch();
  }

  private renderUnplaced(panel: Panel): void {
    const u = panel.points?.unplaced ?? [];
    clear(panel.unplacedBox);
    if (!u.length) return;
    const list = h("ul", {}, u.slice(0, 500).map((n) => h("li", { text: neuronId(n.layer, n.channel) })));
    panel.unplacedBox.append(h("details", {}, [
      h("summary", { text: `${u.length} neuron${u.length === 1 ? "" : "s"} could not be placed (not drawn)` }), list,
    ]));
  }

  private colourPanel(panel: Panel): void {
    if (!panel.points) return;
    const { rgba, legend } = colourPoints(panel.points, this.state.colourBy ?? "layer", panel.labels);
    panel.view.setData(panel.points.positions, rgba);
    if (panel === this.panels[0]) {
      this.legendBox.replaceChildren(...legend.entries.map((e) => {
        const sw = h("span", { class: "ce-swatch" });
        sw.style.background = e.colour;
        return h("div", { class: "ce-legend-item" }, [sw, h("span", { text: e.label })]);
      }));
    }
  }

  private recolourAll(): void {
    for (const p of this.panels) { this.colourPanel(p); this.applyHighlights(p); }
  }

  private fit(): void {
    const all = this.panels.map((p) => p.bounds).filter((b): b is Bounds => !!b);
    for (const p of this.panels) {
      if (p.view.overlay.showAnchors && p.view.overlay.anchors.length) {
        all.push(bounds(p.view.overlay.anchors.flatMap((a) => [a.x, a.y]), 0.08));
      }
    }
    if (!all.length || !this.panels.length) return;
    for (const p of this.panels) p.view.resize();
    const { width, height } = this.panels[0].view.size;
    this.camera.fit(unionBounds(all), Math.max(width, 50), Math.max(height, 50));
  }

  private afterLoad(): void {
    if (this.fullFitPending && this.panels.every((p) => p.points)) {
      this.fullFitPending = false;
      this.fit();
    }
    this.refreshPinnedTrajectories();
    this.renderTabContent();
  }

  // ------------------------------------------------------------------ hover, click, selection
  private positionOf(panel: Panel, n: Neuron | null): [number, number] | null {
    if (!n || !panel.points) return null;
    const i = panel.points.index.get(neuronId(n.layer, n.channel));
    if (i === undefined) return null;
    return [panel.points.positions[2 * i], panel.points.positions[2 * i + 1]];
  }

  private neuronAt(panel: Panel, index: number): Neuron | null {
    if (!panel.points || index < 0) return null;
    return { layer: panel.points.layers[panel.points.layerIndex[index]], channel: panel.points.channel[index] };
  }

  onHover(panel: Panel, index: number, clientX: number, clientY: number): void {
    const n = this.neuronAt(panel, index);
    const same = n && this.hovered && n.layer === this.hovered.layer && n.channel === this.hovered.channel;
    this.hovered = n;
    for (const p of this.panels) { p.view.overlay.ringAt = this.positionOf(p, n); p.view.requestDraw(); }
    if (!n) {
      this.tooltip.classList.add("ce-hidden");
      return;
    }
    this.placeTooltip(clientX, clientY);
    if (same) return;
    void this.showTooltip(panel, n);
  }

  private placeTooltip(x: number, y: number): void {
    const t = this.tooltip;
    t.classList.remove("ce-hidden");
    const w = t.offsetWidth || 260, hgt = t.offsetHeight || 120;
    const left = x + 16 + w > window.innerWidth ? x - w - 12 : x + 16;
    const top = Math.min(Math.max(4, y + 12), window.innerHeight - hgt - 4);
    t.style.left = `${Math.max(4, left)}px`;
    t.style.top = `${top}px`;
  }

  private async showTooltip(panel: Panel, n: Neuron): Promise<void> {
    const seq = ++this.hoverSeq;
    const top = topLabel(panel.labels[n.layer], n.channel);
    const patches = h("div", { class: "ce-patches ce-patches-small" });
    this.tooltip.replaceChildren(
      h("div", { class: "ce-tip-id", text: neuronId(n.layer, n.channel) }),
      h("div", { class: "ce-muted", text: `${panel.run} · step ${panel.shownStep ?? "–"}` }),
      top ? h("div", { class: "ce-concept" }, [h("b", { text: top.concept }),
        h("span", { class: "ce-muted", text: ` ${top.category ? `(${top.category}) ` : ""}sim ${formatNumber(top.similarity)}` })])
        : h("div", { class: "ce-muted", text: this.state.detector ? "no concept label" : "no detector selected" }),
      patches,
    );
    await new Promise((r) => setTimeout(r, 40)); // skip fetches for neurons the pointer only crosses
    if (seq !== this.hoverSeq) return;
    try {
      const story = await this.api.neuron(panel.run, n.layer, n.channel, panel.shownStep ?? this.step ?? 0);
      if (seq !== this.hoverSeq) return;
      await this.fillPatches(patches, panel.run, story.stimuli.map((s) => ({ image: s.image, box: s.box })), 8);
      if (seq === this.hoverSeq && this.hovered) this.tooltip.dataset.patches = String(patches.childElementCount);
    } catch (e) {
      if (seq === this.hoverSeq) patches.replaceChildren(h("span", { class: "ce-muted", text: (e as Error).message }));
    }
  }

  /** Crop example patches from the thumbnail atlases into small canvases. */
  private async fillPatches(box: HTMLElement, run: string, stimuli: { image: number; box: number[] | null }[], limit: number): Promise<void> {
    let probe: ProbeInfo;
    try {
      probe = await this.probe(run);
    } catch (e) {
      box.replaceChildren(h("span", { class: "ce-muted", text: `no thumbnails: ${(e as Error).message}` }));
      return;
    }
    const items = stimuli.filter((s) => s.image >= 0).slice(0, limit);
    if (!items.length) {
      box.replaceChildren(h("span", { class: "ce-muted", text: "no stimuli" }));
      return;
    }
    const canvases = await Promise.all(items.map(async (s) => {
      const src = patchSource(probe, s.image, s.box);
      const c = h("canvas", { class: "ce-patch", title: `image ${s.image}` });
      c.width = 64;
      c.height = 64;
      if (!src) return c;
      try {
        const img = await this.api.atlas(run, src.atlas);
        const ctx = c.getContext("2d")!;
        ctx.imageSmoothingEnabled = true;
        ctx.drawImage(img, src.sx, src.sy, src.sw, src.sh, 0, 0, 64, 64);
      } catch {
        /* leave the grey placeholder */
      }
      return c;
    }));
    box.replaceChildren(...canvases);
  }

  private probe(run: string): Promise<ProbeInfo> {
    let p = this.probes.get(run);
    if (!p) {
      p = this.api.probe(run);
      this.probes.set(run, p);
      p.catch(() => this.probes.delete(run));
    }
    return p;
  }

  onClick(panel: Panel, index: number): void {
    const n = this.neuronAt(panel, index);
    this.pinned = n ? { ...n, run: panel.run } : null;
    this.refreshPinnedTrajectories();
    this.renderDetail();
  }

  onSelect(_panel: Panel, indices: number[]): void {
    const ids = new Set(indices.map((i) => {
      const n = this.neuronAt(_panel, i)!;
      return neuronId(n.layer, n.channel);
    }));
    this.setSelection(ids);
    this.hitsBox.replaceChildren(h("li", { class: "ce-muted", text: `${ids.size} neurons selected` }));
  }

  private setSelection(ids: Set<string> | null): void {
    this.selection = ids;
    for (const p of this.panels) this.applyHighlights(p);
  }

  private applyHighlights(panel: Panel): void {
    if (!panel.points) return;
    if (!this.selection) {
      panel.view.setEmphasis(null);
    } else {
      const idx: number[] = [];
      for (const id of this.selection) {
        const i = panel.points.index.get(id);
        if (i !== undefined) idx.push(i);
      }
      panel.view.setEmphasis(idx);
    }
    panel.view.overlay.ringAt = this.positionOf(panel, this.hovered);
    panel.view.overlay.pinnedAt = this.positionOf(panel, this.pinned);
    panel.view.requestDraw();
  }

  private runSearch(): void {
    const q = this.searchInput.value;
    const panel = this.panels[0];
    clear(this.hitsBox);
    if (!q.trim()) { this.setSelection(null); return; }
    if (!panel?.points) return;
    const hits = searchPoints(panel.points, panel.labels, q);
    if (!hits.length) {
      this.hitsBox.append(h("li", { class: "ce-muted", text: "no neuron matches" }));
      this.setSelection(new Set());
      return;
    }
    for (const hit of hits.slice(0, 100)) {
      const li = h("li", { attrs: { tabindex: "0" } }, [h("span", { text: hit.id }), h("span", { class: "ce-why", text: hit.why })]);
      li.addEventListener("click", () => this.onClick(panel, hit.index));
      li.addEventListener("keydown", (e) => { if (e.key === "Enter") this.onClick(panel, hit.index); });
      this.hitsBox.append(li);
    }
    this.setSelection(new Set(hits.map((x) => x.id)));
  }

  // ------------------------------------------------------------------ neuron story
  private async refreshPinnedTrajectories(): Promise<void> {
    const pin = this.pinned;
    const seq = ++this.pinSeq;
    for (const p of this.panels) {
      p.view.overlay.pinnedAt = this.positionOf(p, pin);
      if (!pin) p.view.overlay.trajectory = null;
      p.view.requestDraw();
    }
    if (!pin) return;
    await Promise.all(this.panels.map(async (p) => {
      try {
        const story = await this.api.neuron(p.run, pin.layer, pin.channel, p.shownStep ?? this.step ?? 0, this.state.space || undefined);
        if (seq !== this.pinSeq) return;
        p.view.overlay.trajectory = (story.trajectory ?? []).map((t) => ({ ...t, current: t.step === p.shownStep }));
      } catch {
        p.view.overlay.trajectory = null;
      }
      p.view.requestDraw();
    }));
  }

  private renderDetail(): void {
    const pin = this.pinned;
    if (!pin) {
      this.detail.replaceChildren(
        h("h3", { text: "Neuron" }),
        h("div", { class: "ce-empty-detail", text: "Hover a point to see what the neuron responds to; click it to follow its story through training: its path on the map, its label timeline and its example patches step by step." }),
      );
      return;
    }
    const id = neuronId(pin.layer, pin.channel);
    const body = h("div", {}, [status("loading", "Loading the neuron's story…")]);
    this.detail.replaceChildren(
      h("div", { class: "ce-row" }, [h("h2", { text: id }), h("button", { class: "ce-link", text: "close", on: { click: () => this.onClick(this.panels[0], -1) } })]),
      h("div", { class: "ce-muted", text: `run ${pin.run}` }),
      body,
    );
    const seq = this.pinSeq;
    const step = this.panels.find((p) => p.run === pin.run)?.shownStep ?? this.step ?? 0;
    this.api.neuron(pin.run, pin.layer, pin.channel, step, this.state.space || undefined, this.state.detector || undefined)
      .then((story) => { if (seq === this.pinSeq) this.renderStory(body, pin.run, story); })
      .catch((e: Error) => { if (seq === this.pinSeq) body.replaceChildren(status("error", e.message)); });
  }

  private renderStory(body: HTMLElement, run: string, story: NeuronStory): void {
    const parts: HTMLElement[] = [];
    const current = (story.labels ?? []).find((l) => l.step === story.step);
    if (current?.concept) {
      parts.push(h("div", { class: "ce-concept" }, [h("b", { text: current.concept }),
        current.category ? h("span", { class: "ce-chip", text: current.category }) : null,
        h("span", { class: "ce-muted", text: ` sim ${formatNumber(current.similarity)}` })]));
    }
    if (story.invalid) parts.push(h("div", { class: "ce-status-error ce-status", text: "NaN/Inf activations seen at this step" }));
    parts.push(h("h3", { text: `Top stimuli at step ${story.step}` }));
    const now = h("div", { class: "ce-patches" });
    parts.push(now);
    void this.fillPatches(now, run, story.stimuli.map((s) => ({ image: s.image, box: s.box })), 10);
    const spans = labelSpans((story.labels ?? []).map((l) => ({ step: l.step, concept: l.concept, similarity: l.similarity })));
    if (spans.length) {
      parts.push(h("h3", { text: "Label timeline" }));
      // One equal cell per labelled step (a Gantt row per span), so single steps stay visible bars.
      const steps = [...new Set((story.labels ?? []).map((l) => l.step))].sort((a, b) => a - b);
      parts.push(h("div", { class: "ce-timeline" }, spans.map((s) => {
        const bar = h("div", { class: "ce-span-bar" });
        const i0 = Math.max(0, steps.indexOf(s.from)), i1 = Math.max(i0, steps.indexOf(s.to));
        bar.style.marginLeft = `${(i0 / steps.length) * 100}%`;
        bar.style.width = `${((i1 - i0 + 1) / steps.length) * 100}%`;
        return h("div", { class: "ce-span" }, [
          h("span", { class: "ce-muted", text: s.from === s.to ? `${s.from}` : `${s.from}–${s.to}` }),
          h("div", {}, [h("div", { text: s.concept ?? "(none)" }), bar]),
          h("span", { class: "ce-muted", text: formatNumber(s.best) }),
        ]);
      })));
    }
    const traj = story.trajectory ?? [];
    if (traj.length) {
      const placed = traj.filter((t) => t.x !== null).length;
      parts.push(h("div", { class: "ce-muted", text: `Trajectory drawn on the map: placed at ${placed} of ${traj.length} steps.` }));
    }
    if (story.stimuli_by_step?.length) {
      parts.push(h("h3", { text: "Patches step by step" }));
      for (const s of story.stimuli_by_step) {
        const row = h("div", { class: "ce-patches ce-patches-small" });
        parts.push(h("div", { class: "ce-story-step" }, [h("span", { class: "ce-muted", text: `step ${s.step}` }), row]));
        void this.fillPatches(row, run, s.images.map((image, i) => ({ image, box: s.boxes[i] ?? null })), 5);
      }
    }
    body.replaceChildren(...parts);
  }

  // ------------------------------------------------------------------ tabs
  private renderTabs(withContent = true): void {
    const tabs: [string, string][] = [["metrics", "Metrics"], ["categories", "Categories"], ["importance", "Importance"]];
    if (!this.state.tab) this.state.tab = "metrics";
    const list = h("div", { class: "ce-tablist", attrs: { role: "tablist" } }, tabs.map(([key, label]) => {
      const b = h("button", { class: "ce-tab", text: label, attrs: { role: "tab", "aria-selected": String(this.state.tab === key), "data-tab": key } });
      b.addEventListener("click", () => { this.state.tab = key; this.save(); this.renderTabs(); });
      return b;
    }));
    this.tabsBox.replaceChildren(list, this.tabPanel);
    if (withContent) this.renderTabContent();
  }

  private tabSeq = 0;

  private renderTabContent(): void {
    const seq = ++this.tabSeq;
    const tab = this.state.tab;
    if (tab === "metrics") void this.renderMetrics(seq);
    else if (tab === "categories") void this.renderCategories(seq);
    else void this.renderImportance(seq);
  }

  private async renderMetrics(seq: number): Promise<void> {
    const runs = this.selectedRuns();
    if (!runs.length) { this.tabPanel.replaceChildren(status("empty", "No run selected.")); return; }
    if (!this.tabPanel.firstChild) this.tabPanel.replaceChildren(status("loading", "Loading metrics…"));
    const rows = await Promise.all(runs.map(async (run) => {
      try {
        return { run, data: await this.api.metrics(run.run), error: null as string | null };
      } catch (e) {
        return { run, data: null, error: (e as Error).message };
      }
    }));
    if (seq !== this.tabSeq) return;
    const order = this.runsInfo!.runs.map((r) => r.run);
    const runColour = (run: string) => PALETTE[Math.max(0, order.indexOf(run)) % PALETTE.length];
    const compare = rows.length > 1 && this.metricsLines === "runs";
    // As many charts per row as fit at >= 190 px: the strip reads as one row beside the loss.
    const available = Math.max(200, this.tabPanel.clientWidth - 24);
    const gap = 16; // .ce-strip column gap
    const perRow = Math.max(1, Math.floor((available + gap) / (190 + gap)));
    const width = Math.floor((available - (perRow - 1) * gap) / perRow) - 2, height = 120;
    const step = this.step;
    const chart = (title: string, series: LineSeries[], label: string) => {
      const canvas = h("canvas", { attrs: { "aria-label": label, role: "img" } });
      lineChart(canvas, series, { width, height, title, marker: step });
      return canvas;
    };
    const swatches = (entries: { label: string; colour: string }[]) => h("div", { class: "ce-legend-row" }, entries.map((e) => {
      const sw = h("span", { class: "ce-swatch" });
      sw.style.background = e.colour;
      return h("span", { class: "ce-legend-item" }, [sw, h("span", { text: e.label })]);
    }));
    const linesChoice = rows.length > 1 ? h("div", { class: "ce-row" }, [h("span", { class: "ce-muted", text: "Lines" }),
      select([{ value: "runs", label: "one per run (whole model)" }, { value: "layers", label: "one per layer, a strip per run" }],
        this.metricsLines, (v) => { this.metricsLines = v as "runs" | "layers"; this.renderTabContent(); }, "metric lines")]) : null;
    const metricTitle = (metric: string) => metric === "d_anchor" ? "d_anchor" : metric.replace(/_/g, " ");
    const conceptMetrics = ["entropy", "d_anchor", "speed", "interpretable_fraction"];
    if (compare) {
      const grouped = rows.map(({ run, data, error }) => ({ run, error, g: data ? groupMetrics(data.scalars, this.state.space) : null }));
      const tags = orderTrainingTags(grouped.flatMap((x) => x.g?.training.map((t) => t.tag) ?? [])).slice(0, 3);
      const strip = h("div", { class: "ce-strip" });
      for (const tag of tags) {
        strip.append(chart(tag, grouped.map(({ run, g }) => ({ name: run.run, colour: runColour(run.run),
          points: g?.training.find((t) => t.tag === tag)?.points ?? [] })), `${tag} of the selected runs`));
      }
      for (const metric of conceptMetrics) {
        const per = grouped.map(({ run, g }) => ({ run, whole: wholeModel(g?.concept[metric] ?? []) }));
        if (!per.some((p) => p.whole.points.length)) continue;
        const mean = per.some((p) => p.whole.mean);
        strip.append(chart(`${metricTitle(metric)}${mean ? " (layer mean)" : ""}`, per.map(({ run, whole }) => ({
          name: run.run, colour: runColour(run.run), points: whole.points })), `${metricTitle(metric)} of the selected runs`));
      }
      const errors = grouped.filter((x) => x.error).map((x) => status("error", `metrics of ${x.run.run}: ${x.error}`));
      // The category counts of every run in one row under the curves: what the runs' neurons detect now.
      const detector = this.state.detector;
      const barWidth = Math.min(420, Math.floor((available - (rows.length - 1) * 16) / rows.length) - 2);
      const bars = detector && barWidth >= 220 ? await this.categoryBoxes(detector, barWidth) : [];
      if (seq !== this.tabSeq) return;
      this.tabPanel.replaceChildren(h("div", { class: "ce-row ce-spread" }, [swatches(rows.map(({ run }) => ({ label: run.run, colour: runColour(run.run) }))),
        linesChoice ?? ""]), ...errors, strip, bars.length ? h("div", { class: "ce-bars" }, bars) : "",
        h("div", { class: "ce-muted", text: `Concept metrics of the whole model in space "${this.state.space}" beside the runs' own scalars; orange rule = current step.` }));
      return;
    }
    const out = rows.map(({ run, data, error }) => {
      const strip = h("div", { class: "ce-strip" });
      if (error || !data) {
        strip.append(status("error", `metrics of ${run.run}: ${error}`));
      } else {
        const { concept, training } = groupMetrics(data.scalars, this.state.space);
        const tags = orderTrainingTags(training.map((t) => t.tag)).slice(0, 3);
        let drawn = 0;
        for (const tag of tags) {
          strip.append(chart(tag, [{ name: tag, points: training.find((t) => t.tag === tag)!.points, colour: "#455a64" }], `${tag} of run ${run.run}`));
          drawn++;
        }
        for (const metric of conceptMetrics) {
          const list = concept[metric];
          if (!list?.length) continue;
          strip.append(chart(metricTitle(metric), list.map((x) => ({ name: x.layer, points: x.points,
            colour: x.layer === "all" ? "#424242" : PALETTE[Math.max(0, run.layers.indexOf(x.layer)) % PALETTE.length] })),
          `${metricTitle(metric)} of run ${run.run}`));
          drawn++;
        }
        if (!drawn) strip.append(status("empty", "No scalars logged for this run yet."));
      }
      return h("div", { class: "ce-strip-run" }, [h("h4", { text: run.run }), strip]);
    });
    const layers = [...new Set(rows.flatMap(({ run }) => run.layers))];
    const layerColour = (l: string) => PALETTE[Math.max(0, (rows.find(({ run }) => run.layers.includes(l))?.run.layers ?? []).indexOf(l)) % PALETTE.length];
    this.tabPanel.replaceChildren(
      h("div", { class: "ce-row ce-spread" }, [swatches([...layers.map((l) => ({ label: l, colour: layerColour(l) })),
        { label: "whole model", colour: "#424242" }]), linesChoice ?? ""]),
      ...out, h("div", { class: "ce-muted", text: "Concept metrics: one line per layer, coloured as the layers on the map (dark = whole model); orange rule = current step." }));
  }

  private metricsLines: "runs" | "layers" = "runs";

  private async renderCategories(seq: number): Promise<void> {
    const detector = this.state.detector;
    if (!detector) { this.tabPanel.replaceChildren(status("empty", "Choose a detector in the sidebar to count interpretable neurons per category.")); return; }
    const boxes = await this.categoryBoxes(detector, null);
    if (seq !== this.tabSeq) return;
    this.tabPanel.replaceChildren(...boxes);
  }

  /** Per selected run: a bar chart of interpretable neurons per category and layer at the current step. */
  private async categoryBoxes(detector: string, width: number | null): Promise<HTMLElement[]> {
    const step = this.step;
    const runs = this.selectedRuns();
    const rows = await Promise.all(runs.map(async (run) => {
      const steps = unionSteps(Object.values(run.detectors[detector] ?? {}));
      const s = step === null ? null : stepAtOrBefore(steps, step);
      if (s === null) return { run, s, data: null, error: "no labels from this detector" };
      try {
        return { run, s, data: await this.api.categories(run.run, detector, s), error: null };
      } catch (e) {
        return { run, s, data: null, error: (e as Error).message };
      }
    }));
    return rows.map(({ run, s, data, error }) => {
      const box = h("div", { class: "ce-strip-run" }, [h("h4", { text: `${run.run} · step ${s ?? "–"}` })]);
      if (!data) { box.append(status("empty", error ?? "no data")); return box; }
      const canvas = h("canvas", { attrs: { role: "img", "aria-label": `interpretable neurons per category and layer, run ${run.run}` } });
      groupedBarChart(canvas, data.layers, data.categories, (layer, cat) => data.counts[layer]?.[cat] ?? 0,
        { width: width ?? Math.min(900, 120 + data.layers.length * Math.max(60, data.categories.length * 16)), height: width ? 150 : 190,
          title: `Interpretable neurons per category (${detector})` });
      box.append(canvas);
      return box;
    });
  }

  private importanceChoice: { run?: string; cls?: number; layer?: string; step?: number } = {};

  private async renderImportance(seq: number): Promise<void> {
    const runs = this.selectedRuns().filter((r) => r.importance.length);
    if (!runs.length) {
      this.tabPanel.replaceChildren(status("empty", "No importance logged for the selected runs. Log it with writer.add_concept_importance(model, class_index, ...)."));
      return;
    }
    const c = this.importanceChoice;
    const run = runs.find((r) => r.run === c.run) ?? runs[0];
    c.run = run.run;
    const classes = [...new Set(run.importance.map((x) => x.class))].sort((a, b) => a - b);
    if (c.cls === undefined || !classes.includes(c.cls)) c.cls = classes[0];
    const layers = run.importance.filter((x) => x.class === c.cls).map((x) => x.layer);
    if (!c.layer || !layers.includes(c.layer)) c.layer = layers[0];
    const steps = run.importance.find((x) => x.class === c.cls && x.layer === c.layer)?.steps ?? [];
    if (c.step === undefined || !steps.includes(c.step)) c.step = steps[steps.length - 1];
    let names: string[] | null = null;
    try { names = (await this.probe(run.run)).class_names; } catch { names = null; }
    if (seq !== this.tabSeq) return;
    const rerender = () => this.renderTabContent();
    const controls = h("div", { class: "ce-row" }, [
      h("span", { class: "ce-muted", text: "Run" }),
      select(runs.map((r) => ({ value: r.run, label: r.run })), run.run, (v) => { c.run = v; rerender(); }, "importance run"),
      h("span", { class: "ce-muted", text: "Class" }),
      select(classes.map((k) => ({ value: String(k), label: names?.[k] ? `${k} · ${names[k]}` : String(k) })), String(c.cls),
        (v) => { c.cls = Number(v); rerender(); }, "class"),
      h("span", { class: "ce-muted", text: "Layer" }),
      select(layers.map((l) => ({ value: l, label: l })), c.layer ?? "", (v) => { c.layer = v; rerender(); }, "importance layer"),
      h("span", { class: "ce-muted", text: "To step" }),
      select(steps.map((s) => ({ value: String(s), label: String(s) })), String(c.step), (v) => { c.step = Number(v); rerender(); }, "to step"),
    ]);
    const body = h("div", {}, [status("loading", "Loading importance…")]);
    this.tabPanel.replaceChildren(controls, body);
    try {
      const imp = await this.api.importance(run.run, c.cls!, c.layer!, c.step!);
      if (seq !== this.tabSeq) return;
      const ranked = rankImportance(imp);
      const byId = this.importanceByRun.get(run.run) ?? new Map<string, number>();
      imp.importance.forEach((v, ch) => { if (v !== null && Number.isFinite(v)) byId.set(neuronId(imp.layer, ch), v); });
      this.importanceByRun.set(run.run, byId);
      const fromStep = imp.from_step ?? null, toStep = imp.to_step ?? c.step!;
      const topN = 12;
      const highlight = h("button", { class: "ce-button ce-button-primary", text: `Highlight top ${Math.min(topN, ranked.length)} on the map`,
        on: { click: () => this.setSelection(new Set(ranked.slice(0, topN).map((r) => neuronId(imp.layer, r.channel)))) } });
      const table = h("table", { class: "ce-table" }, [h("thead", {}, [h("tr", {}, [
        h("th", { text: "#" }), h("th", { text: "neuron" }), h("th", { class: "ce-num", text: "importance" }),
        h("th", { class: "ce-num", text: "mean sens." }), h("th", { text: `before (step ${fromStep ?? "?"})` }), h("th", { text: `after (step ${toStep})` }),
      ])])]);
      const tbody = h("tbody");
      table.append(tbody);
      for (const [rank, r] of ranked.slice(0, 16).entries()) {
        const id = neuronId(imp.layer, r.channel);
        const before = h("div", { class: "ce-patches ce-patches-small" });
        const after = h("div", { class: "ce-patches ce-patches-small" });
        const link = h("button", { class: "ce-link", text: id, on: { click: () => {
          this.pinned = { layer: imp.layer, channel: r.channel, run: run.run };
          this.refreshPinnedTrajectories(); this.renderDetail();
        } } });
        tbody.append(h("tr", {}, [h("td", { class: "ce-muted", text: String(rank + 1) }), h("td", {}, [link]),
          h("td", { class: "ce-num", text: formatNumber(r.importance) }), h("td", { class: "ce-num", text: formatNumber(r.sensitivity) }),
          h("td", {}, [before]), h("td", {}, [after])]));
        for (const [box, s] of [[before, fromStep], [after, toStep]] as const) {
          if (s === null) continue;
          this.api.neuron(run.run, imp.layer, r.channel, s)
            .then((story) => this.fillPatches(box, run.run, story.stimuli.map((x) => ({ image: x.image, box: x.box })), 3))
            .catch(() => box.replaceChildren(h("span", { class: "ce-muted", text: "–" })));
        }
      }
      const flagged = imp.flagged?.length ? h("div", { class: "ce-muted", text: `${imp.flagged.length} neurons flagged (non-finite gradients) and left out.` }) : null;
      const revertBox = h("div", { class: "ce-revert" });
      body.replaceChildren(
        h("div", { class: "ce-row" }, [h("div", { class: "ce-muted", text: `Class ${imp.class_name ?? imp.class}: importance of each neuron's concept evolution from step ${fromStep ?? "?"} to ${toStep} (fraction of class images whose score rises with it).` }), highlight]),
        flagged ?? "", revertBox, table);
      const hasRevert = run.revert.some((x) => x.class === c.cls && x.steps.includes(c.step!));
      if (hasRevert) {
        try {
          const rv = await this.api.revert(run.run, c.cls!, c.step!);
          const canvas = h("canvas", { attrs: { role: "img", "aria-label": "revert evaluation" } });
          revertChart(canvas, rv.bins, rv.accuracy_change, rv.accuracy_change_std, rv.random_change, rv.random_change_std,
            { width: 460, height: 190, title: `Revert evaluation (accuracy change; base ${(rv.base_accuracy * 100).toFixed(1)}%)` });
          revertBox.replaceChildren(h("h4", { text: "Reverting evolutions by importance bin" }), canvas,
            h("div", { class: "ce-muted", text: "Each bar: the neurons of one importance quartile have their activations replaced by those at the \"from\" step; grey band = as many random neurons." }));
        } catch (e) {
          revertBox.replaceChildren(status("error", (e as Error).message));
        }
      }
    } catch (e) {
      if (seq === this.tabSeq) body.replaceChildren(status("error", (e as Error).message));
    }
  }

  // ------------------------------------------------------------------ export
  private exportName(ext: string): string {
    const runs = this.panels.map((p) => p.run).join("+").replace(/[^A-Za-z0-9._+-]+/g, "_").slice(0, 80);
    return `conceptevo_${runs || "map"}_${this.state.space}_step${this.step ?? 0}.${ext}`;
  }

  private async exportPng(): Promise<void> {
    if (!this.panels.length) return;
    const blobs = await Promise.all(this.panels.map((p) => p.view.toPngBlob()));
    const images = await Promise.all(blobs.map((b) => createImageBitmap(b)));
    const pad = 8, titleH = 22;
    const out = document.createElement("canvas");
    out.width = images.reduce((w, im) => w + im.width + pad, pad);
    out.height = Math.max(...images.map((im) => im.height)) + titleH + pad;
    const ctx = out.getContext("2d")!;
    ctx.fillStyle = "#ffffff";
    ctx.fillRect(0, 0, out.width, out.height);
    let x = pad;
    images.forEach((im, i) => {
      ctx.fillStyle = "#212121";
      ctx.font = "500 13px Roboto, Arial, sans-serif";
      ctx.fillText(`${this.panels[i].run} · step ${this.panels[i].shownStep ?? ""}`, x, 16);
      ctx.drawImage(im, x, titleH);
      x += im.width + pad;
    });
    out.toBlob((b) => { if (b) download(this.exportName("png"), b); }, "image/png");
  }

  private exportSvg(): void {
    const parts: string[] = [];
    let x = 0;
    let height = 0;
    for (const p of this.panels) {
      if (!p.points) continue;
      const { width, height: hgt } = p.view.size;
      const col = p.view.colourBytes;
      const r = pointSize(p.points.channel.length) / 2;
      const svg = toSvg({
        width, height: hgt, title: `${p.run} step ${p.shownStep}`,
        points: p.view.screenPoints().map(({ x: sx, y: sy, i }) => ({
          x: sx, y: sy, r, id: neuronId(p.points!.layers[p.points!.layerIndex[i]], p.points!.channel[i]),
          fill: `#${[col[4 * i], col[4 * i + 1], col[4 * i + 2]].map((v) => v.toString(16).padStart(2, "0")).join("")}`,
        })),
        anchors: p.view.overlay.showAnchors ? p.view.overlay.anchors.map((a) => {
          const [ax, ay] = p.view.toScreen(a.x, a.y);
          return { x: ax, y: ay, label: a.label };
        }) : [],
      });
      parts.push(`<g transform="translate(${x} 0)">${svg.replace(/^<svg[^>]*>/, "").replace(/<\/svg>$/, "")}</g>`);
      x += width + 8;
      height = Math.max(height, hgt);
    }
    const doc = `<svg xmlns="http://www.w3.org/2000/svg" width="${x}" height="${height}" viewBox="0 0 ${x} ${height}">\n${parts.join("\n")}\n</svg>\n`;
    download(this.exportName("svg"), new Blob([doc], { type: "image/svg+xml" }));
  }

  private exportCsv(): void {
    const p = this.panels[0];
    if (!p?.points) return;
    const rows = tableRows(p.points, p.labels, this.importanceByRun.get(p.run) ?? null);
    download(this.exportName("csv"), new Blob([toCsv(rows)], { type: "text/csv" }));
  }

  // ------------------------------------------------------------------ live updates
  private schedulePoll(): void {
    clearTimeout(this.pollTimer);
    this.pollTimer = window.setTimeout(() => void this.poll(), POLL_MS);
  }

  private async poll(): Promise<void> {
    try {
      if (document.hidden) return;
      const runs = await this.api.runs();
      const before = JSON.stringify(this.runsInfo);
      if (JSON.stringify(runs) === before) return;
      const hadNone = !this.runsInfo?.runs.length;
      const oldNames = (this.runsInfo?.runs ?? []).map((r) => r.run).join("\n");
      this.runsInfo = runs;
      this.liveBadge.dataset.live = "true";
      if (hadNone) { await this.start(); return; }
      const atEnd = this.stepIndex >= this.steps.length - 1;
      const oldStep = this.step;
      this.normaliseState();
      this.recomputeSteps(atEnd && !this.playing);
      if (runs.runs.map((r) => r.run).join("\n") !== oldNames) this.renderSidebar();
      else this.renderBanner();
      if (this.step !== oldStep || this.panels.some((p) => !p.points)) await this.loadAllPanels();
      else this.renderTabContent();
    } catch {
      this.liveBadge.dataset.live = "false"; // transient: keep showing what we have, try again later
    } finally {
      this.schedulePoll();
    }
  }

  // ------------------------------------------------------------------ test hooks
  private debugHooks() {
    return {
      app: this,
      /** client coordinates (in this frame) of a neuron in a run's panel */
      pointClient: (run: string, id: string): [number, number] | null => {
        const p = this.panels.find((x) => x.run === run);
        const i = p?.points?.index.get(id);
        if (!p || i === undefined) return null;
        const s = p.view.pointScreen(i);
        if (!s) return null;
        const r = p.view.element.getBoundingClientRect();
        return [r.left + s[0], r.top + s[1]];
      },
      panels: () => this.panels.map((p) => ({ run: p.run, step: p.shownStep, points: p.points?.channel.length ?? 0,
        unplaced: p.points?.unplaced.length ?? 0, renderer: p.view.renderer, draws: p.view.drawCount,
        ring: p.view.overlay.ringAt })),
      steps: () => this.steps.slice(),
      parseNeuronId,
      naturalCompare,
      ApiError,
    };
  }
}
