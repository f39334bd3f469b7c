/**
 * The metrics strip: the runs' own scalars (loss, accuracy) beside the concept metrics
 * (entropy, d_anchor, speed, interpretable fraction).  Runs are lines of one neutral ink
 * told apart by dash and letter; layers are hues, as on the map.  All charts share one
 * x-axis (the slider's steps), show values on hover and move the slider on click; each
 * concept metric says which direction means what.
 */
import type { App } from "../app";
import { LineSeries, lineChart } from "../charts";
import { METRIC_HINTS, PALETTE, RUN_DASHES, RUN_INKS, groupMetrics, orderTrainingTags, runLetter, wholeModel } from "../data";
import { h, select, status } from "../dom";
import { categoryBoxes } from "./categories";
import { type Tabs, optionToggle } from "./tabs";

const CONCEPT_METRICS = ["entropy", "d_anchor", "speed", "interpretable_fraction"];
let linesMode: "runs" | "layers" = "runs";

const metricTitle = (metric: string) => metric === "d_anchor" ? "d_anchor" : metric.replace(/_/g, " ");

function legendRow(entries: { label: string; colour: string; dash?: number[]; letter?: string }[]): HTMLElement {
  return h("div", { class: "ce-legend-row" }, entries.map((e) => {
    const sw = h("span", { class: e.dash ? "ce-dash" : "ce-swatch" });
    if (e.dash) sw.style.borderTop = `2px ${e.dash.length ? (e.dash[0] <= 2 ? "dotted" : "dashed") : "solid"} ${e.colour}`;
    else sw.style.background = e.colour;
    return h("span", { class: "ce-legend-item" }, [e.letter ? h("span", { class: "ce-run-letter", text: e.letter }) : null, sw, h("span", { text: e.label })]);
  }));
}

export async function renderMetrics(app: App, tabs: Tabs, seq: number): Promise<void> {
  const runs = app.selectedRuns();
  const panel = tabs.panel;
  if (!runs.length) { panel.replaceChildren(status("empty", "No run selected.")); return; }
  if (!panel.firstChild) panel.replaceChildren(status("loading", "Loading metrics…"));
  const rows = await Promise.all(runs.map(async (run) => {
    try {
      return { run, data: await app.api.metrics(run.run), error: null as string | null };
    } catch (e) {
      return { run, data: null, error: (e as Error).message };
    }
  }));
  if (!tabs.current(seq)) return;
  const runStyle = (run: string) => { const i = app.runIndex(run); return { colour: RUN_INKS[i % RUN_INKS.length], dash: RUN_DASHES[i % RUN_DASHES.length] }; };
  const compare = rows.length > 1 && linesMode === "runs";
  // As many charts per row as fit at >= 190 px.
  const available = Math.max(200, panel.clientWidth - 24);
  const gap = 16; // .ce-strip column gap
  const perRow = Math.max(1, Math.floor((available + gap) / (190 + gap)));
  const width = Math.floor((available - (perRow - 1) * gap) / perRow) - 2, height = 132;
  const step = app.step;
  const xRange: [number, number] | null = app.steps.length ? [app.steps[0], app.steps[app.steps.length - 1]] : null;
  const chart = (title: string, series: LineSeries[], label: string, hint?: string, yRange?: [number, number] | null) => {
    const canvas = h("canvas", { attrs: { "aria-label": label, role: "img" } });
    lineChart(canvas, series, { width, height, title, marker: step, xRange, hint, yRange, onStep: (s) => app.goToStep(s) });
    return canvas;
  };
  const linesChoice = rows.length > 1 ? h("div", { class: "ce-row" }, [h("span", { class: "ce-muted", text: "Lines" }),
    select([{ value: "runs", label: "one per run (whole model)" }, { value: "layers", label: "one per layer, a strip per run" }],
      linesMode, (v) => { linesMode = v as "runs" | "layers"; tabs.renderContent(); }, "metric lines"),
    linesMode === "layers" ? optionToggle("same y-scale in every strip", !!app.state.sharedY, (on) => { app.state.sharedY = on; app.save(); tabs.renderContent(); }) : null]) : null;
  if (compare) {
    const grouped = rows.map(({ run, data, error }) => ({ run, error, g: data ? groupMetrics(data.scalars, app.state.space) : null }));
    const tags = orderTrainingTags(grouped.flatMap((x) => x.g?.training.map((t) => t.tag) ?? [])).slice(0, 3);
    const strip = h("div", { class: "ce-strip" });
    for (const tag of tags) {
      strip.append(chart(tag, grouped.map(({ run, g }) => ({ name: `${runLetter(app.runIndex(run.run))} ${run.run}`, ...runStyle(run.run),
        points: g?.training.find((t) => t.tag === tag)?.points ?? [] })), `${tag} of the selected runs`, /loss/i.test(tag) ? "lower is better" : /acc/i.test(tag) ? "higher is better" : undefined));
    }
    for (const metric of CONCEPT_METRICS) {
      const per = grouped.map(({ run, g }) => ({ run, whole: wholeModel(g?.concept[metric] ?? []) }));
      if (!per.some((p) => p.whole.points.length)) continue;
      const mean = per.some((p) => p.whole.mean);
      strip.append(chart(`${metricTitle(metric)}${mean ? " (layer mean)" : ""}`, per.map(({ run, whole }) => ({
        name: `${runLetter(app.runIndex(run.run))} ${run.run}`, ...runStyle(run.run), points: whole.points })),
      `${metricTitle(metric)} of the selected runs`, METRIC_HINTS[metric]));
    }
    const errors = grouped.filter((x) => x.error).map((x) => status("error", `metrics of ${x.run.run}: ${x.error}`));
    // The category counts of every run in one row under the curves: what the runs' neurons detect now.
    const detector = app.state.detector;
    const barWidth = Math.min(420, Math.floor((available - (rows.length - 1) * 16) / rows.length) - 2);
    const bars = detector && barWidth >= 220 ? await categoryBoxes(app, detector, barWidth) : [];
    if (!tabs.current(seq)) return;
    panel.replaceChildren(h("div", { class: "ce-row ce-spread" }, [legendRow(rows.map(({ run }) => ({ label: run.run,
      letter: runLetter(app.runIndex(run.run)), ...runStyle(run.run) }))), linesChoice ?? ""]), ...errors, strip,
    bars.length ? h("div", { class: "ce-bars" }, bars) : "",
    h("div", { class: "ce-muted", text: `Concept metrics of the whole model in space "${app.state.space}" beside the runs' own scalars; orange rule = current step; click a chart to move there.` }));
    return;
  }
  // One strip per run: the same metric gets the same y-scale in every strip (toggle), so strips compare at a glance.
  const yRanges = new Map<string, [number, number]>();
  if (app.state.sharedY) {
    for (const { data } of rows) {
      if (!data) continue;
      const { concept, training } = groupMetrics(data.scalars, app.state.space);
      const add = (key: string, pts: [number, number][]) => {
        for (const [, v] of pts) {
          if (!Number.isFinite(v)) continue;
          const r = yRanges.get(key) ?? [v, v];
          yRanges.set(key, [Math.min(r[0], v), Math.max(r[1], v)]);
        }
      };
      for (const t of training) add(`t:${t.tag}`, t.points);
      for (const [metric, list] of Object.entries(concept)) for (const x of list) add(`c:${metric}`, x.points);
    }
  }
  const layerColour = (run: { layers: string[] }, l: string) => l === "all" ? "#424242" : PALETTE[Math.max(0, run.layers.indexOf(l)) % PALETTE.length];
  const out = rows.map(({ run, data, error }) => {
    const strip = h("div", { class: "ce-strip" });
    if (error || !data) {
      strip.append(status("error", `metrics of ${run.run}: ${error}`));
    } else {
      const { concept, training } = groupMetrics(data.scalars, app.state.space);
      let drawn = 0;
      for (const tag of orderTrainingTags(training.map((t) => t.tag)).slice(0, 3)) {
        strip.append(chart(tag, [{ name: tag, points: training.find((t) => t.tag === tag)!.points, colour: "#455a64" }], `${tag} of run ${run.run}`,
          undefined, yRanges.get(`t:${tag}`)));
        drawn++;
      }
      for (const metric of CONCEPT_METRICS) {
        const list = concept[metric];
        if (!list?.length) continue;
        strip.append(chart(metricTitle(metric), list.map((x) => ({ name: x.layer, points: x.points, colour: layerColour(run, x.layer) })),
          `${metricTitle(metric)} of run ${run.run}`, METRIC_HINTS[metric], yRanges.get(`c:${metric}`)));
        drawn++;
      }
      if (!drawn) strip.append(status("empty", "No scalars logged for this run yet."));
    }
    return h("div", { class: "ce-strip-run" }, [h("h4", {}, [h("span", { class: "ce-run-letter", text: runLetter(app.runIndex(run.run)) }), ` ${run.run}`]), strip]);
  });
  const layers = [...new Set(rows.flatMap(({ run }) => run.layers))];
  const first = (l: string) => rows.find(({ run }) => run.layers.includes(l))?.run ?? { layers: [] };
  panel.replaceChildren(
    h("div", { class: "ce-row ce-spread" }, [legendRow([...layers.map((l) => ({ label: l, colour: layerColour(first(l), l) })),
      { label: "whole model", colour: "#424242" }]), linesChoice ?? ""]),
    ...out, h("div", { class: "ce-muted", text: "Concept metrics: one line per layer, coloured as the layers on the map (dark = whole model); orange rule = current step." }));
}
