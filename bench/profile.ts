/**
 * CPU profile of an oncely server under load, to find what to tune.
 * Starts `bench/servers/oncely-fastify.ts` (or `SERVER=...`) with
 * `--cpu-prof` once per path, loads it for `DURATION` s, and prints the
 * functions with the most self time (file:line function, % of samples) and
 * the same grouped by file, each also in µs per request (sample time over
 * the requests answered). Profiles stay in `.tmp/profiles/`.
 *
 *   STORE=memory|sqlite|redis|postgres|mariadb DURATION=8 INTERVAL=200 (µs between samples)
 *   PATHS=miss,replay SERVER=bench/servers/oncely-express.ts
 *   node --conditions=source --import tsx bench/profile.ts
 */
import { randomUUID } from 'node:crypto';
import { mkdirSync, readdirSync, readFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import { load, type Path, send } from './lib/load.js';
import { ROOT, startServer } from './lib/spawn.js';

const STORE = process.env.STORE ?? 'memory';
const SERVER = process.env.SERVER ?? 'bench/servers/oncely-fastify.ts';
const DURATION = Number(process.env.DURATION ?? 8);
const CONNECTIONS = Number(process.env.CONNECTIONS ?? 50);
const TOP = Number(process.env.TOP ?? 25);
const INTERVAL = Number(process.env.INTERVAL ?? 200);
const PATHS = (process.env.PATHS ?? 'miss,replay').split(',') as Path[];
const RUN = randomUUID().slice(0, 8);

interface Node {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  children?: number[];
}
interface Profile {
  nodes: Node[];
  samples: number[];
  /** µs since the previous sample, per sample. */
  timeDeltas: number[];
}

function where(url: string): string {
  const path = url.startsWith('file://') ? url.slice(7) : url;
  if (path === '') return '(native)';
  const rel = relative(ROOT, path);
  return rel.startsWith('..') ? path : rel;
}

function report(file: string, label: string, requests: number): void {
  const profile = JSON.parse(readFileSync(file, 'utf8')) as Profile;
  const byId = new Map(profile.nodes.map((n) => [n.id, n]));
  const self = new Map<string, number>();
  const byFile = new Map<string, number>();
  // Each sample weighs the time until the next one (µs).
  const weight = (k: number) => profile.timeDeltas[k + 1] ?? INTERVAL;
  let totalUs = 0;
  profile.samples.forEach((id, k) => {
    const w = weight(k);
    totalUs += w;
    const f = byId.get(id)!.callFrame;
    const name = `${where(f.url)}:${f.lineNumber + 1} ${f.functionName || '(anonymous)'}`;
    self.set(name, (self.get(name) ?? 0) + w);
    const group = f.url === '' ? `(native) ${f.functionName}` : where(f.url).replace(/node_modules\/([^/]+)\/.*/, 'node_modules/$1');
    byFile.set(group, (byFile.get(group) ?? 0) + w);
  });
  const parent = new Map<number, number>();
  for (const n of profile.nodes) for (const c of n.children ?? []) parent.set(c, n.id);
  // Busy samples: neither idle nor module loading at start-up.
  const inclusive = new Map<string, number>();
  let busy = 0;
  profile.samples.forEach((id, k) => {
    const w = weight(k);
    const seen = new Set<string>();
    let startup = false;
    let idle = false;
    for (let at: number | undefined = id; at !== undefined; at = parent.get(at)) {
      const f = byId.get(at)!.callFrame;
      if (f.functionName === '(idle)') idle = true;
      if (/modules\/(esm|cjs)|tsx/.test(f.url)) startup = true;
      const w = where(f.url);
      // The servers load oncely from dist/ (compiled) or src/ (under tsx).
      if (w.startsWith('src/') || w.startsWith('dist/')) {
        seen.add(`${w}:${f.lineNumber + 1} ${f.functionName || '(anonymous)'}`);
        seen.add(`${w} (file)`);
      }
    }
    if (idle || startup) return;
    busy += w;
    if (seen.size > 0) seen.add('any oncely frame on the stack');
    for (const name of seen) inclusive.set(name, (inclusive.get(name) ?? 0) + w);
  });
  const pct = (n: number) => `${((100 * n) / totalUs).toFixed(1).padStart(5)}%`;
  const pctBusy = (n: number) => `${((100 * n) / busy).toFixed(1).padStart(5)}%`;
  const perReq = (n: number) => `${(n / Math.max(1, requests)).toFixed(2).padStart(6)} µs/req`;
  console.log(
    `\n### ${label}: oncely code (src/ or dist/), inclusive time as % of ${(busy / 1000).toFixed(0)} ms busy (idle and start-up excluded), and per request (${requests} requests; busy ${perReq(busy)})`,
  );
  for (const [name, n] of [...inclusive].sort((a, b) => b[1] - a[1]).slice(0, TOP)) console.log(`${pctBusy(n)} ${perReq(n)}  ${name}`);
  console.log(`\n### ${label}: top ${TOP} functions by self time (${(totalUs / 1000).toFixed(0)} ms sampled)`);
  for (const [name, n] of [...self].sort((a, b) => b[1] - a[1]).slice(0, TOP)) console.log(`${pct(n)} ${perReq(n)}  ${name}`);
  console.log(`\n### ${label}: self time by file or package`);
  for (const [name, n] of [...byFile].sort((a, b) => b[1] - a[1]).slice(0, TOP)) console.log(`${pct(n)} ${perReq(n)}  ${name}`);
}

for (const path of PATHS) {
  const dir = join(ROOT, '.tmp', 'profiles', `${STORE}-${path}-${RUN}`);
  mkdirSync(dir, { recursive: true });
  const server = await startServer(`${STORE} ${path}`, SERVER, {
    env: { STORE, PREFIX: `oncely-bench-prof-${RUN}` },
    nodeFlags: ['--cpu-prof', `--cpu-prof-dir=${dir}`, `--cpu-prof-interval=${INTERVAL}`],
  });
  let requests = 0;
  try {
    await send(server.url, `replay-${RUN}`);
    const r = await load({ url: server.url, path, durationS: DURATION, connections: CONNECTIONS, replayKey: `replay-${RUN}`, keyPrefix: `prof-${RUN}-` });
    requests = r.requests;
    console.log(`\n${STORE} ${path}: ${r.rps.toFixed(0)} req/s under the profiler`);
  } finally {
    await server.stop();
  }
  const file = readdirSync(dir).find((f) => f.endsWith('.cpuprofile'));
  if (file === undefined) throw new Error(`no profile in ${dir}`);
  report(join(dir, file), `${STORE}, ${path} path`, requests);
}
