// Shared helpers of the browser tests and the benchmark: writer-made fixture logs, a real
// `tensorboard` process on a free port, and Debian's chromium driven by playwright-core
// (never a downloaded browser).
import { spawn, spawnSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

export const FRONTEND = resolve(dirname(fileURLToPath(import.meta.url)), "..");
export const REPO = resolve(FRONTEND, "..");
const PYTHON = process.env.PYTHON || "python3";
export const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";

export function tempDir(prefix) {
  return mkdtempSync(join(tmpdir(), prefix));
}

export function freePort() {
  return new Promise((ok, fail) => {
    const srv = createServer();
    srv.unref();
    srv.on("error", fail);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => ok(port));
    });
  });
}

/** Run frontend/tests/make_fixture.py; returns its JSON summary. */
export function makeFixture(dir, args = []) {
  const r = spawnSync(PYTHON, [join(FRONTEND, "tests", "make_fixture.py"), dir, ...args], {
    cwd: REPO, encoding: "utf8", env: { ...process.env, PYTHONWARNINGS: "ignore" },
  });
  if (r.status !== 0) throw new Error(`make_fixture.py failed (${r.status}):\n${r.stderr}`);
  return JSON.parse(r.stdout.trim().split("\n").pop());
}

/** Start `tensorboard --logdir dir` on a free port and wait until the plugin lists `expectRuns` runs. */
export async function startTensorBoard(logdir, { expectRuns = 1, extraArgs = [], timeoutMs = 90000 } = {}) {
  const port = await freePort();
  const child = spawn(PYTHON, ["-m", "tensorboard.main", "--logdir", logdir, "--host", "127.0.0.1", "--port", String(port),
    "--reload_interval", "2", ...extraArgs], { cwd: REPO, stdio: ["ignore", "pipe", "pipe"], detached: false });
  let log = "";
  child.stdout.on("data", (d) => (log += d));
  child.stderr.on("data", (d) => (log += d));
  const url = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (child.exitCode !== null) throw new Error(`tensorboard exited (${child.exitCode}):\n${log}`);
    try {
      const r = await fetch(`${url}/data/plugin/conceptevo/runs`);
      if (r.ok) {
        const body = await r.json();
        if (body.runs.length >= expectRuns && body.runs.every((x) => Object.keys(x.spaces).length)) {
          return { url, port, child, log: () => log, stop: () => stopProcess(child) };
        }
      }
    } catch {
      /* not up yet */
    }
    await new Promise((r) => setTimeout(r, 300));
  }
  stopProcess(child);
  throw new Error(`tensorboard did not serve ${expectRuns} runs within ${timeoutMs} ms:\n${log}`);
}

export function stopProcess(child) {
  if (child.exitCode === null) {
    child.kill("SIGTERM");
    setTimeout(() => child.exitCode === null && child.kill("SIGKILL"), 3000).unref();
  }
}

export const CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync"];

/** Debian chromium with a fresh profile; returns {context, close}. */
export async function launchBrowser({ width = 1500, height = 1000, extraArgs = [] } = {}) {
  const profile = tempDir("ce-chromium-");
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM, headless: true, args: [...CHROMIUM_ARGS, ...extraArgs], acceptDownloads: true,
    viewport: { width, height }, deviceScaleFactor: 1,
  });
  return {
    context,
    close: async () => {
      await context.close();
      rmSync(profile, { recursive: true, force: true });
    },
  };
}

/** Open TensorBoard on the plugin's tab; returns the plugin's frame once its maps are drawn. */
export async function openPluginTab(page, url, { query = "" } = {}) {
  await page.goto(`${url}/${query}#conceptevo`);
  const handle = await page.waitForSelector("iframe", { timeout: 60000 });
  const frame = await handle.contentFrame();
  await frame.waitForFunction(() => document.body && document.body.dataset.conceptevoReady === "true", null, { timeout: 60000 });
  return frame;
}

/** Count connected blobs of non-background pixels in a PNG screenshot (runs inside the browser). */
export async function countBlobs(page, png, { minPixels = 4 } = {}) {
  const dataUrl = `data:image/png;base64,${png.toString("base64")}`;
  return page.evaluate(async ({ dataUrl, minPixels }) => {
    const img = new Image();
    img.src = dataUrl;
    await img.decode();
    const c = document.createElement("canvas");
    c.width = img.width;
    c.height = img.height;
    const ctx = c.getContext("2d");
    ctx.drawImage(img, 0, 0);
    const { data, width, height } = ctx.getImageData(0, 0, c.width, c.height);
    // "ink" = clearly coloured or dark pixel (the map background is white to #fbfbfb)
    const ink = new Uint8Array(width * height);
    for (let i = 0; i < width * height; i++) {
      const r = data[4 * i], g = data[4 * i + 1], b = data[4 * i + 2];
      const max = Math.max(r, g, b), min = Math.min(r, g, b);
      ink[i] = max - min > 40 || max < 200 ? 1 : 0;
    }
    const seen = new Uint8Array(width * height);
    const sizes = [];
    const stack = [];
    for (let s = 0; s < width * height; s++) {
      if (!ink[s] || seen[s]) continue;
      let size = 0;
      stack.push(s);
      seen[s] = 1;
      while (stack.length) {
        const p = stack.pop();
        size++;
        const x = p % width, y = (p - x) / width;
        for (const [dx, dy] of [[1, 0], [-1, 0], [0, 1], [0, -1]]) {
          const nx = x + dx, ny = y + dy;
          if (nx < 0 || ny < 0 || nx >= width || ny >= height) continue;
          const q = ny * width + nx;
          if (ink[q] && !seen[q]) { seen[q] = 1; stack.push(q); }
        }
      }
      if (size >= minPixels) sizes.push(size);
    }
    return { blobs: sizes.length, sizes };
  }, { dataUrl, minPixels });
}

/** Fraction of pixels that differ between two same-size PNG screenshots. */
export async function pixelDiff(page, pngA, pngB) {
  return page.evaluate(async ({ a, b }) => {
    const load = async (u) => { const i = new Image(); i.src = u; await i.decode(); return i; };
    const [ia, ib] = await Promise.all([load(a), load(b)]);
    const read = (img) => {
      const c = document.createElement("canvas");
      c.width = img.width; c.height = img.height;
      const ctx = c.getContext("2d");
      ctx.drawImage(img, 0, 0);
      return ctx.getImageData(0, 0, c.width, c.height).data;
    };
    const da = read(ia), db = read(ib);
    let diff = 0;
    for (let i = 0; i < da.length; i += 4) {
      if (Math.abs(da[i] - db[i]) + Math.abs(da[i + 1] - db[i + 1]) + Math.abs(da[i + 2] - db[i + 2]) > 30) diff++;
    }
    return diff / (da.length / 4);
  }, { a: `data:image/png;base64,${pngA.toString("base64")}`, b: `data:image/png;base64,${pngB.toString("base64")}` });
}
