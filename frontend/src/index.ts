/**
 * Entry point TensorBoard loads in the plugin's iframe:
 * `import("./static/index.js").then((m) => m.render())`.
 *
 * Data routes resolve against the plugin's base URL (the directory above this
 * module), so the module also works when a page imports it directly (benchmarks).
 * Add `renderer=canvas` to the frame's query string to force the Canvas-2D path.
 */
import { Api, pluginBase } from "./api";
import { App } from "./app";
import { installStyles } from "./styles";

export function render(): void {
  performance.mark("conceptevo-render");
  installStyles(document);
  const root = document.createElement("div");
  root.className = "ce-root";
  document.body.replaceChildren(root);
  const params = new URLSearchParams(location.search);
  const app = new App(root, new Api(pluginBase(import.meta.url)), { forceCanvas: params.get("renderer") === "canvas" });
  void app.start();
}
