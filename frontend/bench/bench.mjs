// Frontend performance benchmark (issue 7), against a real TensorBoard and Debian's
// headless chromium (software WebGL through SwiftShader here, so every figure is
// compared with a reference measured in the same run):
//
//  1. 100,000 points: first draw after the plugin's frame starts loading   (<= 1.5 s)
//  2. pan/zoom: requestAnimationFrame interval while zooming, vs a bare WebGL
//     page drawing the same 100,000 points in the same browser               (<= 1.25x)
//  3. moving the slider on a 10,000-point map, fetch from TensorBoard included (<= 100 ms)
//  4. an animated step transition on a 26,000-point map (ResNet-50-sized layer set): frame
//     interval while points glide, vs the bare WebGL page drawing them       (<= 1.25x)
//
//  Frame intervals (2, 4, 5) are taken with the frame rate unlimited, medians and means
//  both held to the limit.
//
//  5. four runs of that 26,000-point map side by side: pan/zoom and step transition frame
//     intervals, vs a bare page with four WebGL canvases drawing the same points   (<= 1.25x)
//
//   BENCH_ONLY=transition node bench/bench.mjs   runs sections 4 and 5 alone
//   BENCH_ONLY=slider node bench/bench.mjs       runs section 3 alone
//   BENCH_ONLY=hover node bench/bench.mjs        runs section 6 alone
//
//  6. hover to the card with its patches (<= 100 ms warm) and the story of a neuron with all
//     its patches (<= 300 ms), on the test fixture (demo-sized maps with patches), timed in
//     the page from the pointer event to the last patch drawn
//   npm run bench            (or: node bench/bench.mjs)
import { rmSync } from "node:fs";
import { launchBrowser, makeFixture, startTensorBoard, tempDir } from "../tests/harness.mjs";

const median = (xs) => { const s = [...xs].sort((a, b) => a - b); const m = s.length >> 1; return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2; };
const mean = (xs) => xs.reduce((a, b) => a + b, 0) / xs.length;
const fmt = (v) => v.toFixed(1);
const verdict = (ok) => (ok ? "PASS" : "FAIL");
const STATE_KEY = "tb-conceptevo:state:v1";

const only = process.env.BENCH_ONLY || "";
const selected = (section) => !only || only === section;
const logdir = tempDir("ce-bench-logs-");
let t = Date.now();
if (!only) makeFixture(logdir, ["--runs", "1", "--run-names", "big100k", "--steps", "1", "--layers", "4", "--channels", "25000", "--no-extras", "--k", "3"]);
if (selected("slider")) makeFixture(logdir, ["--runs", "1", "--run-names", "slider10k", "--steps", "16", "--layers", "2", "--channels", "5000", "--no-extras", "--k", "3"]);
const QUAD_RUNS = ["quad_a", "quad_b", "quad_c", "quad_d"];
if (selected("transition")) {
  makeFixture(logdir, ["--runs", "4", "--run-names", QUAD_RUNS.join(","), "--steps", "3", "--layers", "2", "--channels", "13000", "--no-extras", "--k", "3"]);
  makeFixture(logdir, ["--runs", "1", "--run-names", "anim26k", "--steps", "3", "--layers", "2", "--channels", "13000", "--no-extras", "--k", "3"]);
}
const hoverFixture = selected("hover") ? makeFixture(logdir, ["--run-names", "hover_a,hover_b"]) : null;
console.log(`fixtures written in ${((Date.now() - t) / 1000).toFixed(1)} s`);
const tb = await startTensorBoard(logdir, { expectRuns: { "": 9, slider: 1, transition: 5, hover: 2 }[only] ?? 9, timeoutMs: 180000 });
// Frame intervals are timed with the frame rate unlimited (no vsync): an interval is then
// the frame's own cost, not the next 16.7 ms vsync tick (capped, both pages sit near one
// tick and medians flip between 16.7 and 33.3 ms from run to run on the same code).
// Load and slider times use a normal browser: unlimited, a running glide takes every
// core it can and slows the next fetch, which no user's browser does.
const browsers = [await launchBrowser({ width: 1400, height: 950 }),
  await launchBrowser({ width: 1400, height: 950, extraArgs: ["--disable-frame-rate-limit", "--disable-gpu-vsync"] })];
const [normal, unlimited] = browsers.map((b) => b.context);

const results = [];

async function pluginPage(runs, step, browser = normal) {
  const page = await browser.newPage();
  await page.addInitScript(([key, value]) => localStorage.setItem(key, value), [STATE_KEY, JSON.stringify({ runs, step, anchors: false })]);
  return page;
}

/**
 * A bare WebGL page drawing each of `layers` (`{positions, size, camera}`: one canvas and
 * one WebGL context per map, as the plugin has one per run) as 3 px points every frame,
 * framed by the plugin's own camera so both pages put the same points on the same pixels
 * (software GL's cost depends on where points land): the reference for frame intervals.
 */
async function barePage(layers) {
  const bare = await unlimited.newPage();
  await bare.setContent("<!doctype html><body style='margin:0;display:flex;flex-wrap:wrap'></body>");
  await bare.evaluate((layers) => {
    const views = layers.map(({ positions, size, camera }) => {
      const c = document.createElement("canvas");
      document.body.appendChild(c);
      c.width = size[0]; c.height = size[1];
      const gl = c.getContext("webgl", { antialias: false });
      const sh = (type, src) => { const s = gl.createShader(type); gl.shaderSource(s, src); gl.compileShader(s); return s; };
      const p = gl.createProgram();
      gl.attachShader(p, sh(gl.VERTEX_SHADER, "attribute vec2 a;uniform vec2 c;uniform vec2 k;void main(){gl_Position=vec4((a-c)*k,0.,1.);gl_PointSize=3.;}"));
      gl.attachShader(p, sh(gl.FRAGMENT_SHADER, "precision mediump float;void main(){gl_FragColor=vec4(.1,.5,.9,1.);}"));
      gl.linkProgram(p); gl.useProgram(p);
      const data = new Float32Array(positions);
      const b = gl.createBuffer(); gl.bindBuffer(gl.ARRAY_BUFFER, b); gl.bufferData(gl.ARRAY_BUFFER, data, gl.STATIC_DRAW);
      const a = gl.getAttribLocation(p, "a"); gl.enableVertexAttribArray(a); gl.vertexAttribPointer(a, 2, gl.FLOAT, false, 0, 0);
      return { gl, data, size, cx: camera.cx, cy: camera.cy, k0: camera.k, k: camera.k, uc: gl.getUniformLocation(p, "c"), uk: gl.getUniformLocation(p, "k") };
    });
    // zoom: in and out as the plugin's wheel test does; otherwise redraw at the plugin's framing
    window.measure = (frames, zoom) => new Promise((done) => {
      const stamps = [];
      let i = 0;
      if (!zoom) for (const v of views) v.k = v.k0;
      const loop = (ts) => {
        stamps.push(ts);
        for (const v of views) {
          const { gl } = v;
          if (zoom) v.k *= Math.exp((Math.floor(i / 30) % 2 ? -1 : 1) * 0.045);
          gl.clearColor(1, 1, 1, 1); gl.clear(gl.COLOR_BUFFER_BIT);
          gl.uniform2f(v.uc, v.cx, v.cy); gl.uniform2f(v.uk, (2 * v.k) / v.size[0], (2 * v.k) / v.size[1]);
          gl.drawArrays(gl.POINTS, 0, v.data.length / 2);
        }
        if (++i < frames) requestAnimationFrame(loop); else done(stamps.slice(1).map((s, j) => s - stamps[j]).slice(20));
      };
      requestAnimationFrame(loop);
    });
  }, layers);
  return bare;
}

/** Each shown panel's positions, canvas size and the camera now (the bare page's input). */
const panelLayers = (page) => page.evaluate(() => window.__conceptevo.app.panels.map((p) => {
  const r = p.view.element.getBoundingClientRect();
  const { cx, cy, k } = window.__conceptevo.app.camera;
  return { positions: Array.from(p.points.positions), size: [Math.round(r.width), Math.round(r.height)], camera: { cx, cy, k } };
}));

/** Median rAF interval while wheel-zooming the first map in and out (every linked map redraws). */
const measureZoom = (page, frames) => page.evaluate(async (frames) => {
  const canvas = document.querySelector(".ce-scatter-overlay");
  const r = canvas.getBoundingClientRect();
  const stamps = [];
  await new Promise((done) => {
    let i = 0;
    const loop = (ts) => {
      stamps.push(ts);
      canvas.dispatchEvent(new WheelEvent("wheel", { deltaY: (Math.floor(i / 30) % 2 ? 1 : -1) * 30, clientX: r.left + r.width / 2,
        clientY: r.top + r.height / 2, bubbles: true, cancelable: true }));
      if (++i < frames) requestAnimationFrame(loop); else done();
    };
    requestAnimationFrame(loop);
  });
  return stamps.slice(1).map((s, i) => s - stamps[i]).slice(20); // first 20 frames: warm-up
}, frames);

/**
 * Frame intervals of six animated step changes (every shown run glides; all steps' maps
 * are fetched first). Each panel schedules its own frames, so an interval is one panel's
 * own: the time between two animation frames in which that panel drew.
 */
const measureGlide = (page) => page.evaluate(async () => {
  const app = window.__conceptevo.app;
  const steps = window.__conceptevo.steps();
  await Promise.all(app.panels.flatMap((p) => steps.flatMap((s) => p.points.layers.map((l) => app.api.map(p.run, app.state.space, l, s)))));
  const intervals = [];
  for (let round = 0; round < 6; round++) {
    let draws = window.__conceptevo.panels().map((p) => p.draws);
    const lastDrawn = draws.map(() => null);
    app.setStepIndex((app.stepIndex + 1) % steps.length, true);
    await new Promise((done) => {
      const loop = (ts) => {
        const panels = window.__conceptevo.panels();
        panels.forEach((p, i) => {
          if (p.draws === draws[i]) return;
          if (lastDrawn[i] !== null) intervals.push(ts - lastDrawn[i]);
          lastDrawn[i] = ts;
        });
        draws = panels.map((p) => p.draws);
        if (panels.some((p) => p.animating)) requestAnimationFrame(loop); else done();
      };
      requestAnimationFrame(loop);
    });
  }
  return intervals;
});

/**
 * Plugin and bare page measured alternately, so load from other processes hits both alike.
 * With the frame rate unlimited an interval is the frame's own cost, so medians compare;
 * the verdicts ask the median and the mean both to meet the limit.
 */
async function paired(page, bare, measurePlugin, frames, zoom) {
  const plugin = [], reference = [];
  for (let round = 0; round < 3; round++) {
    await page.bringToFront();
    plugin.push(...await measurePlugin());
    await bare.bringToFront();
    reference.push(...await bare.evaluate(([frames, zoom]) => window.measure(frames, zoom), [frames, zoom]));
  }
  return [median(plugin), median(reference), plugin.length, mean(plugin), mean(reference)];
}

try {
  if (!only) {
  // ---------------------------------------------------------------- 1. first draw, 100k points
  const firstDraws = [];
  for (let i = 0; i < 4; i++) {
    const page = await pluginPage(["big100k"], 0);
    await page.goto(`${tb.url}/data/plugin_entry.html?name=conceptevo`);
    await page.waitForFunction(() => document.body?.dataset.conceptevoReady === "true", null, { timeout: 60000 });
    const ms = await page.evaluate(() => performance.getEntriesByName("conceptevo-first-draw")[0].startTime);
    const phases = await page.evaluate(() => ["conceptevo-render", "conceptevo-runs", "conceptevo-maps", "conceptevo-first-draw"]
      .map((n) => `${n.replace("conceptevo-", "")} ${Math.round(performance.getEntriesByName(n)[0]?.startTime ?? -1)}`).join(", "));
    console.log(`  load ${i}: ${phases} ms`);
    const points = await page.evaluate(() => window.__conceptevo.panels()[0].points);
    if (points < 99990) throw new Error(`expected ~100k points, drew ${points}`);
    firstDraws.push(ms);
    await page.close();
  }
  const cold = firstDraws[0], warm = median(firstDraws.slice(1));
  console.log(`first draw of 100,000 points after the frame starts loading: cold server ${fmt(cold)} ms, warm median ${fmt(warm)} ms ` +
    `(runs: ${firstDraws.map(fmt).join(", ")})`);
  results.push(["first draw 100k (cold server) <= 1500 ms", cold <= 1500]);
  results.push(["first draw 100k (warm) <= 1500 ms", warm <= 1500]);

  // ---------------------------------------------------------------- 2. pan/zoom frame interval
  const page = await pluginPage(["big100k"], 0, unlimited);
  await page.goto(`${tb.url}/data/plugin_entry.html?name=conceptevo`);
  await page.waitForFunction(() => document.body?.dataset.conceptevoReady === "true", null, { timeout: 60000 });
  const frames = 100;
  await page.waitForTimeout(2000); // let the page settle (tabs, polling) before timing frames
  const layers = await panelLayers(page);
  const size = layers[0].size;
  const bare = await barePage(layers);
  const [mp, mb, , ap0, ab0] = await paired(page, bare, () => measureZoom(page, frames), frames, true);
  const draws = await page.evaluate(() => window.__conceptevo.panels()[0].draws);
  await bare.close();
  await page.close();
  console.log(`pan/zoom with 100,000 points (${size[0]}x${size[1]} px, ${draws} redraws): median frame interval plugin ${fmt(mp)} ms, ` +
    `bare WebGL page ${fmt(mb)} ms, ratio ${(mp / mb).toFixed(2)}x; mean ${fmt(ap0)} vs ${fmt(ab0)} ms, ratio ${(ap0 / ab0).toFixed(2)}x`);
  results.push(["pan/zoom frame interval <= 1.25x bare WebGL (median and mean)", mp <= 1.25 * mb && ap0 <= 1.25 * ab0]);

  }
  if (selected("slider")) {
  // ---------------------------------------------------------------- 3. slider on 10k points
  const sp = await pluginPage(["slider10k"], 0);
  await sp.goto(`${tb.url}/data/plugin_entry.html?name=conceptevo`);
  await sp.waitForFunction(() => document.body?.dataset.conceptevoReady === "true", null, { timeout: 60000 });
  const moves = await sp.evaluate(async () => {
    const slider = document.querySelector('input[aria-label="training step"]');
    const steps = window.__conceptevo.steps();
    const fetchTimes = [];
    const move = (index) => new Promise((done) => {
      const t0 = performance.now();
      const onDrawn = (e) => {
        if (e.detail.step !== steps[index]) return;
        document.removeEventListener("conceptevo:drawn", onDrawn);
        const maps = performance.getEntriesByType("resource").filter((r) => r.name.includes("/map?") && r.startTime >= t0 &&
          new URL(r.name).searchParams.get("step") === String(steps[index]));
        fetchTimes.push(maps.length ? Math.max(...maps.map((r) => r.responseEnd)) - t0 : 0);
        done(performance.now() - t0);
      };
      document.addEventListener("conceptevo:drawn", onDrawn);
      slider.value = String(index);
      slider.dispatchEvent(new Event("input", { bubbles: true }));
    });
    const out = { fetched: [], prefetched: [], fetchTimes, points: window.__conceptevo.panels()[0].points };
    await new Promise((r) => setTimeout(r, 300));
    // jumps to steps never loaded or prefetched: the fetch from TensorBoard is included
    for (const i of [8, 4, 12, 15, 2, 10, 6]) { out.fetched.push(await move(i)); await new Promise((r) => setTimeout(r, 150)); }
    out.fetchOnly = fetchTimes.slice();
    // then the user's usual drag to the next step (prefetched)
    for (const i of [1, 2, 3, 4, 5]) { out.prefetched.push(await move(i)); await new Promise((r) => setTimeout(r, 150)); }
    return out;
  });
  await sp.close();
  const mf = median(moves.fetched), mpf = median(moves.prefetched);
  console.log(`slider on a ${moves.points.toLocaleString()}-point map: fetch+draw median ${fmt(mf)} ms (max ${fmt(Math.max(...moves.fetched))}; ` +
    `${moves.fetched.map(fmt).join(", ")}), of which waiting for TensorBoard's /map answers median ${fmt(median(moves.fetchOnly))} ms; ` +
    `next step (prefetched) median ${fmt(mpf)} ms`);
  results.push(["slider move on 10k map incl. fetch <= 100 ms (median)", mf <= 100]);
  }

  if (selected("transition")) {
  // ---------------------------------------------------------------- 4. animated step transition, 26k points
  const ap = await pluginPage(["anim26k"], 0, unlimited);
  await ap.goto(`${tb.url}/data/plugin_entry.html?name=conceptevo`);
  await ap.waitForFunction(() => document.body?.dataset.conceptevoReady === "true", null, { timeout: 60000 });
  await ap.waitForTimeout(2000);
  const alayers = await panelLayers(ap);
  const asize = alayers[0].size;
  const glidePoints = alayers[0].positions.length / 2;
  const abare = await barePage(alayers);
  const [mg, mbg, glideFrames, ag, abg] = await paired(ap, abare, () => measureGlide(ap), 60, false);
  await abare.close();
  await ap.close();
  console.log(`step transition on a ${glidePoints.toLocaleString()}-point map (${asize[0]}x${asize[1]} px, ${glideFrames} frames): ` +
    `median frame interval plugin ${fmt(mg)} ms (${fmt(1000 / mg)} fps), bare WebGL page ${fmt(mbg)} ms, ratio ${(mg / mbg).toFixed(2)}x; ` +
    `mean ${fmt(ag)} ms (${fmt(1000 / ag)} fps) vs ${fmt(abg)} ms, ratio ${(ag / abg).toFixed(2)}x`);
  results.push(["step transition frame interval <= 1.25x bare WebGL (median and mean)", mg <= 1.25 * mbg && ag <= 1.25 * abg]);

  // ---------------------------------------------------------------- 5. four runs of a 26k-neuron map side by side
  const qp = await pluginPage(QUAD_RUNS, 0, unlimited);
  await qp.goto(`${tb.url}/data/plugin_entry.html?name=conceptevo`);
  await qp.waitForFunction((n) => document.body?.dataset.conceptevoReady === "true" && window.__conceptevo.panels().length === n &&
    window.__conceptevo.panels().every((p) => p.points > 0), QUAD_RUNS.length, { timeout: 120000 });
  await qp.waitForTimeout(2000);
  const qlayers = await panelLayers(qp);
  const qbare = await barePage(qlayers);
  const [mqz, mqzb, , aqz, aqzb] = await paired(qp, qbare, () => measureZoom(qp, 100), 100, true);
  const [mqg, mqgb, qframes, aqg, aqgb] = await paired(qp, qbare, () => measureGlide(qp), 60, false);
  await qbare.close();
  await qp.close();
  const qdesc = `${qlayers.length} runs x ${(qlayers[0].positions.length / 2).toLocaleString()} points (${qlayers[0].size[0]}x${qlayers[0].size[1]} px each)`;
  console.log(`pan/zoom, ${qdesc}: median frame interval plugin ${fmt(mqz)} ms, bare WebGL page (${qlayers.length} canvases) ${fmt(mqzb)} ms, ` +
    `ratio ${(mqz / mqzb).toFixed(2)}x; mean ${fmt(aqz)} vs ${fmt(aqzb)} ms, ratio ${(aqz / aqzb).toFixed(2)}x`);
  console.log(`step transition, ${qdesc}, ${qframes} frames: median frame interval plugin ${fmt(mqg)} ms (${fmt(1000 / mqg)} fps), ` +
    `bare WebGL page ${fmt(mqgb)} ms, ratio ${(mqg / mqgb).toFixed(2)}x; mean ${fmt(aqg)} ms (${fmt(1000 / aqg)} fps) vs ${fmt(aqgb)} ms, ` +
    `ratio ${(aqg / aqgb).toFixed(2)}x`);
  results.push([`pan/zoom, ${qlayers.length} runs x 26k, frame interval <= 1.25x bare WebGL (median and mean)`,
    mqz <= 1.25 * mqzb && aqz <= 1.25 * aqzb]);
  results.push([`step transition, ${qlayers.length} runs x 26k, frame interval <= 1.25x bare WebGL (median and mean)`,
    mqg <= 1.25 * mqgb && aqg <= 1.25 * aqgb]);
  }
  if (selected("hover")) {
  // ---------------------------------------------------------------- 6. hover card and story with patches
  const hp = await pluginPage(["hover_a"], 0);
  await hp.goto(`${tb.url}/data/plugin_entry.html?name=conceptevo`);
  await hp.waitForFunction(() => document.body?.dataset.conceptevoReady === "true" && window.__conceptevo.panels()[0]?.points > 0,
    null, { timeout: 60000 });
  await hp.locator('input[aria-label="show anchors"]').uncheck();
  await hp.waitForTimeout(1000);
  const layers = hoverFixture.layers;
  // six placed neurons, from both layers, in sight and apart from the ones hovered before
  const ids = await hp.evaluate(([layers]) => {
    const out = [];
    for (let c = 0; c < 16 && out.length < 6; c++) for (const l of layers) {
      const p = window.__conceptevo.pointClient("hover_a", `${l}:${c}`);
      if (p && out.length < 6) out.push(`${l}:${c}`);
    }
    return out;
  }, [layers]);
  if (ids.length < 6) throw new Error(`only ${ids.length} placed neurons found`);
  // in the page: pointer event time -> the card (or story) says all its patches are drawn
  await hp.evaluate(() => {
    const overlay = document.querySelector(".ce-scatter-overlay");
    window.__benchT0 = 0;
    overlay.addEventListener("pointermove", (e) => { window.__benchT0 = e.timeStamp; }, true);
    overlay.addEventListener("pointerdown", (e) => { window.__benchT0 = e.timeStamp; }, true);
  });
  const until = (test, arg) => hp.evaluate(([test, arg]) => new Promise((done) => {
    const check = new Function("arg", test);
    const loop = () => (check(arg) ? done(performance.now() - window.__benchT0) : requestAnimationFrame(loop));
    loop();
  }), [test, arg]);
  const cardReady = "return document.querySelector('.ce-tooltip .ce-tip-id')?.textContent === arg && Number(document.querySelector('.ce-tooltip')?.dataset.patches) > 0;";
  const storyReady = "const b = document.querySelector('.ce-story [data-patches], .ce-detail [data-patches]'); return !!b && Number(b.dataset.patches) > 0 && document.querySelector('.ce-detail')?.textContent.includes(arg);";
  const hoverTimes = { cold: [], warm: [] };
  const storyTimes = [], storyPatches = [];
  for (const round of ["cold", "warm"]) {
    for (const id of ids) {
      const [x, y] = await hp.evaluate((id) => window.__conceptevo.pointClient("hover_a", id), id);
      await hp.mouse.move(x + 60, y + 60);
      await hp.mouse.move(2, 2);
      await hp.waitForTimeout(150);
      await hp.mouse.move(x, y);
      hoverTimes[round].push(await until(cardReady, id));
      if (round === "warm") {
        await hp.mouse.down();
        await hp.mouse.up();
        storyTimes.push(await until(storyReady, id));
        storyPatches.push(await hp.evaluate(() => Number(document.querySelector(".ce-detail [data-patches]").dataset.patches)));
        await hp.keyboard.press("Escape");
        await hp.waitForTimeout(150);
      }
    }
  }
  await hp.close();
  console.log(`hover to card with patches: cold median ${fmt(median(hoverTimes.cold))} ms (${hoverTimes.cold.map(fmt).join(", ")}), ` +
    `warm median ${fmt(median(hoverTimes.warm))} ms (${hoverTimes.warm.map(fmt).join(", ")}; 40 ms of it a deliberate debounce)`);
  console.log(`story with all patches after a click (${Math.min(...storyPatches)}-${Math.max(...storyPatches)} patches): ` +
    `median ${fmt(median(storyTimes))} ms (${storyTimes.map(fmt).join(", ")})`);
  results.push(["hover to card with patches <= 100 ms (warm, median)", median(hoverTimes.warm) <= 100]);
  results.push(["story with all patches <= 300 ms (median)", median(storyTimes) <= 300]);
  }
} finally {
  for (const b of browsers) await b.close();
  tb.stop();
  rmSync(logdir, { recursive: true, force: true });
}
console.log("");
for (const [name, ok] of results) console.log(`${verdict(ok)}  ${name}`);
process.exit(results.every(([, ok]) => ok) ? 0 : 1);
