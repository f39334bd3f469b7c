// README screenshots of the real UI: a real `tensorboard` serving a log directory, Debian's
// headless chromium driven by playwright-core, the Concept Evolution tab set up as a user
// would (runs side by side, space, colouring, a clicked neuron, tabs).
//
//   cd frontend && node tests/screenshots.mjs --logdir /tmp/demo_logs --out ../docs/screenshots
//
// writes concept_map.png, neuron_story.png, metrics.png and importance.png.  The log
// directory is the demo's (`python demo/run.py --no-serve --logdir /tmp/demo_logs`).  The
// browser tests (tests/browser.mjs) call `takeReadmeScreenshots` on their own fixture, so
// the same code path runs in CI; the committed PNGs come from the demo logs.
//
// Options: --runs baseline,lr_too_high   --space conceptevo   --class 0   --neuron features.8:5
//          --width 1280 --height 800   (the text space has the anchors; conceptevo has none)
import { mkdirSync, statSync } from "node:fs";
import { resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { launchBrowser, openPluginTab, startTensorBoard } from "./harness.mjs";

const settle = (page, ms = 500) => page.waitForTimeout(ms);

/** Wait until every panel has its points and, after a step or option change, the expected step. */
async function waitForMaps(frame, runs) {
  await frame.waitForFunction((runs) => {
    const panels = window.__conceptevo.panels();
    return panels.length === runs.length && panels.every((p) => p.points > 0) &&
      !document.querySelector(".ce-panel .ce-status-loading");
  }, runs, { timeout: 60000 });
}

/** Wait until no spinner and no grey (still loading) patch is left in `selector`. */
async function waitForPatches(frame, selector) {
  await frame.waitForFunction((selector) => {
    const root = document.querySelector(selector);
    if (!root || root.querySelector(".ce-status-loading")) return false;
    const patches = [...root.querySelectorAll("canvas.ce-patch")];
    return patches.length > 0 && patches.every((c) => {
      const d = c.getContext("2d").getImageData(c.width / 2, c.height / 2, 1, 1).data;
      return d[3] > 0; // drawn (placeholders stay transparent)
    });
  }, selector, { timeout: 30000 });
}

async function setSelect(frame, label, value) {
  const s = frame.locator(`select[aria-label="${label}"]`);
  if ((await s.inputValue()) !== value) await s.selectOption(value);
}

/** The tabs share the screen with the maps: bring the tab content back to its top. */
async function showTabs(frame) {
  await frame.evaluate(() => document.querySelector(".ce-tabpanel")?.scrollTo(0, 0));
}

/** Select exactly `runs` in the sidebar (in the sidebar's order). */
async function chooseRuns(frame, runs) {
  const boxes = frame.locator(".ce-sidebar .ce-run[title]");
  const n = await boxes.count();
  for (let i = 0; i < n; i++) {
    const label = boxes.nth(i);
    const name = await label.getAttribute("title");
    const input = label.locator("input");
    const want = runs.includes(name);
    if ((await input.isChecked()) !== want) {
      await input.setChecked(want);
      await settle(frame.page(), 200);
    }
  }
}

/** Pick a neuron worth a story: one whose label changes most often over the steps (ties: highest similarity). */
async function interestingNeuron(frame, run, detector) {
  return frame.evaluate(async ({ run, detector }) => {
    const app = window.__conceptevo.app;
    const info = (await app.api.runs()).runs.find((r) => r.run === run);
    const layers = info.layers.filter((l) => l in (info.detectors[detector] ?? {}));
    let best = null, fallback = null;
    for (const layer of layers) {
      const steps = info.detectors[detector][layer];
      const per = await Promise.all(steps.map((s) => app.api.labels(run, detector, layer, s)));
      const channels = per[per.length - 1].top_concepts.length;
      for (let ch = 0; ch < channels; ch++) {
        const seq = per.map((l) => l.top_concepts[ch]?.[0] ?? null);
        const sims = per.map((l) => l.top_similarity[ch]?.[0] ?? 0);
        if (seq[seq.length - 1] === null) continue;
        // The papers' story shape: a neuron that changes what it detects a few times early
        // and then settles (long final span, strong final match); flickering ones score low.
        let changes = 0, settled = 1;
        for (let i = 1; i < seq.length; i++) if (seq[i] !== seq[i - 1]) changes++;
        while (settled < seq.length && seq[seq.length - 1 - settled] === seq[seq.length - 1]) settled++;
        const threshold = per[per.length - 1].threshold || 0;
        fallback ??= `${layer}:${ch}`;
        if (changes < 1 || changes > 4 || sims[sims.length - 1] < threshold) continue;
        // deeper layers tell the more interesting stories (shapes rather than colours)
        const depth = layers.indexOf(layer) / Math.max(1, layers.length - 1);
        const score = settled / seq.length + 4 * sims[sims.length - 1] + depth;
        if (!best || score > best.score) best = { id: `${layer}:${ch}`, score };
      }
    }
    return best?.id ?? fallback;
  }, { run, detector });
}

/**
 * Take the README screenshots on an open plugin tab.  `frame` is the plugin's frame from
 * `openPluginTab`; returns {name: path}.
 */
export async function takeReadmeScreenshots(page, frame, { out, runs, space = "text", cls = null, neuron = null,
  storyRun = null } = {}) {
  mkdirSync(out, { recursive: true });
  const shots = {};
  const shoot = async (name) => {
    await page.mouse.move(1, 1);
    await settle(page, 600);
    const path = resolve(out, `${name}.png`);
    await page.screenshot({ path });
    shots[name] = path;
  };

  // (a) runs side by side, concept categories, anchors, last step
  await chooseRuns(frame, runs);
  const spaces = await frame.locator('select[aria-label="space"] option').evaluateAll((o) => o.map((x) => x.value));
  await setSelect(frame, "space", spaces.includes(space) ? space : spaces[0]);
  await setSelect(frame, "layer", "all");
  await setSelect(frame, "colour by", "category");
  const anchors = frame.locator('input[aria-label="show anchors"]');
  if (!(await anchors.isDisabled()) && !(await anchors.isChecked())) await anchors.check();
  const slider = frame.locator('input[aria-label="training step"]');
  await slider.focus();
  await page.keyboard.press("End");
  await waitForMaps(frame, runs);
  await frame.click("button[data-fit=neurons]");
  await frame.click("button[data-tab=metrics]");
  await shoot("concept_map");

  // (b) neuron story: click a neuron whose label changes during training
  const run = storyRun ?? runs[0];
  const detector = await frame.locator('select[aria-label="detector"]').inputValue();
  const id = neuron ?? (detector ? await interestingNeuron(frame, run, detector) : null);
  if (id) {
    const pt = await frame.evaluate(({ run, id }) => window.__conceptevo.pointClient(run, id), { run, id });
    if (!pt) throw new Error(`neuron ${id} is not placed in run ${run}`);
    const box = await (await page.$("iframe")).boundingBox();
    await page.mouse.click(box.x + pt[0], box.y + pt[1]);
    await frame.waitForSelector(".ce-story-step", { timeout: 30000 });
    await waitForPatches(frame, ".ce-detail");
    await shoot("neuron_story");
  }

  // (c) metrics strip beside loss/accuracy, with the category bar charts under it
  await page.keyboard.press("Escape"); // the story closes: the maps and charts get its room
  await frame.click("button[data-tab=categories]");
  await frame.click("button[data-tab=metrics]");
  await frame.waitForSelector(".ce-strip canvas", { timeout: 30000 });
  await showTabs(frame);
  await frame.waitForSelector('.ce-tabpanel canvas[aria-label^="interpretable neurons"]', { timeout: 30000 }).catch(() => undefined);
  // the tab shares the screen with the maps: scroll it to the concept metrics (d_anchor onwards) and the category bars
  await frame.evaluate(() => {
    const panel = document.querySelector(".ce-tabpanel");
    const chart = panel.querySelector('canvas[aria-label^="d_anchor"]') ?? panel.querySelector(".ce-strip canvas");
    if (chart) panel.scrollTo(0, chart.getBoundingClientRect().top - panel.getBoundingClientRect().top + panel.scrollTop - 6);
  });
  await shoot("metrics");

  // (d) importance for a class, with the revert chart
  await frame.click("button[data-tab=importance]");
  await frame.waitForSelector(".ce-table tbody tr", { timeout: 30000 });
  if (cls !== null) {
    await setSelect(frame, "class", String(cls));
    await frame.waitForSelector(".ce-table tbody tr", { timeout: 30000 });
  }
  await frame.waitForSelector('canvas[aria-label="revert evaluation"]', { timeout: 30000 }).catch(() => undefined);
  await frame.click("text=Highlight top");
  await frame.locator(".ce-table tbody tr button.ce-link").first().click(); // the top neuron's story beside the table
  await frame.waitForSelector(".ce-story-step", { timeout: 30000 });
  await waitForPatches(frame, ".ce-table");
  await waitForPatches(frame, ".ce-detail");
  await showTabs(frame);
  await shoot("importance");
  return shots;
}

function parseArgs(argv) {
  const args = { logdir: null, out: "../docs/screenshots", runs: "baseline,lr_too_high", space: "text", class: "0",
    neuron: null, width: "1280", height: "800" };
  for (let i = 0; i < argv.length; i++) {
    const key = argv[i].replace(/^--/, "");
    if (!(key in args)) throw new Error(`unknown option ${argv[i]}; options: ${Object.keys(args).map((k) => `--${k}`).join(" ")}`);
    args[key] = argv[++i];
  }
  if (!args.logdir) throw new Error("usage: node tests/screenshots.mjs --logdir DIR [--out DIR] [--runs a,b] [--space S] [--class K]");
  return args;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const runs = args.runs.split(",").filter(Boolean);
  const tb = await startTensorBoard(resolve(args.logdir), { expectRuns: runs.length });
  const { context, close } = await launchBrowser({ width: Number(args.width), height: Number(args.height) });
  try {
    const page = context.pages()[0] ?? (await context.newPage());
    const errors = [];
    page.on("pageerror", (e) => errors.push(e.message));
    const frame = await openPluginTab(page, tb.url);
    const shots = await takeReadmeScreenshots(page, frame, {
      out: resolve(args.out), runs, space: args.space, cls: args.class === "" ? null : Number(args.class), neuron: args.neuron,
    });
    for (const [name, path] of Object.entries(shots)) console.log(`${name}: ${path} (${Math.round(statSync(path).size / 1024)} KB)`);
    if (errors.length) throw new Error(`page errors: ${errors.join("; ")}`);
  } finally {
    await close();
    tb.stop();
  }
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main().catch((e) => { console.error(e.stack || e); process.exit(1); });
}
