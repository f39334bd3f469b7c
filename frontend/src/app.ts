/**
 * The Concept Evolution dashboard, wiring only: state, the step bar (slider, play,
 * speed, loop, trails), one aligned map per selected run (small multiples sharing one
 * camera, hover and selection; steps glide), and the rooms around them: sidebar.ts,
 * detail.ts (hover card and neuron story), tabs/ (metrics, categories, importance),
 * export.ts; theme.ts follows TensorBoard's dark mode.
 */
import { Api, ApiError, RunInfo, RunsResponse } from "./api";
import { ProbeInfo, keepStepIndex, naturalCompare, neuronId, parseNeuronId, unionSteps } from "./data";
import { Detail } from "./detail";
import { Maps, PLAY_MS } from "./maps";
import { h, status } from "./dom";
import { Panel } from "./panel";
import { Camera, ScatterView } from "./scatter";
import { renderSidebar } from "./sidebar";
import { Persisted, loadState, normaliseState, saveState } from "./state";
import { Tabs } from "./tabs/tabs";
import { followTheme } from "./theme";

const POLL_MS = 5000;
/** length of a step's glide (300-500 ms reads as motion without slowing the slider down) */
export const TRANSITION_MS = 450;

export interface Neuron {
  layer: string;
  channel: number;
}

export class App {
  readonly api: Api;
  readonly forceCanvas: boolean;
  readonly root: HTMLElement;
  runsInfo: RunsResponse | null = null;
  state: Persisted;
  readonly camera = new Camera();
  panels: Panel[] = [];
  steps: number[] = [];
  stepIndex = 0;
  playing = 0;
  private pollTimer = 0;
  private probes = new Map<string, Promise<ProbeInfo>>();
  hovered: (Neuron & { run: string }) | null = null;
  selection: Set<string> | null = null;
  importanceByRun = new Map<string, Map<string, number>>();
  /** transition length override (tests slow it down to look at a frame) */
  transitionMs = TRANSITION_MS;

  readonly sidebar = h("aside", { class: "ce-sidebar", attrs: { "aria-label": "settings" } });
  readonly main = h("main", { class: "ce-main" });
  readonly mapsBox = h("div", { class: "ce-maps" });
  readonly mapBar = h("div", { class: "ce-mapbar" });
  readonly bannerBox = h("div");
  readonly slider = h("input", { class: "ce-slider", attrs: { type: "range", min: "0", max: "0", step: "1", "aria-label": "training step" } });
  readonly stepLabel = h("span", { class: "ce-step-label", attrs: { "aria-live": "polite" } });
  readonly playButton = h("button", { class: "ce-play", attrs: { "aria-label": "play", title: "Play / pause (space)" } });
  readonly liveBadge = h("span", { class: "ce-live", text: "live", attrs: { title: "Checks for new steps and runs every 5 s" } });
  readonly hitsBox = h("ul", { class: "ce-hits", attrs: { "aria-label": "search results" } });
  readonly searchInput = h("input", { class: "ce-search", attrs: { type: "search", placeholder: "neuron id or concept word", "aria-label": "search neurons" } });
  readonly detail: Detail;
  readonly tabs: Tabs;
  readonly maps: Maps;

  constructor(root: HTMLElement, api: Api, options: { forceCanvas?: boolean } = {}) {
    this.root = root;
    this.api = api;
    this.forceCanvas = !!options.forceCanvas;
    this.state = loadState();
    this.detail = new Detail(this);
    this.tabs = new Tabs(this);
    this.maps = new Maps(this);
    followTheme(root, () => {
      for (const p of this.panels) p.view.requestDraw();
      if (this.runsInfo) this.tabs.renderContent(); // charts draw their inks for the theme
    });
    (window as unknown as { __conceptevo: unknown }).__conceptevo = this.debugHooks();
  }

  save(): void {
    saveState(this.state);
  }

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
    this.normalise();
    this.requestInitialMaps(); // network first, then build the page while the answers travel
    this.buildLayout();
    renderSidebar(this);
    this.maps.rebuildPanels();
    this.detail.restorePinned();
    this.schedulePoll();
  }

  private requestInitialMaps(): void {
    const step = this.step;
    if (step === null) return;
    for (const run of this.selectedRuns()) this.maps.requestMaps(run, step);
  }

  private buildLayout(): void {
    this.playButton.addEventListener("click", () => this.togglePlay());
    this.slider.addEventListener("input", () => this.setStepIndex(Number(this.slider.value), true));
    this.slider.addEventListener("keydown", (e) => {
      if (e.key === " " || e.key === "k") { e.preventDefault(); this.togglePlay(); }
    });
    this.setPlayIcon(false);
    const speed = h("select", { class: "ce-speed", attrs: { "aria-label": "play speed", title: "Play speed" } });
    for (const v of [0.5, 1, 2, 4]) { const o = h("option", { text: `${v}×` }); o.value = String(v); speed.append(o); }
    speed.value = String(this.state.speed ?? 1);
    speed.addEventListener("change", () => { this.state.speed = Number(speed.value); this.save(); });
    const toggle = (label: string, key: "loop" | "trails", title: string, after?: () => void) => {
      const box = h("input", { attrs: { type: "checkbox", "aria-label": label } });
      box.checked = !!this.state[key];
      box.addEventListener("change", () => { this.state[key] = box.checked; this.save(); after?.(); });
      return h("label", { class: "ce-toggle", title }, [box, h("span", { text: label })]);
    };
    const stepbar = h("div", { class: "ce-stepbar" }, [this.playButton, speed, this.slider, this.stepLabel,
      toggle("loop", "loop", "Start again at the first step"), toggle("trails", "trails", "Fading lines to each neuron's last three places",
        () => this.maps.applyTrails()), this.liveBadge]);
    this.main.append(stepbar, this.bannerBox, this.mapBar, this.mapsBox, this.tabs.element);
    this.root.replaceChildren(h("div", { class: "ce-app" }, [this.sidebar, this.main, this.detail.element]), this.detail.tooltip);
    document.addEventListener("keydown", (e) => { if (e.key === "Escape") this.detail.close(); });
    this.detail.render();
    this.tabs.render(false); // content after the first maps: the map comes first
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
  runInfo(run: string): RunInfo | undefined {
    return this.runsInfo?.runs.find((r) => r.run === run);
  }

  selectedRuns(): RunInfo[] {
    return (this.state.runs ?? []).map((r) => this.runInfo(r)).filter((r): r is RunInfo => !!r);
  }

  /** Index of a run in the run list: its letter and line style everywhere. */
  runIndex(run: string): number {
    return Math.max(0, (this.runsInfo?.runs ?? []).findIndex((r) => r.run === run));
  }

  layersOf(run: RunInfo): string[] {
    const inSpace = Object.keys(run.spaces[this.state.space ?? ""] ?? {});
    const ordered = run.layers.filter((l) => inSpace.includes(l));
    const all = ordered.length ? ordered : inSpace;
    return this.state.layer && this.state.layer !== "all" ? all.filter((l) => l === this.state.layer) : all;
  }

  normalise(): void {
    normaliseState(this.state, this.runsInfo!);
    this.recomputeSteps(false);
  }

  recomputeSteps(follow: boolean): void {
    const lists = this.selectedRuns().flatMap((run) => this.layersOf(run).map((l) => run.spaces[this.state.space ?? ""]?.[l] ?? []));
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

  setStepIndex(index: number, fromUser: boolean): void {
    if (!this.steps.length) return;
    const next = Math.min(Math.max(0, index), this.steps.length - 1);
    if (fromUser && this.playing) this.togglePlay();
    if (next === this.stepIndex && this.panels.every((p) => p.shownStep !== null)) return;
    this.stepIndex = next;
    this.slider.value = String(this.stepIndex);
    this.state.step = this.step ?? undefined;
    this.save();
    this.updateStepLabel();
    void this.maps.loadAllPanels(true);
  }

  /** Jump to the logged step nearest `step` (charts' click-to-step). */
  goToStep(step: number): void {
    let best = 0;
    this.steps.forEach((s, i) => { if (Math.abs(s - step) < Math.abs(this.steps[best] - step)) best = i; });
    this.setStepIndex(best, true);
  }

  togglePlay(): void {
    if (this.playing) {
      clearTimeout(this.playing);
      this.playing = 0;
      this.setPlayIcon(false);
      return;
    }
    if (this.steps.length <= 1) return;
    if (this.stepIndex >= this.steps.length - 1) this.setStepIndex(0, false);
    this.setPlayIcon(true);
    const interval = () => PLAY_MS / (this.state.speed || 1);
    const tick = async () => {
      if (!this.playing) return;
      if (this.stepIndex >= this.steps.length - 1) {
        if (!this.state.loop) { this.togglePlay(); return; }
        this.stepIndex = -1; // wraps to the first step below
      }
      this.setStepIndex(this.stepIndex + 1, false);
      await this.maps.loadAllPanels(true);
      if (this.playing) this.playing = window.setTimeout(tick, interval());
    };
    this.playing = window.setTimeout(tick, interval() / 2);
  }

  // ------------------------------------------------------------------ selection, keys
  onSelect(panel: Panel, indices: number[]): void {
    const ids = new Set(indices.map((i) => neuronId(panel.points!.layers[panel.points!.layerIndex[i]], panel.points!.channel[i])));
    this.setSelection(ids);
    this.hitsBox.replaceChildren(h("li", { class: "ce-muted", text: `${ids.size} neurons selected` }));
  }

  setSelection(ids: Set<string> | null): void {
    this.selection = ids;
    if (!ids) this.hitsBox.replaceChildren();
    for (const p of this.panels) this.applyHighlights(p);
  }

  applyHighlights(panel: Panel): void {
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
    this.detail.placeRings(panel);
    panel.view.requestDraw();
  }

  /** Keys on a focused map: arrows / Home / End step the slider, Enter opens the hovered neuron's story, Esc closes it. */
  onMapKey(e: KeyboardEvent): void {
    const moves: Record<string, number> = { ArrowLeft: -1, ArrowDown: -1, ArrowRight: 1, ArrowUp: 1 };
    if (e.key in moves) this.setStepIndex(this.stepIndex + moves[e.key], true);
    else if (e.key === "Home") this.setStepIndex(0, true);
    else if (e.key === "End") this.setStepIndex(this.steps.length - 1, true);
    else if (e.key === "Enter") this.detail.openHovered();
    else if (e.key === "Escape") this.detail.close();
    else if (e.key === " ") this.togglePlay();
    else return;
    e.preventDefault();
  }

  probe(run: string): Promise<ProbeInfo> {
    let p = this.probes.get(run);
    if (!p) {
      p = this.api.probe(run);
      this.probes.set(run, p);
      p.catch(() => this.probes.delete(run));
    }
    return p;
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
      if (JSON.stringify(runs) === JSON.stringify(this.runsInfo)) return;
      const hadNone = !this.runsInfo?.runs.length;
      const oldNames = (this.runsInfo?.runs ?? []).map((r) => r.run).join("\n");
      this.runsInfo = runs;
      this.liveBadge.dataset.live = "true";
      if (hadNone) { await this.start(); return; }
      const atEnd = this.stepIndex >= this.steps.length - 1;
      const oldStep = this.step;
      normaliseState(this.state, runs);
      this.recomputeSteps(atEnd && !this.playing);
      if (runs.runs.map((r) => r.run).join("\n") !== oldNames) renderSidebar(this);
      if (this.step !== oldStep || this.panels.some((p) => !p.points)) await this.maps.loadAllPanels(true);
      else this.tabs.renderContent();
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
      /** client coordinates (in this frame) of a neuron in a run's panel (its place at the current step) */
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
        ring: p.view.overlay.ringAt, animating: p.view.animating })),
      steps: () => this.steps.slice(),
      /** hold every step transition at progress t in [0, 1] (null: run freely) */
      holdTransition: (t: number | null) => { ScatterView.holdAt = t; for (const p of this.panels) p.view.requestDraw(); },
      parseNeuronId,
      naturalCompare,
      ApiError,
    };
  }
}
