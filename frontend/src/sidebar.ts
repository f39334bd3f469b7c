/**
 * The sidebar (runs, space, layer, detector, colouring, tools, search, export) and the
 * bar above the maps (what a dot and its position mean, and the legend: always in view).
 */
import type { App } from "./app";
import { ColourBy, Legend, runLetter } from "./data";
import { h, select } from "./dom";
import { exportCsv, exportPng, exportSvg } from "./export";
import type { Tool } from "./scatter";
import { spaceCaption } from "./state";

export function renderSidebar(app: App): void {
  const info = app.runsInfo!;
  const state = app.state;
  const runsSection = h("div", { class: "ce-section" }, [h("h3", { text: "Runs" })]);
  info.runs.forEach((r, i) => {
    const box = h("input", { attrs: { type: "checkbox" } });
    box.checked = (state.runs ?? []).includes(r.run);
    box.addEventListener("change", () => toggleRun(app, r.run, box.checked));
    runsSection.append(h("label", { class: "ce-run", title: r.run }, [
      box, h("span", { class: "ce-run-letter", text: runLetter(i), attrs: { "aria-hidden": "true" } }),
      h("span", { class: "ce-run-name", text: r.run }),
      h("span", { class: "ce-run-meta", text: `${r.steps.length} steps` }),
    ]));
  });
  if (!info.comparable) {
    runsSection.append(h("div", { class: "ce-muted", text: "Runs use different probe sets: only runs of the same probe set are shown side by side." }));
  }
  const selected = app.selectedRuns();
  const spaces = [...new Set(selected.flatMap((r) => Object.keys(r.spaces)))];
  const detectors = [...new Set(selected.flatMap((r) => Object.keys(r.detectors)))];
  const layers = [...new Set(selected.flatMap((r) => r.layers))];
  const anchored = (s: string) => selected.some((r) => r.anchors.includes(s));
  const field = (label: string, control: HTMLElement) => h("div", { class: "ce-field" }, [h("label", { text: label }), control]);
  const view = h("div", { class: "ce-section" }, [
    h("h3", { text: "Map" }),
    field("Space", select(spaces.map((s) => ({ value: s, label: anchored(s) ? `${s} (anchors)` : s })), state.space ?? "", (v) => {
      state.space = v; app.save(); app.recomputeSteps(false); app.maps.reloadAll(true);
    }, "space")),
    field("Layer", select([{ value: "all", label: "all layers" }, ...layers.map((l) => ({ value: l, label: l }))],
      state.layer ?? "all", (v) => { state.layer = v; app.save(); app.recomputeSteps(false); app.maps.reloadAll(true); }, "layer")),
    field("Detector", select([...detectors.map((d) => ({ value: d, label: d })), { value: "", label: "none" }],
      state.detector ?? "", (v) => { state.detector = v; app.save(); app.maps.reloadAll(false); app.tabs.render(); }, "detector")),
    field("Colour by", select([
      { value: "layer", label: "layer" }, { value: "category", label: "concept category" }, { value: "group", label: "concept group" },
    ], state.colourBy ?? "layer", (v) => { state.colourBy = v as ColourBy; app.save(); app.maps.recolourAll(); }, "colour by")),
  ]);
  const toolButtons = (["pan", "box", "lasso"] as Tool[]).map((t) => {
    const b = h("button", { text: t[0].toUpperCase() + t.slice(1), attrs: { "aria-pressed": String(state.tool === t), "data-tool": t } });
    b.addEventListener("click", () => {
      state.tool = t; app.save();
      for (const p of app.panels) p.view.tool = t;
      toolButtons.forEach((x) => x.setAttribute("aria-pressed", String(x === b)));
    });
    return b;
  });
  const hasAnchors = anchored(state.space ?? "");
  const anchorsBox = h("input", { attrs: { type: "checkbox", "aria-label": "show anchors" } });
  anchorsBox.checked = !!state.anchors;
  anchorsBox.disabled = !hasAnchors;
  anchorsBox.addEventListener("change", () => {
    state.anchors = anchorsBox.checked; app.save();
    for (const p of app.panels) { p.view.overlay.showAnchors = anchorsBox.checked; p.view.requestDraw(); }
  });
  const tools = h("div", { class: "ce-section" }, [
    h("h3", { text: "Tools" }),
    h("div", { class: "ce-row" }, [h("div", { class: "ce-seg", attrs: { role: "group", "aria-label": "drag tool" } }, toolButtons),
      h("button", { class: "ce-button", text: "Fit", title: "Frame the neurons", attrs: { "data-fit": "neurons" }, on: { click: () => app.maps.fit(false) } }),
      hasAnchors ? h("button", { class: "ce-button", text: "Fit + anchors", title: "Frame the neurons and the anchor words",
        on: { click: () => app.maps.fit(true) } }) : null]),
    h("div", { class: "ce-muted", text: "Wheel zooms; shift-drag selects a box, alt-drag a lasso; click a neuron for its story. " +
      "On a focused map: arrows step, Enter opens the hovered neuron, Esc closes." }),
    h("label", { class: "ce-run", title: hasAnchors ? "" : "This space has no anchor words (the text space has)" }, [anchorsBox,
      h("span", { text: hasAnchors ? "Show anchors" : "No anchors in this space" })]),
    h("button", { class: "ce-link", text: "Clear selection", on: { click: () => { app.searchInput.value = ""; app.setSelection(null); } } }),
  ]);
  app.searchInput.oninput = () => app.detail.runSearch();
  app.searchInput.onkeydown = (e) => { if (e.key === "Enter") app.hitsBox.querySelector<HTMLElement>("li[tabindex]")?.click(); };
  const search = h("div", { class: "ce-section" }, [h("h3", { text: "Search" }), app.searchInput, app.hitsBox]);
  const exporter = h("div", { class: "ce-section" }, [
    h("h3", { text: "Export" }),
    h("div", { class: "ce-row" }, [
      h("button", { class: "ce-button", text: "PNG", attrs: { "data-export": "png" }, on: { click: () => void exportPng(app) } }),
      h("button", { class: "ce-button", text: "SVG", attrs: { "data-export": "svg" }, on: { click: () => exportSvg(app) } }),
      h("button", { class: "ce-button", text: "CSV", attrs: { "data-export": "csv" }, on: { click: () => exportCsv(app) } }),
    ]),
  ]);
  app.sidebar.replaceChildren(runsSection, view, tools, search, exporter);
  renderBanner(app);
}

function renderBanner(app: App): void {
  const warnings = app.runsInfo?.warnings ?? [];
  app.bannerBox.replaceChildren(...(warnings.length ? [h("div", { class: "ce-banner", attrs: { role: "status" } },
    warnings.slice(0, 5).map((w) => h("div", { text: w })))] : []));
}

/** Caption and legend above the maps (the legend of the first map; all maps share the colouring). */
export function renderLegend(app: App, legend: Legend | null): void {
  const space = app.state.space ?? "";
  const hasAnchors = app.selectedRuns().some((r) => r.anchors.includes(space));
  const items = (legend?.entries ?? []).map((e) => {
    const sw = h("span", { class: "ce-swatch" });
    sw.style.background = e.colour;
    return h("span", { class: "ce-legend-item" }, [sw, h("span", { text: e.label })]);
  });
  const colourBy = app.state.colourBy === "category" ? "concept category" : app.state.colourBy === "group" ? "concept group" : "layer";
  app.mapBar.replaceChildren(
    h("div", { class: "ce-caption", text: spaceCaption(space, hasAnchors) }),
    h("div", { class: "ce-legend", attrs: { "aria-label": "legend" } }, [h("span", { class: "ce-muted", text: `Colour = ${colourBy}:` }), ...items]),
  );
}

function toggleRun(app: App, run: string, on: boolean): void {
  let runs = (app.state.runs ?? []).filter((r) => r !== run);
  if (on) {
    const info = app.runsInfo!;
    if (!info.comparable) {
      const group = info.probe_groups.find((g) => g.runs.includes(run));
      runs = runs.filter((r) => group?.runs.includes(r));
    }
    runs.push(run);
    const order = info.runs.map((r) => r.run);
    runs.sort((a, b) => order.indexOf(a) - order.indexOf(b));
  }
  app.state.runs = runs; // may be empty: the user unticked every run, and that is what they see
  app.save();
  app.normalise();
  renderSidebar(app);
  app.maps.rebuildPanels();
  app.tabs.render();
}
