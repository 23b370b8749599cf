// The TypeScript declarations: an app's usage (and misuse that must not compile)
// type-checks against them, the module's JSDoc types hold, and the declarations
// name exactly what the module exports.
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import path from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

import * as client from "../src/index.js";

const pkg = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const tsc = path.join(pkg, "node_modules/typescript/bin/tsc");

function runTsc(args) {
  assert.ok(existsSync(tsc), "typescript is missing: run `npm ci` in clients/js");
  try {
    execFileSync(process.execPath, [tsc, ...args], { cwd: pkg, encoding: "utf8", stdio: "pipe" });
  } catch (e) {
    assert.fail(`tsc ${args.join(" ")}:\n${e.stdout}${e.stderr}`);
  }
}

test("an app's usage type-checks against index.d.ts, and each misuse in it is an error", { timeout: 120_000 }, () => {
  runTsc(["-p", "test/types/tsconfig.json"]);
});

test("src/index.js type-checks under its own JSDoc (strict)", { timeout: 120_000 }, () => {
  runTsc(["--noEmit", "--allowJs", "--checkJs", "--strict", "--target", "es2022", "--module", "nodenext",
    "--moduleResolution", "nodenext", "--lib", "es2022,dom", "src/index.js"]);
});

test("index.d.ts declares exactly what index.js exports", () => {
  const dts = readFileSync(path.join(pkg, "src/index.d.ts"), "utf8");
  const declared = [...dts.matchAll(/^export (?:const|function|class) (\w+)/gm)].map((m) => m[1]).sort();
  assert.deepEqual(declared, Object.keys(client).sort());
});
