#!/usr/bin/env node
/**
 * The published package.json differs from the development one in one way:
 * no `source` export condition. In this repository `source` maps `oncely/x`
 * to `src/x.ts` (tests, the reference system and benchmarks run with
 * `--conditions=source`), but `src/` is not shipped, so in the tarball the
 * condition would point at missing files for anyone whose tooling sets it.
 * npm cannot override `exports` at publish time, so `npm pack` and
 * `npm publish` run:
 *
 *   prepack:  node scripts/pack-manifest.mjs clean, npm run build, node scripts/pack-manifest.mjs strip
 *   postpack: node scripts/pack-manifest.mjs restore
 *
 * `strip` keeps the development manifest in BACKUP and writes the published
 * one; `restore` moves BACKUP back. A pack that dies between the two leaves
 * BACKUP behind: the next `strip` and `npm test` (pretest) restore it first,
 * so the development manifest is never lost nor silently replaced.
 *
 * Plain JavaScript without dependencies: it runs from a bare clone.
 *
 * Usage: node scripts/pack-manifest.mjs clean|strip|restore|print [dir]
 * (dir: the package root, default the current directory).
 */
import { existsSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

const BACKUP = '.package.json.development';

/** The published manifest: `manifest` without `source` conditions. Throws if an export would point into src/. */
function publishedManifest(manifest) {
  const strip = (target) => {
    if (target === null || typeof target !== 'object') return target;
    const out = {};
    for (const [condition, value] of Object.entries(target)) {
      if (condition !== 'source') out[condition] = strip(value);
    }
    return out;
  };
  const published = { ...manifest, exports: strip(manifest.exports) };
  const leak = JSON.stringify(published.exports).match(/"\.\/src\/[^"]*"/);
  if (leak) throw new Error(`an export still points into src/: ${leak[0]}`);
  return published;
}

function writeAtomically(path, text) {
  writeFileSync(`${path}.tmp`, text);
  renameSync(`${path}.tmp`, path);
}

function restore(dir) {
  const backup = join(dir, BACKUP);
  if (!existsSync(backup)) return false;
  renameSync(backup, join(dir, 'package.json'));
  return true;
}

function main() {
  const [command, dir = process.cwd()] = process.argv.slice(2);
  const manifestPath = join(dir, 'package.json');
  switch (command) {
    case 'clean':
      // Stale modules from an earlier build must not be shipped.
      rmSync(join(dir, 'dist'), { recursive: true, force: true });
      return;
    case 'strip': {
      if (restore(dir)) console.error(`pack-manifest: restored the development package.json left by an interrupted pack`);
      const text = readFileSync(manifestPath, 'utf8');
      const published = publishedManifest(JSON.parse(text));
      writeAtomically(join(dir, BACKUP), text);
      writeAtomically(manifestPath, `${JSON.stringify(published, null, 2)}\n`);
      return;
    }
    case 'restore':
      if (restore(dir) && process.env.npm_lifecycle_event !== 'postpack') {
        console.error(`pack-manifest: restored the development package.json left by an interrupted pack`);
      }
      return;
    case 'print':
      process.stdout.write(`${JSON.stringify(publishedManifest(JSON.parse(readFileSync(manifestPath, 'utf8'))), null, 2)}\n`);
      return;
    default:
      console.error('usage: node scripts/pack-manifest.mjs clean|strip|restore|print [dir]');
      process.exitCode = 2;
  }
}

main();
