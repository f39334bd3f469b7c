// Browser tests: a real `tensorboard` serving writer-made logs, Debian's headless
// chromium driven by playwright-core.  Run with `npm run test:browser` (exit code 1 on
// any failure).  Screenshots go to frontend/screenshots/ (look at them); the README's
// screenshots (docs/screenshots) are made by the same code on the demo logs:
//   node tests/screenshots.mjs --logdir /tmp/demo_logs --out ../docs/screenshots
//
//   node tests/browser.mjs            # all checks
//   KEEP=1 node tests/browser.mjs     # keep the fixture log directory
import assert from "node:assert/strict";
import { mkdirSync, readFileSync, rmSync, statSync } from "node:fs";
import { join } from "node:path";
import {
  FRONTEND, countBlobs, launchBrowser, makeFixture, openPluginTab, pixelDiff, startTensorBoard, tempDir,
} from "./harness.mjs";
import { takeReadmeScreenshots } from "./screenshots.mjs";

const SHOTS = join(FRONTEND, "screenshots");
mkdirSync(SHOTS, { recursive: true });
const results = [];
const pageErrors = [];

async function check(name, fn) {
  const t0 = Date.now();
  try {
    await fn();
    results.push({ name, ok: true });
    console.log(`PASS ${name} (${Date.now() - t0} ms)`);
  } catch (e) {
    results.push({ name, ok: false });
    console.log(`FAIL ${name}: ${e.stack || e}`);
  }
}

const logdir = tempDir("ce-browser-logs-");
const downloads = tempDir("ce-browser-downloads-");
console.log(`fixture logs in ${logdir}`);
const fixture = makeFixture(logdir);
const tb = await startTensorBoard(logdir, { expectRuns: 2 });
const { context, close } = await launchBrowser();
const page = context.pages()[0] ?? (await context.newPage());
page.on("pageerror", (e) => pageErrors.push(e.message));
page.on("console", (m) => {
  if (/Content Security Policy|Refused to/.test(m.text())) pageErrors.push(`CSP: ${m.text()}`);
});

let frame;
const panelBody = (run) => frame.locator(`.ce-panel[data-run="${run}"] .ce-panel-body`);
const iframeOffset = async () => {
  const box = await (await page.$("iframe")).boundingBox();
  return [box.x, box.y];
};
const settle = () => page.waitForTimeout(400);

try {
  await check("the tab loads inside TensorBoard with one map per run", async () => {
    frame = await openPluginTab(page, tb.url);
    const tab = page.getByText("Concept Evolution", { exact: false }).first();
    assert.ok(await tab.isVisible(), "TensorBoard shows a 'Concept Evolution' tab");
    const panels = await frame.evaluate(() => window.__conceptevo.panels());
    assert.deepEqual(panels.map((p) => p.run), fixture.runs);
    for (const p of panels) {
      assert.equal(p.points, fixture.n_placed, `${p.run}: placed points in the DOM state`);
      assert.equal(p.renderer, "webgl");
    }
    await page.screenshot({ path: join(SHOTS, "01_tab.png") });
  });

  await check("the map has the expected number of points drawn (pixels) and lists the unplaced", async () => {
    await frame.locator('input[aria-label="show anchors"]').uncheck();
    await page.mouse.move(2, 2);
    await settle();
    for (const run of fixture.runs) {
      const shot = await panelBody(run).screenshot();
      const { blobs } = await countBlobs(page, shot);
      assert.equal(blobs, fixture.n_placed, `${run}: ${blobs} blobs drawn, expected ${fixture.n_placed}`);
      const listed = await frame.locator(`.ce-panel[data-run="${run}"] .ce-unplaced li`).allTextContents();
      assert.deepEqual(listed.sort(), [...fixture.unplaced].sort());
    }
  });

  await check("moving the step slider (keyboard) changes the map", async () => {
    const before = await panelBody("baseline").screenshot();
    const stepBefore = await frame.locator('.ce-panel[data-run="baseline"]').getAttribute("data-step");
    const slider = frame.locator('input[aria-label="training step"]');
    await slider.focus();
    await page.keyboard.press("ArrowLeft");
    await frame.waitForFunction((s) => document.querySelector('.ce-panel[data-run="baseline"]').dataset.step !== s, stepBefore);
    await settle();
    const after = await panelBody("baseline").screenshot();
    const changed = await pixelDiff(page, before, after);
    assert.ok(changed > 0.002, `only ${(changed * 100).toFixed(3)}% of pixels changed`);
    const label = await frame.locator(".ce-step-label").textContent();
    assert.equal(label, `step ${fixture.steps[fixture.steps.length - 2]}`);
    const { blobs } = await countBlobs(page, after);
    assert.equal(blobs, fixture.n_placed);
    await page.screenshot({ path: join(SHOTS, "02_step_moved.png") });
  });

  await check("hovering a neuron shows its id, concept and example patches", async () => {
    await frame.locator('input[aria-label="show anchors"]').check();
    const [ox, oy] = await iframeOffset();
    const id = `${fixture.layers[1]}:2`;
    const pt = await frame.evaluate((id) => window.__conceptevo.pointClient("baseline", id), id);
    assert.ok(pt, "neuron is placed");
    await page.mouse.move(ox + pt[0], oy + pt[1]);
    await frame.waitForFunction(() => Number(document.querySelector(".ce-tooltip")?.dataset.patches) > 0, null, { timeout: 15000 });
    const tip = await frame.locator(".ce-tooltip").textContent();
    assert.ok(tip.includes(id), `tooltip names the neuron: ${tip}`);
    assert.match(tip, /sim \d/);
    const patchVariance = await frame.evaluate(() => [...document.querySelectorAll(".ce-tooltip canvas")].map((c) => {
      const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
      let min = 255, max = 0;
      for (let i = 0; i < d.length; i += 4) { min = Math.min(min, d[i + 1]); max = Math.max(max, d[i + 1]); }
      return max - min;
    }));
    assert.ok(patchVariance.length >= 3 && patchVariance.every((v) => v > 10), `patches have content: ${patchVariance}`);
    await page.screenshot({ path: join(SHOTS, "03_hover.png") });
  });

  await check("two runs side by side highlight the same neuron (hover ring in both, in pixels)", async () => {
    const id = `${fixture.layers[1]}:2`;
    const rings = await frame.evaluate(() => window.__conceptevo.panels().map((p) => p.ring));
    assert.ok(rings.every(Boolean), "ring set in every panel");
    const pt = await frame.evaluate((id) => window.__conceptevo.pointClient("high_lr", id), id);
    const box = await panelBody("high_lr").boundingBox();
    const [ox, oy] = await iframeOffset();
    const shot = await page.screenshot({ clip: { x: ox + pt[0] - 14, y: oy + pt[1] - 14, width: 28, height: 28 } });
    const orange = await page.evaluate(async (u) => {
      const i = new Image(); i.src = u; await i.decode();
      const c = document.createElement("canvas"); c.width = i.width; c.height = i.height;
      const ctx = c.getContext("2d"); ctx.drawImage(i, 0, 0);
      const d = ctx.getImageData(0, 0, c.width, c.height).data;
      let n = 0;
      for (let k = 0; k < d.length; k += 4) if (d[k] > 220 && d[k + 1] > 90 && d[k + 1] < 160 && d[k + 2] < 60) n++;
      return n;
    }, `data:image/png;base64,${shot.toString("base64")}`);
    assert.ok(box && orange > 20, `orange ring pixels around ${id} in the other run: ${orange}`);
  });

  await check("clicking a neuron shows its story (trajectory, label timeline, patches per step)", async () => {
    await page.mouse.down();
    await page.mouse.up();
    await frame.waitForSelector(".ce-story-step", { timeout: 15000 });
    const steps = await frame.locator(".ce-story-step").count();
    assert.equal(steps, fixture.steps.length);
    assert.ok(await frame.locator(".ce-span").count() >= 1);
    await page.mouse.move(2, 2);
    await settle();
    await page.screenshot({ path: join(SHOTS, "04_story.png") });
  });

  await check("search by id and by concept word", async () => {
    const search = frame.locator('input[aria-label="search neurons"]');
    await search.fill(`${fixture.layers[0]}:3`);
    assert.equal(await frame.locator(".ce-hits li").count(), 1);
    await search.fill("striped");
    await frame.waitForFunction(() => document.querySelectorAll(".ce-hits li").length > 0);
    const hits = await frame.locator(".ce-hits li .ce-why").allTextContents();
    assert.ok(hits.every((h) => h.includes("striped")), hits.join(","));
    await settle();
    await page.screenshot({ path: join(SHOTS, "05_search.png") });
    await search.fill("");
  });

  await check("exports download non-empty PNG, SVG and CSV files", async () => {
    const sizes = {};
    for (const kind of ["png", "svg", "csv"]) {
      const [dl] = await Promise.all([page.waitForEvent("download"), frame.click(`button[data-export=${kind}]`)]);
      const path = join(downloads, dl.suggestedFilename());
      await dl.saveAs(path);
      sizes[kind] = statSync(path).size;
      const head = readFileSync(path);
      if (kind === "png") assert.equal(head.subarray(1, 4).toString(), "PNG");
      if (kind === "svg") assert.match(head.toString(), /<svg[\s\S]*<circle/);
      if (kind === "csv") {
        const lines = head.toString().trim().split("\n");
        assert.equal(lines[0], "id,x,y,label,similarity,importance");
        assert.equal(lines.length - 1, fixture.n_placed + fixture.unplaced.length);
      }
    }
    assert.ok(Object.values(sizes).every((s) => s > 100), JSON.stringify(sizes));
  });

  await check("metrics, categories and importance tabs render", async () => {
    assert.ok(await frame.locator(".ce-strip canvas").count() >= 6, "metric charts");
    await frame.click("button[data-tab=categories]");
    await frame.waitForSelector('canvas[aria-label^="interpretable neurons"]');
    await frame.click("button[data-tab=importance]");
    await frame.waitForSelector(".ce-table tbody tr");
    await frame.waitForSelector('canvas[aria-label="revert evaluation"]');
    await frame.click("text=Highlight top");
    await frame.evaluate(() => document.querySelector(".ce-tabs").scrollIntoView());
    await settle();
    await page.screenshot({ path: join(SHOTS, "06_importance.png") });
    await frame.click("button[data-tab=metrics]");
  });

  await check("a new run appears without reload and the slider keeps its position", async () => {
    const slider = frame.locator('input[aria-label="training step"]');
    await slider.focus();
    await page.keyboard.press("Home");
    await page.keyboard.press("ArrowRight");
    const label = await frame.locator(".ce-step-label").textContent();
    makeFixture(logdir, ["--runs", "1", "--run-names", "late_run", "--steps", "6"]);
    await frame.waitForSelector('.ce-run[title="late_run"]', { timeout: 30000 });
    assert.equal(await frame.locator(".ce-step-label").textContent(), label);
    await frame.locator('.ce-run[title="late_run"] input').check();
    await frame.waitForFunction(() => window.__conceptevo.panels().length === 3 && window.__conceptevo.panels().every((p) => p.points > 0));
    assert.equal(await frame.locator(".ce-step-label").textContent(), label, "slider kept its step");
    await settle();
    await page.screenshot({ path: join(SHOTS, "07_three_runs.png") });
  });

  await check("the step survives a page reload", async () => {
    const label = await frame.locator(".ce-step-label").textContent();
    await page.reload();
    frame = await openPluginTab(page, tb.url);
    assert.equal(await frame.locator(".ce-step-label").textContent(), label);
  });

  await check("Canvas-2D fallback draws the same number of points", async () => {
    const p2 = await context.newPage();
    await p2.goto(`${tb.url}/data/plugin_entry.html?name=conceptevo&renderer=canvas`);
    await p2.waitForFunction(() => document.body.dataset.conceptevoReady === "true");
    await p2.locator('.ce-run[title="late_run"] input').uncheck();
    await p2.locator('input[aria-label="show anchors"]').uncheck();
    await p2.waitForFunction(() => window.__conceptevo.panels().length === 2 && window.__conceptevo.panels().every((p) => p.points > 0));
    await p2.mouse.move(2, 2);
    await p2.waitForTimeout(600);
    await p2.screenshot({ path: join(SHOTS, "08_canvas_fallback.png") });
    const panels = await p2.evaluate(() => window.__conceptevo.panels());
    assert.ok(panels.every((p) => p.renderer === "canvas"));
    const { blobs } = await countBlobs(p2, await p2.locator('.ce-panel[data-run="baseline"] .ce-panel-body').screenshot());
    assert.equal(blobs, fixture.n_placed);
    await p2.close();
  });

  await check("error state: a missing run says what is wrong (no endless spinner)", async () => {
    const p3 = await context.newPage();
    await p3.route("**/data/plugin/conceptevo/runs", (r) => r.fulfill({ status: 500, contentType: "application/json",
      body: JSON.stringify({ error: "simulated failure" }) }));
    await p3.goto(`${tb.url}/data/plugin_entry.html?name=conceptevo`);
    await p3.waitForSelector(".ce-status-error", { timeout: 15000 });
    assert.match(await p3.locator(".ce-status-error").textContent(), /simulated failure/);
    assert.equal(await p3.locator(".ce-spinner").count(), 0);
    await p3.close();
  });

  await check("README screenshots: the code path of tests/screenshots.mjs runs on the fixture", async () => {
    // The committed docs/screenshots come from the demo logs (see tests/screenshots.mjs);
    // here the same steps run on the fixture so a broken screenshot path fails the tests.
    await page.setViewportSize({ width: 1280, height: 800 });
    const shots = await takeReadmeScreenshots(page, frame, { out: join(SHOTS, "readme"), runs: fixture.runs.slice(0, 2) });
    assert.deepEqual(Object.keys(shots).sort(), ["concept_map", "importance", "metrics", "neuron_story"]);
    for (const path of Object.values(shots)) assert.ok(statSync(path).size > 10000, `${path} is not empty`);
  });

  await check("no page errors and no CSP violations", async () => {
    assert.deepEqual(pageErrors, []);
  });
} finally {
  await close();
  tb.stop();
  if (!process.env.KEEP) rmSync(logdir, { recursive: true, force: true });
  rmSync(downloads, { recursive: true, force: true });
}

const failed = results.filter((r) => !r.ok);
console.log(`\n${results.length - failed.length}/${results.length} browser checks passed; screenshots in ${SHOTS}`);
process.exit(failed.length ? 1 : 0);
