/**
 * The tabs beside the maps (metrics, categories, importance).  Each tab's content is a
 * function of the app's state at the current step; a newer render supersedes an older
 * one still waiting for data (`seq`).
 */
import type { App } from "../app";
import { h } from "../dom";
import { renderCategories } from "./categories";
import { renderImportance } from "./importance";
import { renderMetrics } from "./metrics";

export class Tabs {
  readonly element = h("section", { class: "ce-tabs" });
  readonly panel = h("div", { class: "ce-tabpanel" });
  seq = 0;

  constructor(private readonly app: App) {}

  render(withContent = true): void {
    const tabs: [string, string][] = [["metrics", "Metrics"], ["categories", "Categories"], ["importance", "Importance"]];
    const state = this.app.state;
    if (!state.tab) state.tab = "metrics";
    const list = h("div", { class: "ce-tablist", attrs: { role: "tablist" } }, tabs.map(([key, label]) => {
      const b = h("button", { class: "ce-tab", text: label, attrs: { role: "tab", "aria-selected": String(state.tab === key), "data-tab": key } });
      b.addEventListener("click", () => { state.tab = key; this.app.save(); this.render(); });
      return b;
    }));
    this.element.dataset.tab = state.tab;
    this.element.replaceChildren(list, this.panel);
    if (withContent) this.renderContent();
  }

  renderContent(): void {
    const seq = ++this.seq;
    const tab = this.app.state.tab;
    if (tab === "metrics") void renderMetrics(this.app, this, seq);
    else if (tab === "categories") void renderCategories(this.app, this, seq);
    else void renderImportance(this.app, this, seq);
  }

  /** Is render `seq` still the latest? */
  current(seq: number): boolean {
    return seq === this.seq;
  }
}

/** A small "name: toggle" checkbox for tab options. */
export function optionToggle(label: string, checked: boolean, changed: (on: boolean) => void, title = ""): HTMLElement {
  const box = h("input", { attrs: { type: "checkbox", "aria-label": label } });
  box.checked = checked;
  box.addEventListener("change", () => changed(box.checked));
  return h("label", { class: "ce-toggle", title }, [box, h("span", { text: label })]);
}
