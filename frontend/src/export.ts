/**
 * Exports of what is on screen: PNG (the maps side by side with their titles), SVG
 * (vector points and anchor words), CSV (every neuron of every shown run: run, layer,
 * step, place, best concept, category, score, whether it passes the threshold, importance).
 */
import type { App } from "./app";
import { neuronId, runLetter, tableRows, toCsv, toSvg } from "./data";
import { download } from "./dom";
import { pointSize } from "./scatter";

function exportName(app: App, ext: string): string {
  const runs = app.panels.map((p) => p.run).join("+").replace(/[^A-Za-z0-9._+-]+/g, "_").slice(0, 80);
  return `conceptevo_${runs || "map"}_${app.state.space}_step${app.step ?? 0}.${ext}`;
}

export async function exportPng(app: App): Promise<void> {
  if (!app.panels.length) return;
  const blobs = await Promise.all(app.panels.map((p) => p.view.toPngBlob()));
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
    const p = app.panels[i];
    ctx.fillStyle = "#212121";
    ctx.font = "500 13px Roboto, Arial, sans-serif";
    ctx.fillText(`${runLetter(p.index)} · ${p.run} · step ${p.shownStep ?? ""}`, x, 16);
    ctx.drawImage(im, x, titleH);
    x += im.width + pad;
  });
  out.toBlob((b) => { if (b) download(exportName(app, "png"), b); }, "image/png");
}

export function exportSvg(app: App): void {
  const parts: string[] = [];
  let x = 0;
  let height = 0;
  for (const p of app.panels) {
    if (!p.points) continue;
    const points = p.points;
    const { width, height: hgt } = p.view.size;
    const col = p.view.colourBytes;
    const r = pointSize(points.channel.length) / 2;
    const svg = toSvg({
      width, height: hgt, title: `${p.run} step ${p.shownStep}`,
      points: p.view.screenPoints().map(({ x: sx, y: sy, i }) => ({
        x: sx, y: sy, r, id: neuronId(points.layers[points.layerIndex[i]], points.channel[i]),
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
  download(exportName(app, "svg"), new Blob([doc], { type: "image/svg+xml" }));
}

export function exportCsv(app: App): void {
  const rows = app.panels.filter((p) => p.points).flatMap((p) =>
    tableRows(p.points!, p.labels, app.importanceByRun.get(p.run) ?? null, p.run, p.shownStep));
  if (!rows.length) return;
  download(exportName(app, "csv"), new Blob([toCsv(rows)], { type: "text/csv" }));
}
