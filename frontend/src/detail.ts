/**
 * What the page says about one neuron: the hover card, the pinned neuron's story
 * (header label, top stimuli, label timeline, patches step by step; in every shown run
 * side by side on request), its rings and trajectory on the maps, and the search list.
 * Everything follows the step slider and marks the current step; labels below their
 * threshold are shown as best guesses, never as concepts.
 */
import type { App, Neuron } from "./app";
import type { NeuronStory } from "./api";
import { describeLabel, formatNumber, isInterpretable, labelSpans, neuronId, parseNeuronId, patchSource, runLetter,
  searchPoints, topLabel } from "./data";
import { h, status } from "./dom";
import type { Panel } from "./panel";

export class Detail {
  readonly element = h("aside", { class: "ce-detail", attrs: { "aria-label": "neuron details", "aria-live": "polite" } });
  readonly tooltip = h("div", { class: "ce-tooltip ce-hidden", attrs: { role: "tooltip" } });
  pinned: (Neuron & { run: string }) | null = null;
  private hoverSeq = 0;
  private pinSeq = 0;
  private hoverPanel: Panel | null = null;
  /** the story now on screen: neuron and runs, and each run's column */
  private shownKey = "";
  private readonly columns = new Map<string, { body: HTMLElement; head: HTMLElement }>();

  constructor(private readonly app: App) {}

  // ------------------------------------------------------------------ hover
  onHover(panel: Panel, index: number, clientX: number, clientY: number): void {
    const n = neuronAt(panel, index);
    const prev = this.app.hovered;
    const same = n && prev && n.layer === prev.layer && n.channel === prev.channel;
    this.app.hovered = n ? { ...n, run: panel.run } : null;
    this.hoverPanel = n ? panel : null;
    for (const p of this.app.panels) { this.placeRings(p); p.view.requestDraw(); }
    if (!n) { this.tooltip.classList.add("ce-hidden"); return; }
    this.placeTooltip(clientX, clientY);
    if (!same) void this.showTooltip(panel, n);
  }

  private placeTooltip(x: number, y: number): void {
    const t = this.tooltip;
    t.classList.remove("ce-hidden");
    const w = t.offsetWidth || 260, hgt = t.offsetHeight || 120;
    const left = x + 16 + w > window.innerWidth ? x - w - 12 : x + 16;
    t.style.left = `${Math.max(4, left)}px`;
    t.style.top = `${Math.min(Math.max(4, y + 12), window.innerHeight - hgt - 4)}px`;
  }

  private async showTooltip(panel: Panel, n: Neuron): Promise<void> {
    const seq = ++this.hoverSeq;
    const top = topLabel(panel.labels[n.layer], n.channel);
    const patches = h("div", { class: "ce-patches ce-patches-small" });
    this.tooltip.dataset.step = String(panel.shownStep ?? "");
    delete this.tooltip.dataset.patches;
    this.tooltip.replaceChildren(
      h("div", { class: "ce-tip-id", text: neuronId(n.layer, n.channel) }),
      h("div", { class: "ce-muted", text: `${runLetter(panel.index)} · ${panel.run} · step ${panel.shownStep ?? "–"}` }),
      top ? h("div", { class: top.interpretable ? "ce-concept" : "ce-concept ce-weak", attrs: { "data-interpretable": String(top.interpretable) },
        text: describeLabel(top) })
        : h("div", { class: "ce-muted", text: this.app.state.detector ? "no concept label" : "no detector selected" }),
      patches,
      h("div", { class: "ce-muted ce-hint", text: "click or Enter: story" }),
    );
    await new Promise((r) => setTimeout(r, 40)); // skip fetches for neurons the pointer only crosses
    if (seq !== this.hoverSeq) return;
    try {
      const story = await this.app.api.neuron(panel.run, n.layer, n.channel, panel.shownStep ?? this.app.step ?? 0);
      if (seq !== this.hoverSeq) return;
      await this.fillPatches(patches, panel.run, story.stimuli.map((s) => ({ image: s.image, box: s.box })), 8);
      if (seq === this.hoverSeq && this.app.hovered) this.tooltip.dataset.patches = String(patches.childElementCount);
    } catch (e) {
      if (seq === this.hoverSeq) patches.replaceChildren(h("span", { class: "ce-muted", text: (e as Error).message }));
    }
  }

  /** Crop example patches from the thumbnail atlases into small canvases. */
  async fillPatches(box: HTMLElement, run: string, stimuli: { image: number; box: number[] | null }[], limit: number): Promise<void> {
    let probe;
    try {
      probe = await this.app.probe(run);
    } catch (e) {
      box.replaceChildren(h("span", { class: "ce-muted", text: `no thumbnails: ${(e as Error).message}` }));
      return;
    }
    const items = stimuli.filter((s) => s.image >= 0).slice(0, limit);
    if (!items.length) { box.replaceChildren(h("span", { class: "ce-muted", text: "no stimuli" })); return; }
    // Placeholders first (the row has its size at once), pixels as each atlas arrives.
    const canvases = items.map((s) => {
      const c = h("canvas", { class: "ce-patch", title: `image ${s.image}` });
      c.width = 64;
      c.height = 64;
      return c;
    });
    box.replaceChildren(...canvases);
    await Promise.all(items.map(async (s, i) => {
      const src = patchSource(probe, s.image, s.box);
      if (!src) return;
      try {
        const img = await this.app.api.atlas(run, src.atlas);
        const ctx = canvases[i].getContext("2d")!;
        ctx.imageSmoothingEnabled = true;
        ctx.drawImage(img, src.sx, src.sy, src.sw, src.sh, 0, 0, 64, 64);
      } catch {
        /* leave the grey placeholder */
      }
    }));
  }

  // ------------------------------------------------------------------ pin, rings, step
  onClick(panel: Panel, index: number): void {
    const n = neuronAt(panel, index);
    this.pin(n ? { ...n, run: panel.run } : null);
  }

  openHovered(): void {
    if (this.app.hovered) this.pin(this.app.hovered);
  }

  close(): void {
    this.tooltip.classList.add("ce-hidden");
    if (this.pinned) this.pin(null);
  }

  pin(n: (Neuron & { run: string }) | null): void {
    this.pinned = n;
    this.app.state.neuron = n ? { run: n.run, id: neuronId(n.layer, n.channel) } : undefined;
    this.app.save();
    void this.refreshTrajectories();
    this.render();
  }

  /** The neuron of a shared link or a reload. */
  restorePinned(): void {
    const s = this.app.state.neuron;
    const id = s ? parseNeuronId(s.id) : null;
    if (s && id) this.pin({ ...id, run: s.run });
  }

  placeRings(panel: Panel): void {
    panel.view.overlay.ringAt = positionOf(panel, this.app.hovered);
    panel.view.overlay.pinnedAt = positionOf(panel, this.pinned);
  }

  /** After a step change: rings, trajectories, the story and the hover card move to the new step. */
  followStep(): void {
    void this.refreshTrajectories();
    if (this.pinned) this.render();
    const hp = this.hoverPanel, hov = this.app.hovered;
    if (hp && hov && !this.tooltip.classList.contains("ce-hidden") && this.tooltip.dataset.step !== String(hp.shownStep)) {
      void this.showTooltip(hp, hov);
    }
  }

  private async refreshTrajectories(): Promise<void> {
    const pin = this.pinned;
    const seq = ++this.pinSeq;
    for (const p of this.app.panels) {
      this.placeRings(p);
      if (!pin) p.view.overlay.trajectory = null;
      p.view.requestDraw();
    }
    if (!pin) return;
    await Promise.all(this.app.panels.map(async (p) => {
      try {
        const story = await this.app.api.neuron(p.run, pin.layer, pin.channel, p.shownStep ?? this.app.step ?? 0, this.app.state.space || undefined);
        if (seq !== this.pinSeq) return;
        p.view.overlay.trajectory = (story.trajectory ?? []).map((t) => ({ ...t, current: t.step === p.shownStep }));
      } catch {
        p.view.overlay.trajectory = null;
      }
      p.view.requestDraw();
    }));
  }

  // ------------------------------------------------------------------ story
  render(): void {
    const pin = this.pinned;
    this.element.dataset.open = String(!!pin);
    this.element.classList.remove("ce-detail-wide");
    if (!pin) {
      this.shownKey = "";
      this.columns.clear();
      this.element.replaceChildren(
        h("h3", { text: "Neuron" }),
        h("div", { class: "ce-empty-detail", text: "Hover a point to see what the neuron responds to; click it to follow its story through training: its path on the map, its label timeline and its example patches step by step." }),
      );
      return;
    }
    const id = neuronId(pin.layer, pin.channel);
    const runs = this.app.panels.length > 1 && this.app.state.compareStory ? this.app.panels.map((p) => p.run) : [pin.run];
    const compare = this.app.panels.length > 1 ? h("button", { class: "ce-button", attrs: { "data-compare": "story" },
      text: runs.length > 1 ? "One run" : "Compare runs", title: "The same neuron's story in every shown run, side by side",
      on: { click: () => { this.app.state.compareStory = runs.length === 1; this.app.save(); this.render(); } } }) : null;
    // Same neuron, same runs (a step change): the stories update in place, without a loading flash.
    const key = `${id}|${runs.join("\n")}`;
    if (key !== this.shownKey || !this.columns.size) {
      this.shownKey = key;
      this.columns.clear();
      const columns = runs.map((run) => {
        const body = h("div", { class: "ce-story", attrs: { "data-run": run } }, [status("loading", "Loading the neuron's story…")]);
        const head = h("span");
        this.columns.set(run, { body, head });
        return h("div", { class: "ce-story-col" }, [h("div", { class: "ce-muted" }, [
          h("span", { class: "ce-run-letter", text: runLetter(this.app.runIndex(run)) }), head]), body]);
      });
      if (runs.length > 1) this.element.classList.add("ce-detail-wide");
      this.element.replaceChildren(
        h("div", { class: "ce-row ce-spread" }, [h("h2", { text: id }), h("div", { class: "ce-row" }, [compare,
          h("button", { class: "ce-link", text: "close", attrs: { "aria-label": "close the story (Esc)" }, on: { click: () => this.pin(null) } })])]),
        h("div", { class: runs.length > 1 ? "ce-story-cols" : "" }, columns),
      );
    } else if (runs.length > 1) {
      this.element.classList.add("ce-detail-wide");
    }
    const seq = this.pinSeq;
    for (const [run, { body, head }] of this.columns) {
      const panel = this.app.panels.find((p) => p.run === run);
      const step = panel?.shownStep ?? this.app.step ?? 0;
      head.textContent = ` run ${run} · step ${step}`;
      this.app.api.neuron(run, pin.layer, pin.channel, step, this.app.state.space || undefined, this.app.state.detector || undefined)
        .then((story) => { if (seq === this.pinSeq) this.renderStory(body, run, story, panel); })
        .catch((e: Error) => { if (seq === this.pinSeq) body.replaceChildren(status("error", e.message)); });
    }
  }

  private renderStory(body: HTMLElement, run: string, story: NeuronStory, panel: Panel | undefined): void {
    const parts: HTMLElement[] = [];
    const labels = story.labels ?? [];
    const tau = (l: { threshold?: number | null }) => l.threshold ?? panel?.labels[this.pinned?.layer ?? ""]?.threshold ?? null;
    const verdict = (l: NeuronStory["labels"] extends (infer T)[] | undefined ? T : never) =>
      l.concept ? isInterpretable(l.similarity, tau(l), l.interpretable) : false;
    const current = labels.find((l) => l.step === story.step);
    if (current?.concept) {
      const ok = verdict(current);
      parts.push(h("div", { class: ok ? "ce-concept" : "ce-concept ce-weak", attrs: { "data-interpretable": String(ok) } }, [
        h("span", { text: describeLabel({ ...current, interpretable: ok, threshold: tau(current) }) })]));
      parts.push(h("div", { class: "ce-muted ce-small", text: `score at step ${story.step}; the timeline shows each span's best score` }));
    }
    if (story.invalid) parts.push(h("div", { class: "ce-status-error ce-status", text: "NaN/Inf activations seen at this step" }));
    parts.push(h("h3", { text: `Top stimuli at step ${story.step}` }));
    const now = h("div", { class: "ce-patches" });
    parts.push(now);
    const fills = [this.fillPatches(now, run, story.stimuli.map((s) => ({ image: s.image, box: s.box })), 10)];
    const spans = labelSpans(labels.map((l) => ({ step: l.step, concept: l.concept, similarity: l.similarity, interpretable: verdict(l) })));
    if (spans.length) {
      parts.push(h("h3", { text: "Label timeline" }));
      // One equal cell per labelled step (a Gantt row per span), so single steps stay visible bars.
      const steps = [...new Set(labels.map((l) => l.step))].sort((a, b) => a - b);
      const at = steps.indexOf(story.step);
      const timeline = h("div", { class: "ce-timeline" }, spans.map((s) => {
        const bar = h("div", { class: s.interpretable ? "ce-span-bar" : "ce-span-bar ce-span-weak" });
        const i0 = Math.max(0, steps.indexOf(s.from)), i1 = Math.max(i0, steps.indexOf(s.to));
        bar.style.marginLeft = `${(i0 / steps.length) * 100}%`;
        bar.style.width = `${((i1 - i0 + 1) / steps.length) * 100}%`;
        const here = story.step >= s.from && story.step <= s.to;
        return h("div", { class: here ? "ce-span ce-current" : "ce-span", attrs: { "data-interpretable": String(s.interpretable) } }, [
          h("span", { class: "ce-muted", text: s.from === s.to ? `${s.from}` : `${s.from}–${s.to}` }),
          h("div", { class: "ce-span-track" }, [h("div", { text: s.interpretable ? s.concept ?? "(none)" : `(${s.concept ?? "none"}: below τ)` }), bar,
            at >= 0 ? markAt((at + 0.5) / steps.length) : null]),
          h("span", { class: "ce-muted", text: `best ${formatNumber(s.best)}` }),
        ]);
      }));
      parts.push(timeline);
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
        const current = s.step === story.step;
        parts.push(h("div", { class: current ? "ce-story-step ce-current" : "ce-story-step", attrs: current ? { "aria-current": "step" } : {} }, [
          h("button", { class: "ce-link ce-muted", text: `step ${s.step}`, title: "Move the slider to this step", on: { click: () => this.app.goToStep(s.step) } }), row]));
        fills.push(this.fillPatches(row, run, s.images.map((image, i) => ({ image, box: s.boxes[i] ?? null })), 5));
      }
    }
    body.dataset.step = String(story.step);
    delete body.dataset.patches;
    body.replaceChildren(...parts);
    // every patch drawn: the count is read by tests and benchmarks
    void Promise.all(fills).then(() => {
      if (body.contains(now)) body.dataset.patches = String(body.querySelectorAll(".ce-patches canvas").length);
    });
  }

  // ------------------------------------------------------------------ search
  runSearch(): void {
    const app = this.app;
    const q = app.searchInput.value;
    const panel = app.panels[0];
    app.hitsBox.replaceChildren();
    if (!q.trim()) { app.setSelection(null); return; }
    if (!panel?.points) return;
    const hits = searchPoints(panel.points, panel.labels, q);
    if (!hits.length) {
      app.hitsBox.append(h("li", { class: "ce-muted", text: "no neuron matches" }));
      app.setSelection(new Set());
      return;
    }
    for (const hit of hits.slice(0, 100)) {
      const li = h("li", { class: hit.interpretable === false ? "ce-weak" : "", attrs: { tabindex: "0" } },
        [h("span", { text: hit.id }), h("span", { class: "ce-why", text: hit.why, title: hit.why })]);
      li.addEventListener("click", () => this.onClick(panel, hit.index));
      li.addEventListener("keydown", (e) => { if (e.key === "Enter") this.onClick(panel, hit.index); });
      app.hitsBox.append(li);
    }
    const selection = new Set(hits.map((x) => x.id));
    app.selection = selection;
    for (const p of app.panels) app.applyHighlights(p);
  }
}

function markAt(fraction: number): HTMLElement {
  const m = h("div", { class: "ce-now", attrs: { title: "current step" } });
  m.style.left = `${fraction * 100}%`;
  return m;
}

function neuronAt(panel: Panel, index: number): Neuron | null {
  if (!panel.points || index < 0) return null;
  return { layer: panel.points.layers[panel.points.layerIndex[index]], channel: panel.points.channel[index] };
}

function positionOf(panel: Panel, n: Neuron | null): [number, number] | null {
  if (!n || !panel.points) return null;
  const i = panel.points.index.get(neuronId(n.layer, n.channel));
  if (i === undefined) return null;
  return [panel.points.positions[2 * i], panel.points.positions[2 * i + 1]];
}
