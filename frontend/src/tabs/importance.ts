/**
 * Importance of each neuron's concept evolution for a class (Eq. 7-9 of ConceptEvo), as
 * a ranked table with before/after patches, the highlighted neurons on the maps (which
 * stay in view beside the table), and the revert evaluation.  The "to step" follows the
 * slider (the latest importance at or before it) until the user picks one.
 */
import type { App } from "../app";
import { revertChart } from "../charts";
import { formatNumber, neuronId, rankImportance, stepAtOrBefore } from "../data";
import { h, select, status } from "../dom";
import type { Tabs } from "./tabs";

const choice: { run?: string; cls?: number; layer?: string; step?: number; stepPicked?: boolean } = {};

export async function renderImportance(app: App, tabs: Tabs, seq: number): Promise<void> {
  const panel = tabs.panel;
  const runs = app.selectedRuns().filter((r) => r.importance.length);
  if (!runs.length) {
    panel.replaceChildren(status("empty", "No importance logged for the selected runs. Log it with writer.add_concept_importance(model, class_index, ...)."));
    return;
  }
  const c = choice;
  const run = runs.find((r) => r.run === c.run) ?? runs[0];
  c.run = run.run;
  const classes = [...new Set(run.importance.map((x) => x.class))].sort((a, b) => a - b);
  if (c.cls === undefined || !classes.includes(c.cls)) c.cls = classes[0];
  const layers = run.importance.filter((x) => x.class === c.cls).map((x) => x.layer);
  if (!c.layer || !layers.includes(c.layer)) c.layer = layers[0];
  const steps = run.importance.find((x) => x.class === c.cls && x.layer === c.layer)?.steps ?? [];
  if (!c.stepPicked || c.step === undefined || !steps.includes(c.step)) {
    c.step = (app.step !== null ? stepAtOrBefore(steps, app.step) : null) ?? steps[steps.length - 1];
  }
  let names: string[] | null = null;
  try { names = (await app.probe(run.run)).class_names; } catch { names = null; }
  if (!tabs.current(seq)) return;
  const rerender = () => tabs.renderContent();
  const controls = h("div", { class: "ce-row" }, [
    h("span", { class: "ce-muted", text: "Run" }),
    select(runs.map((r) => ({ value: r.run, label: r.run })), run.run, (v) => { c.run = v; rerender(); }, "importance run"),
    h("span", { class: "ce-muted", text: "Class" }),
    select(classes.map((k) => ({ value: String(k), label: names?.[k] ? `${k} · ${names[k]}` : String(k) })), String(c.cls),
      (v) => { c.cls = Number(v); rerender(); }, "class"),
    h("span", { class: "ce-muted", text: "Layer" }),
    select(layers.map((l) => ({ value: l, label: l })), c.layer ?? "", (v) => { c.layer = v; rerender(); }, "importance layer"),
    h("span", { class: "ce-muted", text: "To step" }),
    select(steps.map((s) => ({ value: String(s), label: s === app.step ? `${s} (current)` : String(s) })), String(c.step),
      (v) => { c.step = Number(v); c.stepPicked = true; rerender(); }, "to step"),
    c.stepPicked ? h("button", { class: "ce-link", text: "follow the slider", on: { click: () => { c.stepPicked = false; rerender(); } } }) : null,
  ]);
  const body = h("div", {}, [status("loading", "Loading importance…")]);
  panel.replaceChildren(controls, body);
  try {
    const imp = await app.api.importance(run.run, c.cls!, c.layer!, c.step!);
    if (!tabs.current(seq)) return;
    const ranked = rankImportance(imp);
    const byId = app.importanceByRun.get(run.run) ?? new Map<string, number>();
    imp.importance.forEach((v, ch) => { if (v !== null && Number.isFinite(v)) byId.set(neuronId(imp.layer, ch), v); });
    app.importanceByRun.set(run.run, byId);
    const fromStep = imp.from_step ?? null, toStep = imp.to_step ?? c.step!;
    const topN = 12;
    const highlight = h("button", { class: "ce-button ce-button-primary", text: `Highlight top ${Math.min(topN, ranked.length)} on the map`,
      on: { click: () => app.setSelection(new Set(ranked.slice(0, topN).map((r) => neuronId(imp.layer, r.channel)))) } });
    const mark = (s: number | null) => (s === app.step ? " · current" : "");
    const table = h("table", { class: "ce-table" }, [h("thead", {}, [h("tr", {}, [
      h("th", { text: "#" }), h("th", { text: "neuron" }), h("th", { class: "ce-num", text: "importance" }),
      h("th", { class: "ce-num", text: "mean sens." }), h("th", { text: `before (step ${fromStep ?? "?"}${mark(fromStep)})` }),
      h("th", { text: `after (step ${toStep}${mark(toStep)})` }),
    ])])]);
    const tbody = h("tbody");
    table.append(tbody);
    for (const [rank, r] of ranked.slice(0, 16).entries()) {
      const id = neuronId(imp.layer, r.channel);
      const before = h("div", { class: "ce-patches ce-patches-small" });
      const after = h("div", { class: "ce-patches ce-patches-small" });
      const link = h("button", { class: "ce-link", text: id, on: { click: () => app.detail.pin({ layer: imp.layer, channel: r.channel, run: run.run }) } });
      const tr = h("tr", { attrs: { tabindex: "-1" } }, [h("td", { class: "ce-muted", text: String(rank + 1) }), h("td", {}, [link]),
        h("td", { class: "ce-num", text: formatNumber(r.importance) }), h("td", { class: "ce-num", text: formatNumber(r.sensitivity) }),
        h("td", {}, [before]), h("td", {}, [after])]);
      // Hovering a row rings the neuron on every map beside the table.
      const ring = (on: boolean) => {
        app.hovered = on ? { layer: imp.layer, channel: r.channel, run: run.run } : null;
        for (const p of app.panels) { app.detail.placeRings(p); p.view.requestDraw(); }
      };
      tr.addEventListener("mouseenter", () => ring(true));
      tr.addEventListener("mouseleave", () => ring(false));
      tbody.append(tr);
      for (const [box, s] of [[before, fromStep], [after, toStep]] as const) {
        if (s === null) continue;
        app.api.neuron(run.run, imp.layer, r.channel, s)
          .then((story) => app.detail.fillPatches(box, run.run, story.stimuli.map((x) => ({ image: x.image, box: x.box })), 3))
          .catch(() => box.replaceChildren(h("span", { class: "ce-muted", text: "–" })));
      }
    }
    const flagged = imp.flagged?.length ? h("div", { class: "ce-muted", text: `${imp.flagged.length} neurons flagged (non-finite gradients) and left out.` }) : null;
    const revertBox = h("div", { class: "ce-revert" });
    body.replaceChildren(
      h("div", { class: "ce-row" }, [h("div", { class: "ce-muted", text: `Class ${imp.class_name ?? imp.class}: importance of each neuron's concept evolution from step ${fromStep ?? "?"} to ${toStep} (fraction of class images whose score rises with it).` }), highlight]),
      flagged ?? "", h("div", { class: "ce-imp-grid" }, [table, revertBox]));
    if (run.revert.some((x) => x.class === c.cls && x.steps.includes(c.step!))) {
      try {
        const rv = await app.api.revert(run.run, c.cls!, c.step!);
        const canvas = h("canvas", { attrs: { role: "img", "aria-label": "revert evaluation" } });
        revertChart(canvas, rv.bins, rv.accuracy_change, rv.accuracy_change_std, rv.random_change, rv.random_change_std,
          { width: 420, height: 190, title: `Revert evaluation (accuracy change; base ${(rv.base_accuracy * 100).toFixed(1)}%)` });
        revertBox.replaceChildren(h("h4", { text: "Reverting evolutions by importance bin" }), canvas,
          h("div", { class: "ce-muted", text: "Each bar: the neurons of one importance quartile have their activations replaced by those at the \"from\" step; grey band = as many random neurons." }));
      } catch (e) {
        revertBox.replaceChildren(status("error", (e as Error).message));
      }
    }
  } catch (e) {
    if (tabs.current(seq)) body.replaceChildren(status("error", (e as Error).message));
  }
}
