/**
 * Interpretable neurons per concept category and layer, one bar chart per shown run at
 * the current step, on one shared y-scale by default (so equal bars mean equal counts).
 */
import type { App } from "../app";
import type { CategoriesResponse, RunInfo } from "../api";
import { groupedBarChart } from "../charts";
import { runLetter, stepAtOrBefore, unionSteps } from "../data";
import { h, status } from "../dom";
import { Tabs, optionToggle } from "./tabs";

export async function renderCategories(app: App, tabs: Tabs, seq: number): Promise<void> {
  const detector = app.state.detector;
  if (!detector) { tabs.panel.replaceChildren(status("empty", "Choose a detector in the sidebar to count interpretable neurons per category.")); return; }
  const boxes = await categoryBoxes(app, detector, null);
  if (!tabs.current(seq)) return;
  tabs.panel.replaceChildren(h("div", { class: "ce-row" }, [optionToggle("same y-scale for all runs", !!app.state.sharedY, (on) => {
    app.state.sharedY = on; app.save(); tabs.renderContent();
  })]), h("div", { class: "ce-bars" }, boxes));
}

/** Per selected run: a bar chart of interpretable neurons per category and layer at the current step. */
export async function categoryBoxes(app: App, detector: string, width: number | null): Promise<HTMLElement[]> {
  const step = app.step;
  const rows: { run: RunInfo; s: number | null; data: CategoriesResponse | null; error: string | null }[] =
    await Promise.all(app.selectedRuns().map(async (run) => {
      const s = step === null ? null : stepAtOrBefore(unionSteps(Object.values(run.detectors[detector] ?? {})), step);
      if (s === null) return { run, s, data: null, error: "no labels from this detector" };
      try {
        return { run, s, data: await app.api.categories(run.run, detector, s), error: null };
      } catch (e) {
        return { run, s, data: null, error: (e as Error).message };
      }
    }));
  const counts = rows.flatMap(({ data }) => data ? data.layers.flatMap((l) => data.categories.map((c) => data.counts[l]?.[c] ?? 0)) : []);
  const shared = app.state.sharedY && rows.length > 1 ? Math.max(1, ...counts) : undefined;
  return rows.map(({ run, s, data, error }) => {
    const box = h("div", { class: "ce-strip-run" }, [h("h4", {}, [h("span", { class: "ce-run-letter", text: runLetter(app.runIndex(run.run)) }),
      ` ${run.run} · step ${s ?? "–"}${s !== null && s !== step ? ` (latest labels at or before step ${step})` : ""}`])]);
    if (!data) { box.append(status("empty", error ?? "no data")); return box; }
    // the values are drawn on hover; the accessible name carries them all for screen readers
    const values = data.layers.map((l) => `${l}: ${data.categories.map((c) => `${c} ${data.counts[l]?.[c] ?? 0}`).join(", ")}`).join("; ");
    const canvas = h("canvas", { attrs: { role: "img", "aria-label": `interpretable neurons per category and layer, run ${run.run}. ${values}` } });
    groupedBarChart(canvas, data.layers, data.categories, (layer, cat) => data.counts[layer]?.[cat] ?? 0,
      { width: width ?? Math.min(900, 120 + data.layers.length * Math.max(60, data.categories.length * 16)), height: width ? 150 : 190,
        title: `Interpretable neurons per category (${detector})${shared ? " · shared scale" : ""}`, max: shared });
    box.append(canvas);
    return box;
  });
}
