/**
 * The oncely-only HTTP benchmark (issue 12): what oncely adds to a bare
 * server. Bare Fastify and bare Express against oncely on each, with the
 * memory, SQLite, Redis, PostgreSQL and MariaDB stores, on the miss path (a
 * new `Idempotency-Key` per request) and the replay path (one key).
 *
 * The figure that matters is server CPU µs per request ABOVE the bare
 * framework, taken round by round (every round runs every contestant back to
 * back, order rotating), plus the store's own CPU where it can be read:
 * - Redis: a private redis-server started here (`INFO cpu`, and
 *   `INFO commandstats` for round trips), so nothing else runs in it;
 * - PostgreSQL: the CPU time of the server's own backends (`/proc/<pid>/schedstat`);
 * - MariaDB: the CPU time of the server's own connection threads
 *   (`information_schema.PROCESSLIST.TID`, `/proc/<pid>/task/<tid>/schedstat`).
 * Round trips per request: Redis commands, SQL statements (a counting
 * wrapper around the pool), store calls for the in-process stores.
 *
 *   npm run bench   (builds dist/, then node --conditions=source --import tsx bench/http.ts)
 *   ROUNDS=3 DURATION=3 WARMUP=2 CONNECTIONS=50 (defaults), STORES=memory,sqlite,redis,postgres,mariadb,
 *   FRAMEWORKS=fastify,express, WRITE_DOC=0 to print only
 *
 * Prints the added-µs table, writes it into docs/benchmarks.md (section
 * "http") and its bars into docs/benchmarks.svg. Not a test: nothing here
 * asserts on time.
 */
import { execSync } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { cpus, loadavg } from 'node:os';
import mysql from 'mysql2/promise';
import pg from 'pg';
import { type ChartEntry, updateChart } from './lib/chart.js';
import { writeSection } from './lib/doc.js';
import { fmtRange, type Path, send, summarise, table } from './lib/load.js';
import { machine } from './lib/machine.js';
import { addedServer, fmtAdded, fmtTrips, fmtUs, type Probes, round, type Sample, type StoreSide, storeCpu, tripsPerRequest } from './lib/measure.js';
import { startRedis } from './lib/redis.js';
import { ROOT, type Server, startServer, stopAllOnExit } from './lib/spawn.js';
import { MysqlCpu } from './lib/storecpu.js';

const ROUNDS = Number(process.env.ROUNDS ?? 3);
const DURATION = Number(process.env.DURATION ?? 3);
const WARMUP = Number(process.env.WARMUP ?? 2);
const CONNECTIONS = Number(process.env.CONNECTIONS ?? 50);
const WRITE_DOC = process.env.WRITE_DOC !== '0';
const STORES = (process.env.STORES ?? 'memory,sqlite,redis,postgres,mariadb').split(',') as StoreSide[];
const FRAMEWORKS = (process.env.FRAMEWORKS ?? 'fastify,express').split(',');
const RUN = randomUUID().slice(0, 8);
/** A checkout of older code with its own dist/ (and node_modules), run beside this one; its stores: BEFORE_STORES. */
const BEFORE = process.env.BEFORE;
/** Also run bare Fastify with two empty async hooks (FLOOR=1). */
const FLOOR = process.env.FLOOR === '1';
const BEFORE_STORES = (process.env.BEFORE_STORES ?? 'memory').split(',') as StoreSide[];

type Framework = 'Fastify' | 'Express';
const STORE_LABEL: Record<string, string> = { memory: 'memory', sqlite: 'SQLite', redis: 'Redis', postgres: 'PostgreSQL', mariadb: 'MariaDB' };
/** Aims of issue 12: server CPU µs above bare Fastify, medians. */
const AIMS: Record<string, Record<Path, number>> = { memory: { miss: 10, replay: 6 }, sqlite: { miss: 40, replay: 12 } };
/** Round-trip aims for the SQL stores. */
const TRIP_AIMS: Record<Path, number> = { miss: 2, replay: 1 };

interface Contestant {
  id: string;
  name: string;
  framework: Framework;
  store: StoreSide;
  file: string;
  bare?: boolean;
  env?: Record<string, string>;
  /** Another checkout to run from (BEFORE=dir): the same server on older code, side by side. */
  cwd?: string;
}

const contestants: Contestant[] = [];
for (const fw of FRAMEWORKS) {
  const framework: Framework = fw === 'express' ? 'Express' : 'Fastify';
  const f = framework.toLowerCase();
  contestants.push({ id: `${f}-bare`, name: `${framework} (bare)`, framework, store: 'none', file: `bench/servers/${f}-bare.ts`, bare: true });
  // The floor: bare Fastify plus two empty async hooks (what any plugin that acts before the handler and before the answer pays).
  if (framework === 'Fastify' && FLOOR) {
    contestants.push({ id: 'fastify-hooks', name: 'Fastify + 2 empty hooks', framework, store: 'none', file: 'bench/servers/fastify-hooks.ts' });
    // The same, with an onSend that waits one event-loop turn, as one that stores the answer first must.
    contestants.push({
      id: 'fastify-hooks-turn',
      name: 'Fastify + 2 empty hooks, onSend waits a turn',
      framework,
      store: 'none',
      file: 'bench/servers/fastify-hooks.ts',
      env: { HOOKS: 'turn' },
    });
  }
  for (const store of STORES) {
    contestants.push({
      id: `${f}-${store}`,
      name: `oncely, ${STORE_LABEL[store]}`,
      framework,
      store,
      file: `bench/servers/oncely-${f}.ts`,
      env: { STORE: store, PREFIX: `ob_${RUN}_${f}_${store}` },
    });
  }
  // Before/after in one run: the same servers from another checkout (built to its own dist/).
  // Experiments: the memory store with a short retention (TTL_MS), beside the default one.
  if (process.env.SHORT_TTL_MS)
    contestants.push({ id: `${f}-memory-short`, name: `oncely, memory, TTL ${process.env.SHORT_TTL_MS} ms`, framework, store: 'memory', file: `bench/servers/oncely-${f}.ts`, env: { STORE: 'memory', TTL_MS: process.env.SHORT_TTL_MS } });
  for (const store of BEFORE ? BEFORE_STORES : []) {
    contestants.push({
      id: `${f}-${store}-before`,
      name: `oncely, ${STORE_LABEL[store]} (before)`,
      framework,
      store,
      file: `bench/servers/oncely-${f}.ts`,
      env: { STORE: store, PREFIX: `ob_${RUN}_${f}_${store}_b` },
      cwd: BEFORE,
    });
  }
  // Experiments: the memory store's server from other checkouts (VARIANTS=dir,dir), named by directory.
  for (const [i, dir] of (process.env.VARIANTS?.split(',') ?? []).entries()) {
    contestants.push({
      id: `${f}-memory-v${i}`,
      name: `oncely, memory (${dir.split('/').pop()})`,
      framework,
      store: 'memory',
      file: `bench/servers/oncely-${f}.ts`,
      env: { STORE: 'memory' },
      cwd: dir,
    });
  }
}
const paths: Path[] = ['miss', 'replay'];

const started = Date.now();
const load0 = loadavg();
// The code measured: servers load dist/ (built from src/) when they start, so record it now.
const commit = `${execSync('git rev-parse --short HEAD', { cwd: ROOT, encoding: 'utf8' }).trim()}${
  execSync('git status --porcelain src', { cwd: ROOT, encoding: 'utf8' }).trim() ? ' plus uncommitted changes in src/' : ''
}`;
const servers = new Map<string, Server>();
const serverList: Server[] = [];
stopAllOnExit(serverList);
const results = new Map<string, Sample[]>();
const at = (c: Contestant, p: Path) => `${c.id}|${p}`;

const needs = (s: StoreSide) => contestants.some((c) => c.store === s);
const redis = needs('redis') ? await startRedis() : undefined;
const mysqlAdmin = needs('mariadb')
  ? mysql.createPool({ host: process.env.MYSQL_HOST ?? '127.0.0.1', user: process.env.MYSQL_USER ?? 'root', database: process.env.MYSQL_DATABASE ?? 'test', connectionLimit: 1 })
  : undefined;
const probes: Probes = { redis, mysql: mysqlAdmin ? new MysqlCpu(mysqlAdmin) : undefined };
const versions: string[] = [];
if (needs('postgres')) {
  const client = new pg.Client({ host: process.env.PGHOST ?? '127.0.0.1', user: process.env.PGUSER ?? 'postgres', database: process.env.PGDATABASE ?? 'test' });
  await client.connect();
  versions.push(`PostgreSQL ${(await client.query('SHOW server_version')).rows[0].server_version} on 127.0.0.1:5432 (shared; CPU read from this benchmark's own backends), pg Pool of 10`);
  await client.end();
}
if (mysqlAdmin) {
  const [rows] = await mysqlAdmin.query('SELECT VERSION() AS v');
  versions.push(`MariaDB ${(rows as Array<{ v: string }>)[0]!.v} on 127.0.0.1:3306 (shared; CPU read from this benchmark's own connection threads), mysql2 pool of 10`);
}

try {
  // One at a time: a dozen TypeScript start-ups at once on two cores can take minutes.
  for (const c of contestants) {
    const s = await startServer(`${c.framework} ${c.name}`, c.file, {
      env: { ...c.env, ...(redis ? { REDIS_PORT: String(redis.port) } : {}) },
      readyTimeoutMs: 90_000,
      cwd: c.cwd,
    });
    servers.set(c.id, s);
    serverList.push(s);
  }
  // Prime the replay key: one execution, then the stored answer.
  for (const c of contestants) {
    const s = servers.get(c.id)!;
    const first = await send(s.url, `replay-${RUN}`);
    const again = await send(s.url, `replay-${RUN}`);
    const replayed = c.store === 'none' || (again.body === first.body && again.headers.get('idempotent-replayed') === 'true');
    if (first.status !== 201 || again.status !== 201 || !replayed) throw new Error(`${s.name}: replay key not primed (${first.status}, ${again.status})`);
  }
  console.log(`rounds ${ROUNDS} × ${DURATION} s after ${WARMUP} s warm-up, ${CONNECTIONS} connections, ${contestants.length} servers`);
  const measure = (c: Contestant, path: Path, durationS: number, r: number) =>
    round({
      url: servers.get(c.id)!.url,
      side: c.store,
      path,
      durationS,
      connections: CONNECTIONS,
      replayKey: `replay-${RUN}`,
      keyPrefix: `miss-${RUN}-${r}-`,
      probes,
    });
  for (const path of paths) for (const c of contestants) await measure(c, path, WARMUP, -1);
  for (let r = 0; r < ROUNDS; r++) {
    for (const path of paths) {
      for (let j = 0; j < contestants.length; j++) {
        const c = contestants[(j + r) % contestants.length]!;
        const sample = await measure(c, path, DURATION, r);
        const list = results.get(at(c, path)) ?? [];
        list.push(sample);
        results.set(at(c, path), list);
        console.log(
          `round ${r + 1} ${path.padEnd(6)} ${c.framework.padEnd(7)} ${c.name.padEnd(20)} ${sample.rps.toFixed(0).padStart(6)} req/s  CPU ${sample.cpuPerReq.toFixed(0).padStart(4)} µs/req  store ${Number.isFinite(sample.storeCpuPerReq) ? sample.storeCpuPerReq.toFixed(0) : '–'} µs/req  p99 ${sample.p99} ms  non-2xx ${sample.non2xx}  errors ${sample.errors}`,
        );
      }
    }
  }
} finally {
  await Promise.all(serverList.map((s) => s.stop()));
  await redis?.stop();
  await mysqlAdmin?.end();
}

// ---------------------------------------------------------------- report

const bareOf = (c: Contestant, path: Path) => results.get(at(contestants.find((x) => x.bare && x.framework === c.framework)!, path)) ?? [];
const find = (framework: Framework, store: StoreSide, before: boolean) =>
  contestants.find((c) => c.framework === framework && c.store === store && (c.cwd !== undefined) === before);

// The added-µs table: one row per store and path, both frameworks side by side.
const addedRows: string[][] = [];
const aimLines: string[] = [];
const chart: ChartEntry[] = [];
const variants = [...STORES.map((store) => ({ store, before: false })), ...(BEFORE ? BEFORE_STORES.map((store) => ({ store, before: true })) : [])];
for (const { store, before } of variants) {
  for (const path of paths) {
    const row: string[] = [`${STORE_LABEL[store]!}${before ? ' (before)' : ''}`, path];
    let fastifyServer = Number.NaN;
    let trips = '–';
    let tripsTotal = Number.NaN;
    for (const framework of ['Fastify', 'Express'] as Framework[]) {
      const c = find(framework, store, before);
      const samples = c ? (results.get(at(c, path)) ?? []) : [];
      if (!c || samples.length === 0) {
        row.push('–', '–', '–');
        continue;
      }
      const added = addedServer(samples, bareOf(c, path));
      const sc = storeCpu(samples);
      const p99 = summarise(samples.map((s) => s.p99));
      row.push(fmtAdded(added), fmtUs(sc), `${p99.median.toFixed(0)}`);
      if (framework === 'Fastify') fastifyServer = added.median;
      if (trips === '–') {
        const t = tripsPerRequest(samples);
        trips = fmtTrips(t);
        tripsTotal = t.total;
      }
      if (!before) chart.push({ source: 'http', store: STORE_LABEL[store]!, path, library: 'oncely', framework, server: added.median, storeCpu: Number.isFinite(sc.median) ? sc.median : undefined });
    }
    row.push(trips);
    let aim = '–';
    const a = AIMS[store]?.[path];
    if (a !== undefined && Number.isFinite(fastifyServer)) {
      const met = fastifyServer <= a;
      aim = `≤ ${a} µs: **${met ? 'met' : 'missed'}**`;
      aimLines.push(`- ${STORE_LABEL[store]}${before ? ' (before)' : ''}, ${path}: +${fastifyServer.toFixed(1)} µs above bare Fastify (aim ≤ ${a} µs): **${met ? 'met' : 'missed'}**`);
    } else if (store === 'redis') {
      aim = 'total ≤ 0.5× @node-idempotency/core: see bench:compare';
    } else if ((store === 'postgres' || store === 'mariadb') && Number.isFinite(tripsTotal)) {
      const met = tripsTotal <= TRIP_AIMS[path] + 0.05;
      aim = `≤ ${TRIP_AIMS[path]} round trips: **${met ? 'met' : 'missed'}**`;
      aimLines.push(`- ${STORE_LABEL[store]}, ${path}: ${tripsTotal.toFixed(2)} round trips per request (aim ≤ ${TRIP_AIMS[path]}): **${met ? 'met' : 'missed'}**`);
    }
    row.push(aim);
    addedRows.push(row);
  }
}

// The floor, when measured: what two empty async hooks add to bare Fastify
// (and the same when the onSend waits one event-loop turn, as a store would make it).
for (const [id, label] of [
  ['fastify-hooks', '(no store: Fastify + 2 empty async hooks)'],
  ['fastify-hooks-turn', '(no store: the same, onSend waits one event-loop turn)'],
] as const) {
  const floor = contestants.find((c) => c.id === id);
  if (!floor) continue;
  for (const path of paths) {
    const samples = results.get(at(floor, path)) ?? [];
    if (samples.length === 0) continue;
    const p99 = summarise(samples.map((s) => s.p99));
    addedRows.push([label, path, fmtAdded(addedServer(samples, bareOf(floor, path))), '–', p99.median.toFixed(0), '–', '–', '–', '–', 'the floor of any such plugin']);
  }
}

// The detail table: every contestant and path.
const detailRows: string[][] = [];
for (const framework of ['Fastify', 'Express'] as Framework[]) {
  for (const path of paths) {
    for (const c of contestants.filter((x) => x.framework === framework)) {
      const samples = results.get(at(c, path)) ?? [];
      if (samples.length === 0) continue;
      const bare = bareOf(c, path);
      const ratio = summarise(samples.map((s, k) => s.rps / bare[k]!.rps));
      const reqs = samples.reduce((n, s) => n + s.requests, 0);
      const execs = samples.reduce((n, s) => n + s.executions, 0);
      const bad = samples.reduce((n, s) => n + s.non2xx + s.errors + s.timeouts, 0);
      detailRows.push([
        framework,
        path,
        c.name,
        fmtRange(summarise(samples.map((s) => s.rps))),
        c.bare ? '1.00' : `${ratio.median.toFixed(2)} (${ratio.min.toFixed(2)}–${ratio.max.toFixed(2)})`,
        fmtUs(summarise(samples.map((s) => s.cpuPerReq))),
        c.bare ? '–' : fmtAdded(addedServer(samples, bare)),
        fmtUs(summarise(samples.map((s) => s.gcPerReq)), 1),
        fmtUs(storeCpu(samples)),
        fmtRange(summarise(samples.map((s) => s.p50)), 0),
        fmtRange(summarise(samples.map((s) => s.p99)), 0),
        c.bare ? '–' : fmtTrips(tripsPerRequest(samples)),
        (execs / Math.max(1, reqs)).toFixed(2),
        bad === 0 ? '0' : `**${bad}** of ${reqs}`,
      ]);
    }
  }
}

const load1 = loadavg();
const when = new Date().toISOString().slice(0, 16);
const md = [
  '## What oncely adds to a bare server',
  '',
  `Command: \`npm run bench\` (\`node --conditions=source --import tsx bench/http.ts\`), ${ROUNDS} rounds × ${DURATION} s after a ${WARMUP} s warm-up, ${CONNECTIONS} connections, oncely at commit ${commit} (built to \`dist/\`), run ${when}Z, ${Math.round((Date.now() - started) / 1000)} s in all.`,
  '',
  'Server µs: CPU time of the server process (user + system, `process.cpuUsage()`) per request answered, minus the bare framework\'s in the same round (contestants run back to back, order rotating), then the median (and range) over rounds. It moves far less with other load on the machine than req/s does, and it leaves out the load generator.',
  'Store µs: the store\'s own CPU per request: a Redis server of the benchmark\'s own (`INFO cpu`), the PostgreSQL backends and the MariaDB connection threads of the server\'s own pool (`/proc/…/schedstat`); the in-process stores (memory, SQLite) spend theirs inside the server, so it is already in server µs.',
  'Round trips: per request, over the rounds, under load: Redis commands (`INFO commandstats`), SQL statements (a counting wrapper around the pool); memory and SQLite: store calls. They include the process session\'s heartbeat (Redis, PostgreSQL, MariaDB: one per 250 ms per process, not per request). p99: latency at 50 connections, ms.',
  ...(Math.max(load0[0]!, load1[0]!) > cpus().length
    ? [
        '',
        `> Other work shared this machine during the run (load average ${load0[0]!.toFixed(1)} at start, ${load1[0]!.toFixed(1)} at end, on ${cpus().length} cores): req/s swings with it; CPU per request moves far less.`,
      ]
    : []),
  '',
  table(
    ['store', 'path', 'Fastify: server µs above bare', 'Fastify: store µs', 'Fastify: p99 ms', 'Express: server µs above bare', 'Express: store µs', 'Express: p99 ms', 'round trips / request', 'aim (Fastify)'],
    addedRows,
  ),
  '',
  'Aims (issue 12; server CPU above bare Fastify, medians; PostgreSQL and MariaDB: round trips):',
  '',
  ...aimLines,
  '- Redis: total (server + Redis CPU) ≤ 0.5× `@node-idempotency/core`\'s total added cost in the same run: see the comparison below (`npm run bench:compare`).',
  '',
  '<details><summary>Every contestant: req/s, CPU, latency, round trips</summary>',
  '',
  table(
    ['framework', 'path', 'server', 'req/s median (range)', 'req/s ratio to bare', 'server CPU µs / request', 'above bare', 'GC pauses µs / request', 'store CPU µs / request', 'p50 ms', 'p99 ms', 'round trips / request', 'executions / request', 'non-2xx + errors'],
    detailRows,
  ),
  '',
  '</details>',
  '',
  'Machine:',
  '',
  machine({ redis: redis ? `Redis ${redis.version} on 127.0.0.1 (a server of the benchmark's own, on a free port)` : undefined, others: versions }),
  `- load average (1, 5, 15 min) at start ${load0.map((n) => n.toFixed(1)).join(', ')}, at end ${load1.map((n) => n.toFixed(1)).join(', ')}`,
].join('\n');
console.log(`\n${md}`);
if (WRITE_DOC) {
  writeSection('http', md);
  updateChart('http', chart, `${when}Z, ${ROUNDS} × ${DURATION} s, commit ${commit}`);
}
