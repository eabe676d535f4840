/**
 * The oncely-only HTTP benchmark (issues 2 and 3): bare Fastify against
 * oncely on Fastify with the memory, SQLite and Redis stores, on the miss
 * path (a new `Idempotency-Key` per request) and the replay path (one key).
 *
 * Each server runs in its own child process; autocannon runs here. Every
 * round runs every contestant back to back (the order rotates per round), so
 * ratios compare figures measured side by side. Store round trips per
 * request come from a counting wrapper around the store in each server.
 *
 *   node --conditions=source --import tsx bench/http.ts
 *   ROUNDS=5 DURATION=3 WARMUP=3 CONNECTIONS=50 (the defaults: about 2.5 minutes)
 *
 * Prints a table and writes it into docs/benchmarks.md (section "http").
 * Not a test: nothing here asserts on time.
 */
import { execSync } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { cpus, loadavg } from 'node:os';
import { Redis } from 'ioredis';
import { counts, fmtRange, load, type Path, type RunResult, redisCpuUs, send, summarise, table } from './lib/load.js';
import { machine } from './lib/machine.js';
import { ROOT, type Server, startServer, stopAllOnExit } from './lib/spawn.js';
import { writeSection } from './lib/doc.js';

const ROUNDS = Number(process.env.ROUNDS ?? 5);
const DURATION = Number(process.env.DURATION ?? 3);
const WARMUP = Number(process.env.WARMUP ?? 3);
const CONNECTIONS = Number(process.env.CONNECTIONS ?? 50);
const WRITE_DOC = process.env.WRITE_DOC !== '0';
const RUN = randomUUID().slice(0, 8);

interface Contestant {
  name: string;
  file: string;
  env?: Record<string, string>;
  /** Aim: minimum ratio to bare Fastify, per path. */
  aim?: Record<Path, number>;
}

const contestants: Contestant[] = [
  { name: 'Fastify (bare)', file: 'bench/servers/fastify-bare.ts' },
  { name: 'oncely + memory', file: 'bench/servers/oncely-fastify.ts', env: { STORE: 'memory' }, aim: { miss: 0.9, replay: 0.9 } },
  { name: 'oncely + SQLite', file: 'bench/servers/oncely-fastify.ts', env: { STORE: 'sqlite' } },
  { name: 'oncely + Redis', file: 'bench/servers/oncely-fastify.ts', env: { STORE: 'redis', PREFIX: `oncely-bench-http-${RUN}` }, aim: { miss: 0.75, replay: 0.85 } },
];
const paths: Path[] = ['miss', 'replay'];

interface Sample extends RunResult {
  executions: number;
  /** Server CPU time per request, µs. */
  cpuPerReq: number;
  /** Redis server CPU time per request, µs (Redis is shared: approximate). */
  redisCpuPerReq: number;
  store: Record<string, number>;
}

const started = Date.now();
const load0 = loadavg();
// The code measured: servers load src/ when they start, so record it now.
const commit = `${execSync('git rev-parse --short HEAD', { cwd: ROOT, encoding: 'utf8' }).trim()}${
  execSync('git status --porcelain src', { cwd: ROOT, encoding: 'utf8' }).trim() ? ' plus uncommitted changes in src/' : ''
}`;
const servers: Server[] = [];
stopAllOnExit(servers);
// Reads Redis's own CPU time (INFO cpu) around each round.
const admin = new Redis({ host: '127.0.0.1', port: 6379, lazyConnect: true });
await admin.connect();
const results = new Map<string, Sample[]>();
const at = (c: Contestant, p: Path) => `${c.name}|${p}`;

async function measure(server: Server, path: Path, durationS: number, round: number): Promise<Sample> {
  const before = await counts(server.url);
  const redis0 = await redisCpuUs(admin);
  const r = await load({
    url: server.url,
    path,
    durationS,
    connections: CONNECTIONS,
    replayKey: `replay-${RUN}`,
    keyPrefix: `miss-${RUN}-${round}-`,
  });
  const after = await counts(server.url);
  const redis1 = await redisCpuUs(admin);
  const store: Record<string, number> = {};
  for (const [op, n] of Object.entries(after.store ?? {})) {
    const d = n - (before.store?.[op] ?? 0);
    if (d > 0) store[op] = d;
  }
  return { ...r, executions: after.total - before.total, store, cpuPerReq: (after.cpuUs - before.cpuUs) / Math.max(1, r.requests), redisCpuPerReq: (redis1 - redis0) / Math.max(1, r.requests) };
}

try {
  for (const c of contestants) servers.push(await startServer(c.name, c.file, { env: c.env }));
  // Prime the replay key: one execution, then the stored answer.
  for (const [i, s] of servers.entries()) {
    const first = await send(s.url, `replay-${RUN}`);
    const again = await send(s.url, `replay-${RUN}`);
    const replayed = i === 0 || (again.body === first.body && again.headers.get('idempotent-replayed') === 'true');
    if (first.status !== 201 || again.status !== 201 || !replayed)
      throw new Error(`${s.name}: replay key not primed (${first.status}, ${again.status})`);
  }
  console.log(`rounds ${ROUNDS} × ${DURATION} s after ${WARMUP} s warm-up, ${CONNECTIONS} connections`);
  for (const path of paths) for (let i = 0; i < servers.length; i++) await measure(servers[i]!, path, WARMUP, -1);
  for (let round = 0; round < ROUNDS; round++) {
    for (const path of paths) {
      for (let j = 0; j < servers.length; j++) {
        const i = (j + round) % servers.length;
        const c = contestants[i]!;
        const sample = await measure(servers[i]!, path, DURATION, round);
        const list = results.get(at(c, path)) ?? [];
        list.push(sample);
        results.set(at(c, path), list);
        console.log(`round ${round + 1} ${path.padEnd(6)} ${c.name.padEnd(16)} ${sample.rps.toFixed(0).padStart(7)} req/s  p50 ${sample.p50} ms  p99 ${sample.p99} ms  non-2xx ${sample.non2xx}  errors ${sample.errors}`);
      }
    }
  }
} finally {
  await Promise.all(servers.map((s) => s.stop()));
  admin.disconnect();
}

// Ratios per round (side by side), then their median and range.
const rows: string[][] = [];
const aims: string[] = [];
for (const path of paths) {
  const bare = results.get(at(contestants[0]!, path))!;
  for (const c of contestants) {
    const samples = results.get(at(c, path))!;
    const ratios = samples.map((s, k) => s.rps / bare[k]!.rps);
    const ratio = summarise(ratios);
    const cpu = summarise(samples.map((s) => s.cpuPerReq));
    const cpuRatio = summarise(samples.map((s, k) => s.cpuPerReq / bare[k]!.cpuPerReq));
    const reqs = samples.reduce((n, s) => n + s.requests, 0);
    const ops: Record<string, number> = {};
    for (const s of samples) for (const [op, n] of Object.entries(s.store)) ops[op] = (ops[op] ?? 0) + n;
    const opsText =
      c.name === contestants[0]!.name
        ? '–'
        : `${(Object.values(ops).reduce((a, b) => a + b, 0) / reqs).toFixed(2)} (${Object.entries(ops)
            .map(([op, n]) => `${op} ${(n / reqs).toFixed(2)}`)
            .join(', ')})`;
    const execs = samples.reduce((n, s) => n + s.executions, 0);
    const non2xx = samples.reduce((n, s) => n + s.non2xx + s.errors, 0);
    rows.push([
      path,
      c.name,
      fmtRange(summarise(samples.map((s) => s.rps))),
      c === contestants[0] ? '1.00' : `${ratio.median.toFixed(2)} (${ratio.min.toFixed(2)}–${ratio.max.toFixed(2)})`,
      `${cpu.median.toFixed(0)} (${cpu.min.toFixed(0)}–${cpu.max.toFixed(0)})`,
      summarise(samples.map((s) => s.redisCpuPerReq)).median.toFixed(0),
      c === contestants[0] ? '1.00' : `${cpuRatio.median.toFixed(2)} (${cpuRatio.min.toFixed(2)}–${cpuRatio.max.toFixed(2)})`,
      fmtRange(summarise(samples.map((s) => s.p50)), 1),
      fmtRange(summarise(samples.map((s) => s.p99)), 1),
      opsText,
      (execs / reqs).toFixed(2),
      String(non2xx),
    ]);
    if (c.aim) {
      const met = ratio.median >= c.aim[path];
      aims.push(
        `- ${c.name}, ${path}: ${ratio.median.toFixed(2)} of bare Fastify's req/s (aim ≥ ${c.aim[path].toFixed(2)}): **${met ? 'met' : 'missed'}**; server CPU per request ${cpuRatio.median.toFixed(2)}× bare (throughput if the server's CPU were the only limit: ${(1 / cpuRatio.median).toFixed(2)})`,
      );
    }
  }
}
const head = ['path', 'server', 'req/s median (range)', 'ratio to bare', 'server CPU µs / request', 'Redis CPU µs / request', 'CPU ratio to bare', 'p50 ms', 'p99 ms', 'store calls / request', 'executions / request', 'non-2xx + errors'];
const md = [
  '## oncely on Fastify: stores against bare Fastify',
  '',
  `Command: \`npm run bench\` (\`node --conditions=source --import tsx bench/http.ts\`), ${ROUNDS} rounds × ${DURATION} s after a ${WARMUP} s warm-up, ${CONNECTIONS} connections, oncely at commit ${commit}, run ${new Date().toISOString().slice(0, 16)}Z, ${Math.round((Date.now() - started) / 1000)} s in all.`,
  'Miss: a new `Idempotency-Key` on every request. Replay: one key, primed before the rounds.',
  'Ratios are per round (contestants run back to back, order rotating), then median and range across rounds.',
  'Store calls are counted by a wrapper around the store inside each server.',
  ...(Math.max(load0[0]!, loadavg()[0]!) > cpus().length
    ? [
        `> Other work shared this machine during the run (load average ${load0[0]!.toFixed(1)} at start, ${loadavg()[0]!.toFixed(1)} at end, on ${cpus().length} cores): req/s swings with it; server CPU per request moves far less.`,
      ]
    : []),
  "Server CPU: user + system time of the server process (`process.cpuUsage()`) over the round, divided by the requests answered; a cost per request that other load on the machine changes far less than req/s. It leaves out the load generator. Redis CPU: `INFO cpu` deltas over the round per request; Redis is shared with other work, so treat it as approximate (a few µs of background for contestants that do not use Redis).",
  '',
  table(head, rows),
  '',
  'Aims:',
  '',
  ...aims,
  '',
  'Machine:',
  '',
  machine(),
  `- load average (1, 5, 15 min) at start ${load0.map((n) => n.toFixed(1)).join(', ')}, at end ${loadavg().map((n) => n.toFixed(1)).join(', ')}: other work may have shared the machine, which is why ratios are taken per round`,
].join('\n');
console.log(`\n${md}`);
if (WRITE_DOC) writeSection('http', md);
