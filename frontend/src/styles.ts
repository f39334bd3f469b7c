/**
 * The stylesheet (a constant: no user data).  Installed as a constructed stylesheet,
 * which TensorBoard's CSP allows without inline <style> markup.
 */
export const CSS = `
:root { --accent: #f57c00; --accent-light: #ffe0b2; --text: #212121; --muted: #757575; --line: #e0e0e0;
  --bg: #f5f5f5; --card: #ffffff; --soft: #f5f5f5; --hover: #fff3e0; --map: #ffffff; --weak: #9e9e9e;
  font-family: Roboto, 'Helvetica Neue', Arial, sans-serif; }
/* TensorBoard's dark mode (body.dark-mode of its page) or the system's */
:root[data-theme=dark] { --accent-light: #5d4037; --text: #e8e8e8; --muted: #a8a8a8; --line: #4a4a4a; --bg: #303030;
  --card: #3a3a3a; --soft: #444; --hover: #4e3b2a; --map: #212124; --weak: #8a8a8a; color-scheme: dark; }
html, body { margin: 0; height: 100%; background: var(--bg); color: var(--text); font-size: 13px; }
* { box-sizing: border-box; }
button, input, select { font: inherit; color: inherit; }
.ce-app { display: grid; grid-template-columns: 240px minmax(0, 1fr) 0; height: 100vh; }
/* The story takes a column only while a neuron is pinned; the maps get the room otherwise. */
.ce-app:has(> .ce-detail[data-open=true]) { grid-template-columns: 240px minmax(0, 1fr) 340px; }
.ce-app:has(> .ce-detail.ce-detail-wide[data-open=true]) { grid-template-columns: 240px minmax(0, 1fr) min(46vw, 720px); }
.ce-sidebar { background: var(--card); border-right: 1px solid var(--line); overflow-y: auto; padding: 8px 0 16px; }
.ce-section { padding: 10px 16px; border-bottom: 1px solid var(--line); }
.ce-section h3 { margin: 0 0 8px; font-size: 11px; font-weight: 500; letter-spacing: .06em; text-transform: uppercase; color: var(--muted); }
.ce-field { display: flex; align-items: center; justify-content: space-between; gap: 8px; margin: 6px 0; }
.ce-field label { color: var(--muted); }
.ce-field select { max-width: 150px; }
select { border: 1px solid var(--line); border-radius: 3px; background: var(--card); padding: 3px 6px; min-height: 26px; }
select:focus, input:focus, button:focus-visible { outline: 2px solid var(--accent); outline-offset: 1px; }
.ce-run { display: flex; align-items: center; gap: 8px; padding: 3px 0; cursor: pointer; overflow: hidden; }
.ce-run input { accent-color: var(--accent); margin: 0; }
.ce-run-letter { display: inline-flex; align-items: center; justify-content: center; width: 16px; height: 16px; flex: none;
  border: 1.5px solid var(--text); border-radius: 3px; font-size: 10px; font-weight: 700; line-height: 1; color: var(--text); }
.ce-run-name { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.ce-run-meta { color: var(--muted); margin-left: auto; font-size: 11px; flex: none; }
.ce-seg { display: inline-flex; border: 1px solid var(--line); border-radius: 3px; overflow: hidden; }
.ce-seg button { border: 0; background: var(--card); padding: 4px 10px; cursor: pointer; }
.ce-seg button + button { border-left: 1px solid var(--line); }
.ce-seg button[aria-pressed=true] { background: var(--accent-light); color: #e65100; font-weight: 500; }
.ce-button { border: 1px solid var(--line); background: var(--card); border-radius: 3px; padding: 4px 10px; cursor: pointer; }
.ce-button:hover { background: var(--soft); border-color: #bdbdbd; }
.ce-button-primary { background: var(--accent); border-color: var(--accent); color: #fff; }
.ce-button-primary:hover { background: #ef6c00; }
.ce-row { display: flex; gap: 6px; flex-wrap: wrap; align-items: center; }
.ce-search { width: 100%; border: 1px solid var(--line); border-radius: 3px; padding: 5px 8px; background: var(--card); }
.ce-hits { margin: 6px 0 0; padding: 0; list-style: none; max-height: 180px; overflow-y: auto; }
.ce-hits li { padding: 3px 4px; cursor: pointer; border-radius: 3px; display: flex; justify-content: space-between; gap: 6px; }
.ce-hits li:hover { background: var(--hover); }
.ce-weak, .ce-hits li.ce-weak span { color: var(--weak); }
.ce-concept.ce-weak { font-style: italic; font-size: 12px; }
.ce-hits .ce-why { color: var(--muted); font-size: 11px; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.ce-mapbar { padding: 6px 16px 0; display: flex; flex-direction: column; gap: 3px; }
.ce-caption { color: var(--muted); font-size: 12px; line-height: 1.35; }
.ce-legend { display: flex; flex-wrap: wrap; gap: 2px 12px; align-items: center; max-height: 44px; overflow-y: auto; }
.ce-legend-item { display: flex; align-items: center; gap: 6px; }
.ce-legend-item .ce-swatch { width: 10px; height: 10px; border-radius: 50%; flex: none; }
.ce-main { overflow: hidden; display: flex; flex-direction: column; min-width: 0; height: 100vh; }
.ce-stepbar { position: sticky; top: 0; z-index: 3; display: flex; align-items: center; gap: 12px; padding: 8px 16px;
  background: var(--card); border-bottom: 1px solid var(--line); }
.ce-play { width: 32px; height: 32px; border-radius: 50%; border: 0; background: var(--accent); color: #fff; cursor: pointer;
  display: inline-flex; align-items: center; justify-content: center; flex: none; }
.ce-play:hover { background: #ef6c00; }
.ce-play svg { width: 16px; height: 16px; fill: currentColor; }
.ce-slider { flex: 1; accent-color: var(--accent); min-width: 80px; }
.ce-step-label { min-width: 88px; font-variant-numeric: tabular-nums; font-weight: 500; }
.ce-live { font-size: 11px; color: var(--muted); display: inline-flex; align-items: center; gap: 4px; }
.ce-live::before { content: ''; width: 7px; height: 7px; border-radius: 50%; background: #bdbdbd; }
.ce-live[data-live=true]::before { background: #43a047; }
.ce-banner { margin: 8px 16px 0; padding: 8px 12px; background: #fff8e1; border: 1px solid #ffe082; border-radius: 3px; color: #5d4037; }
/* The maps take what the step bar and the tabs leave; small multiples stay side by side. */
.ce-maps { flex: 1 1 0; min-height: 220px; display: grid; gap: 10px; padding: 8px 16px; grid-auto-rows: minmax(0, 1fr);
  grid-template-columns: repeat(auto-fit, minmax(260px, 1fr)); }
.ce-maps[data-count="2"] { grid-template-columns: repeat(2, minmax(180px, 1fr)); }
.ce-maps[data-count="3"] { grid-template-columns: repeat(3, minmax(180px, 1fr)); }
.ce-maps[data-count="4"] { grid-template-columns: repeat(4, minmax(160px, 1fr)); }
.ce-panel { background: var(--card); border-radius: 4px; box-shadow: 0 1px 2px rgba(0,0,0,.12), 0 1px 3px rgba(0,0,0,.08);
  display: flex; flex-direction: column; min-width: 0; min-height: 0; border-top: 3px solid var(--text); }
/* run identity = letter + the line style of its curves in the charts (never a hue) */
.ce-panel[data-run-index="1"] { border-top-style: dashed; }
.ce-panel[data-run-index="2"] { border-top-style: dotted; }
.ce-panel[data-run-index="3"] { border-top-style: double; }
.ce-panel-head { display: flex; align-items: center; gap: 8px; padding: 6px 10px 4px; }
.ce-panel-title { font-weight: 500; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.ce-panel-meta { color: var(--muted); font-size: 11px; margin-left: auto; white-space: nowrap; }
.ce-panel-body { position: relative; flex: 1 1 0; min-height: 160px; margin: 0 6px 6px; }
.ce-scatter { position: absolute; inset: 0; overflow: hidden; border-radius: 2px;
  background: var(--map); }
.ce-scatter-overlay:focus-visible { outline: 2px solid var(--accent); outline-offset: -2px; }
.ce-scatter canvas { position: absolute; inset: 0; width: 100%; height: 100%; }
.ce-scatter-overlay { cursor: crosshair; touch-action: none; }
.ce-panel-status { position: absolute; inset: 0; display: flex; align-items: center; justify-content: center; pointer-events: none; }
.ce-panel-status .ce-status { pointer-events: auto; background: rgba(255,255,255,.92); }
.ce-unplaced { padding: 0 12px 4px; color: var(--muted); font-size: 12px; }
.ce-unplaced summary { cursor: pointer; }
.ce-unplaced ul { margin: 4px 0 0; padding-left: 18px; max-height: 96px; overflow-y: auto; columns: 3; }
.ce-status { display: inline-flex; align-items: center; gap: 10px; padding: 10px 14px; border-radius: 4px; color: var(--muted); }
.ce-status-error { color: #c62828; background: #ffebee !important; border: 1px solid #ffcdd2; }
.ce-status-empty { color: var(--muted); }
.ce-page-status { display: flex; height: 100vh; align-items: center; justify-content: center; }
.ce-page-status .ce-status { max-width: 560px; background: #fff; box-shadow: 0 1px 3px rgba(0,0,0,.12); line-height: 1.5; }
.ce-spinner { width: 16px; height: 16px; border: 2px solid var(--accent-light); border-top-color: var(--accent);
  border-radius: 50%; animation: ce-spin .8s linear infinite; flex: none; }
@keyframes ce-spin { to { transform: rotate(360deg); } }
/* Tabs share the screen with the maps (the importance table and the map it highlights in view together). */
.ce-tabs { flex: 0 0 38vh; min-height: 170px; margin: 0 16px 10px; background: var(--card); border-radius: 4px;
  box-shadow: 0 1px 2px rgba(0,0,0,.12); display: flex; flex-direction: column; overflow: hidden; }
.ce-tabpanel { flex: 1 1 0; overflow: auto; }
.ce-toggle { display: inline-flex; align-items: center; gap: 4px; color: var(--muted); font-size: 12px; cursor: pointer; white-space: nowrap; }
.ce-toggle input { accent-color: var(--accent); margin: 0; }
.ce-speed { min-height: 24px; padding: 1px 4px; }
.ce-imp-grid { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
.ce-imp-grid > .ce-table { flex: 1 1 480px; width: auto; }
.ce-imp-grid > .ce-revert { flex: 0 1 430px; margin: 0; }
.ce-dash { display: inline-block; width: 18px; height: 0; flex: none; }
.ce-tablist { display: flex; border-bottom: 1px solid var(--line); padding: 0 8px; }
.ce-tab { border: 0; background: none; padding: 10px 14px; cursor: pointer; color: var(--muted); font-weight: 500;
  border-bottom: 2px solid transparent; text-transform: uppercase; font-size: 12px; letter-spacing: .04em; }
.ce-tab[aria-selected=true] { color: var(--accent); border-bottom-color: var(--accent); }
.ce-tabpanel { padding: 10px 12px; }
.ce-strip { display: flex; flex-wrap: wrap; gap: 8px 16px; align-items: flex-start; }
.ce-strip-run { margin-bottom: 10px; }
.ce-revert { margin: 8px 0 12px; }
.ce-revert h4 { margin: 0 0 4px; font-size: 12px; font-weight: 500; }
.ce-note { font-size: 11px; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.ce-bars { display: flex; flex-wrap: wrap; gap: 8px 16px; margin-top: 10px; }
.ce-bars canvas { background: var(--card); border: 1px solid var(--line); border-radius: 3px; }
.ce-spread { justify-content: space-between; margin-bottom: 8px; }
.ce-legend-row { display: flex; flex-wrap: wrap; gap: 4px 14px; align-items: center; }
.ce-legend-row .ce-legend-item .ce-swatch { width: 10px; height: 10px; border-radius: 50%; flex: none; }
.ce-strip-run h4 { margin: 0 0 4px; font-size: 12px; font-weight: 500; }
.ce-strip canvas { background: var(--card); border: 1px solid var(--line); border-radius: 3px; }
.ce-table { border-collapse: collapse; width: 100%; }
.ce-table th { text-align: left; font-weight: 500; color: var(--muted); font-size: 11px; padding: 4px 8px; border-bottom: 1px solid var(--line); }
.ce-table td { padding: 4px 8px; border-bottom: 1px solid var(--line); vertical-align: middle; }
.ce-table tr:hover td { background: var(--hover); }
.ce-table .ce-num { text-align: right; font-variant-numeric: tabular-nums; }
.ce-link { color: #e65100; cursor: pointer; text-decoration: none; border: 0; background: none; padding: 0; }
.ce-link:hover { text-decoration: underline; }
.ce-patches { display: flex; flex-wrap: wrap; gap: 3px; }
.ce-patch { width: 44px; height: 44px; border-radius: 2px; background: var(--soft); image-rendering: auto; }
.ce-patches-small .ce-patch { width: 32px; height: 32px; }
.ce-detail { background: var(--card); border-left: 1px solid var(--line); overflow-y: auto; padding: 12px 16px; }
.ce-detail h2 { font-size: 15px; font-weight: 500; margin: 0 0 2px; word-break: break-all; }
.ce-detail h3 { font-size: 11px; font-weight: 500; letter-spacing: .06em; text-transform: uppercase; color: var(--muted); margin: 14px 0 6px; }
.ce-concept { font-size: 14px; margin: 6px 0; }
.ce-concept b { font-weight: 500; }
.ce-chip { display: inline-block; padding: 1px 7px; border-radius: 10px; background: var(--soft); color: var(--muted); font-size: 11px; margin-left: 4px; }
.ce-muted { color: var(--muted); }
.ce-timeline { display: flex; flex-direction: column; gap: 2px; }
.ce-span { display: grid; grid-template-columns: 56px 1fr auto; gap: 6px; align-items: center; padding: 2px 0; }
.ce-span-track { position: relative; }
.ce-span-bar { height: 6px; border-radius: 3px; background: var(--accent); opacity: .75; }
.ce-span-bar.ce-span-weak { background: transparent; border: 1px dashed var(--weak); opacity: 1; height: 6px; }
.ce-span[data-interpretable=false] .ce-span-track > div:first-child { color: var(--weak); font-style: italic; }
.ce-now { position: absolute; top: -2px; bottom: -2px; width: 2px; margin-left: -1px; background: var(--text); opacity: .55; }
.ce-current { background: var(--hover); border-radius: 3px; }
.ce-story-step { display: grid; grid-template-columns: 56px 1fr; gap: 6px; align-items: center; margin: 2px 0; padding: 2px; }
.ce-story-cols { display: grid; grid-template-columns: repeat(auto-fit, minmax(240px, 1fr)); gap: 14px; }
.ce-story-col { min-width: 0; }
.ce-hint { font-size: 11px; margin-top: 4px; }
.ce-small { font-size: 11px; }
.ce-tooltip { position: fixed; z-index: 10; pointer-events: none; background: rgba(33,33,33,.94); color: #fff; border-radius: 4px;
  padding: 8px 10px; max-width: 290px; box-shadow: 0 2px 8px rgba(0,0,0,.3); }
.ce-tooltip .ce-tip-id { font-weight: 500; }
.ce-tooltip .ce-muted { color: #bdbdbd; }
.ce-tooltip .ce-weak { color: #bdbdbd; }
.ce-tooltip .ce-patch { background: #424242; }
.ce-hidden { display: none !important; }
.ce-empty-detail { color: var(--muted); line-height: 1.5; }
.ce-kbd { font-family: monospace; background: var(--soft); border: 1px solid var(--line); border-radius: 3px; padding: 0 4px; }
@media (max-width: 1440px) { .ce-app:has(> .ce-detail[data-open=true]) { grid-template-columns: 220px minmax(0, 1fr) 300px; } .ce-app { grid-template-columns: 220px minmax(0, 1fr) 0; } }
/* Narrow: the story is a drawer over the maps (Esc or "close" shuts it). */
@media (max-width: 1100px) {
  .ce-app, .ce-app:has(> .ce-detail[data-open=true]), .ce-app:has(> .ce-detail.ce-detail-wide[data-open=true]) { grid-template-columns: 200px minmax(0, 1fr) 0; }
  .ce-detail { position: fixed; top: 0; right: 0; bottom: 0; width: min(380px, 92vw); z-index: 20; box-shadow: -4px 0 16px rgba(0,0,0,.25);
    transform: translateX(105%); transition: transform .2s ease; }
  .ce-detail.ce-detail-wide { width: min(720px, 96vw); }
  .ce-detail[data-open=true] { transform: none; }
  .ce-stepbar { gap: 8px; padding: 6px 10px; }
}
.ce-detail[data-open=false] { overflow: hidden; padding: 0; border: 0; }
@media (max-height: 760px) { .ce-tabs { flex-basis: 34vh; } .ce-caption { font-size: 11px; } }
`;

export function installStyles(doc: Document): void {
  try {
    const sheet = new CSSStyleSheet();
    sheet.replaceSync(CSS);
    doc.adoptedStyleSheets = [...doc.adoptedStyleSheets, sheet];
  } catch {
    const style = doc.createElement("style");
    style.textContent = CSS;
    doc.head.append(style);
  }
}
