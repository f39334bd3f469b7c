// Bundle src/index.ts into tb_conceptevo/static/index.js (one self-contained ES module).
// `node build.mjs --check` rebuilds into memory and fails when the committed bundle
// differs (stale bundle = frontend sources changed without `npm run build`).
import { build } from "esbuild";
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const outfile = join(here, "..", "tb_conceptevo", "static", "index.js");
const check = process.argv.includes("--check");

const result = await build({
  entryPoints: [join(here, "src", "index.ts")],
  bundle: true,
  format: "esm",
  target: "es2020",
  minify: true,
  // Deterministic output: no timestamps, no absolute paths, no source maps.
  sourcemap: false,
  legalComments: "none",
  charset: "utf8",
  banner: { js: "// tb_conceptevo frontend bundle, built from frontend/src by `npm run build`; do not edit." },
  write: !check,
  outfile,
  logLevel: "warning",
});

if (check) {
  const built = result.outputFiles[0].text;
  let committed = "";
  try {
    committed = readFileSync(outfile, "utf8");
  } catch {
    console.error(`missing bundle ${outfile}: run \`npm run build\` in frontend/`);
    process.exit(1);
  }
  if (built !== committed) {
    console.error(`stale bundle ${outfile}: it differs from a fresh build of frontend/src; run \`npm run build\` in frontend/ and commit it`);
    process.exit(1);
  }
  console.log(`bundle up to date (${built.length} bytes)`);
} else {
  console.log(`wrote ${outfile} (${readFileSync(outfile).length} bytes)`);
}
