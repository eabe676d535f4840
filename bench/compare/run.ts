/**
 * oncely side by side with the Node.js idempotency libraries on npm:
 * throughput (miss and replay paths, several rounds, ratios to the bare
 * framework), store round trips per request, and correctness rows, all in
 * one run on this machine. Writes docs/benchmarks.md (keeping the section
 * that bench/http.ts writes).
 *
 *   npm install --prefix bench/compare --no-audit --no-fund   (once)
 *   node --conditions=source --import tsx bench/compare/run.ts
 *   ROUNDS=3 DURATION=3 WARMUP=2 CONNECTIONS=50 ONLY=<id,id> (the defaults; ONLY picks contestants)
 *
 * Every server runs in its own child process; autocannon and the checks run
 * here. The Redis contestants share a Redis server of the benchmark's own
 * (a free port, started and stopped here), so that its CPU time and
 * commands over a round belong to the contestant under load: the added-µs
 * figures (server CPU above the bare framework, plus Redis CPU, per request)
 * compare oncely's total cost with the peers'. Writes the "compare" section
 * of docs/benchmarks.md and the peers' bars of docs/benchmarks.svg.
 */
import { execSync } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { cpus, loadavg } from 'node:os';
import { join } from 'node:path';
import { Redis } from 'ioredis';
import { type ChartEntry, updateChart } from '../lib/chart.js';
import { writeSection } from '../lib/doc.js';
import { BODY, counts, fmtRange, type Path, send, summarise, table } from '../lib/load.js';
import { machine } from '../lib/machine.js';
import { addedServer, fmtAdded, fmtUs, perRound, round, type Sample, type StoreSide, storeCpu } from '../lib/measure.js';
import { startRedis } from '../lib/redis.js';
import { ROOT, type Server, startServer, stopAllOnExit } from '../lib/spawn.js';

const ROUNDS = Number(process.env.ROUNDS ?? 3);
const DURATION = Number(process.env.DURATION ?? 3);
const WARMUP = Number(process.env.WARMUP ?? 2);
const CONNECTIONS = Number(process.env.CONNECTIONS ?? 50);
const ONLY = process.env.ONLY?.split(',');
const RUN = randomUUID().slice(0, 8);
const NS = `cmp-${RUN}`;
const started = Date.now();
const load0 = loadavg();
// The code measured: servers load src/ when they start, so record it now.
const commit = `${execSync('git rev-parse --short HEAD', { cwd: ROOT, encoding: 'utf8' }).trim()}${
  execSync('git status --porcelain src', { cwd: ROOT, encoding: 'utf8' }).trim() ? ' plus uncommitted changes in src/' : ''
}`;

type Framework = 'Fastify' | 'Express';
interface Contestant {
  id: string;
  name: string;
  framework: Framework;
  library: string;
  store: string;
  file: string;
  env?: Record<string, string>;
  bare?: boolean;
  redis?: boolean;
  oncely?: boolean;
  /** Correctness rows only (no throughput). */
  correctnessOnly?: boolean;
}

const S = 'bench/servers';
const C = 'bench/compare/servers';
const all: Contestant[] = [
  { id: 'f-bare', name: 'Fastify (bare)', framework: 'Fastify', library: '–', store: '–', file: `${S}/fastify-bare.ts`, bare: true },
  { id: 'f-oncely-mem', name: 'oncely, memory', framework: 'Fastify', library: 'oncely', store: 'memory', file: `${S}/oncely-fastify.ts`, env: { STORE: 'memory' }, oncely: true },
  { id: 'f-oncely-sqlite', name: 'oncely, SQLite', framework: 'Fastify', library: 'oncely', store: 'SQLite', file: `${S}/oncely-fastify.ts`, env: { STORE: 'sqlite' }, oncely: true },
  { id: 'f-oncely-redis', name: 'oncely, Redis', framework: 'Fastify', library: 'oncely', store: 'Redis', file: `${S}/oncely-fastify.ts`, env: { STORE: 'redis' }, oncely: true, redis: true },
  { id: 'f-nid-redis', name: '@node-idempotency/core, Redis', framework: 'Fastify', library: '@node-idempotency/core', store: 'Redis', file: `${C}/node-idempotency-fastify.ts`, redis: true },
  { id: 'f-pt-redis', name: 'Powertools makeIdempotent, Redis', framework: 'Fastify', library: '@aws-lambda-powertools/idempotency', store: 'Redis', file: `${C}/powertools-fastify.ts`, redis: true },
  { id: 'f-pt-redis-validate', name: 'Powertools + payload validation, Redis', framework: 'Fastify', library: '@aws-lambda-powertools/idempotency', store: 'Redis', file: `${C}/powertools-fastify.ts`, env: { VALIDATE: '1' }, redis: true, correctnessOnly: true },
  { id: 'e-bare', name: 'Express (bare)', framework: 'Express', library: '–', store: '–', file: `${S}/express-bare.ts`, bare: true },
  { id: 'e-oncely-mem', name: 'oncely, memory', framework: 'Express', library: 'oncely', store: 'memory', file: `${S}/oncely-express.ts`, env: { STORE: 'memory' }, oncely: true },
  { id: 'e-oncely-sqlite', name: 'oncely, SQLite', framework: 'Express', library: 'oncely', store: 'SQLite', file: `${S}/oncely-express.ts`, env: { STORE: 'sqlite' }, oncely: true },
  { id: 'e-oncely-redis', name: 'oncely, Redis', framework: 'Express', library: 'oncely', store: 'Redis', file: `${S}/oncely-express.ts`, env: { STORE: 'redis' }, oncely: true, redis: true },
  { id: 'e-ei-mem', name: 'express-idempotency, memory', framework: 'Express', library: 'express-idempotency', store: 'memory', file: `${C}/express-idempotency.ts`, env: { STORE: 'memory' } },
  { id: 'e-ei-redis', name: 'express-idempotency, Redis adapter', framework: 'Express', library: 'express-idempotency', store: 'Redis', file: `${C}/express-idempotency.ts`, env: { STORE: 'redis' }, redis: true },
  { id: 'e-nid-redis', name: '@node-idempotency/core, Redis', framework: 'Express', library: '@node-idempotency/core', store: 'Redis', file: `${C}/node-idempotency-express.ts`, redis: true },
];
const contestants = all.filter((c) => ONLY === undefined || c.bare || ONLY.includes(c.id));
const prefixOf = (c: Contestant) => `${NS}-${c.id}`;

const servers = new Map<string, Server>();
stopAllOnExit([...servers.values()]);
// The Redis every Redis contestant uses, of this run's own.
const redis = await startRedis();
/** Where a contestant's store CPU and round trips are read. */
const sideOf = (c: Contestant): StoreSide => (c.bare ? 'none' : c.redis ? 'redis' : !c.oncely ? 'none' : c.store === 'SQLite' ? 'sqlite' : 'memory');
const log = (line: string) => console.log(`[${Math.round((Date.now() - started) / 1000)}s] ${line}`);

// ---------------------------------------------------------------- correctness

interface Row {
  pass: boolean;
  text: string;
}
interface Correctness {
  concurrency: Row;
  mismatch: Row;
  throwThen: Row;
  fiveHundredThen: Row;
  replay: Row;
}

const histogram = (statuses: number[]) => {
  const h = new Map<number, number>();
  for (const s of statuses) h.set(s, (h.get(s) ?? 0) + 1);
  return [...h].sort((a, b) => a[0] - b[0]).map(([s, n]) => `${n}×${s}`).join(', ');
};

async function correctness(c: Contestant, url: string): Promise<Correctness> {
  const k = `${prefixOf(c)}-k`;
  // 20 keys × 100 concurrent identical requests on a handler that takes 50 ms.
  const statuses: number[] = [];
  const keys: string[] = [];
  let errors = 0;
  for (let i = 0; i < 20; i++) {
    const key = `${k}-conc-${i}`;
    keys.push(key);
    const answers = await Promise.all(
      Array.from({ length: 100 }, () => send(url, key, BODY, '/payments/slow').catch(() => null)),
    );
    for (const a of answers) if (a === null) errors += 1;
    else statuses.push(a.status);
  }
  const execs = Object.values((await counts(url, keys)).keys);
  const once = execs.filter((n) => n === 1).length;
  const fivexx = statuses.filter((s) => s >= 500).length;
  const concurrency: Row = {
    pass: once === 20 && fivexx === 0 && errors === 0,
    text: `${once}/20 keys ran once (executions per key: min ${Math.min(...execs)}, max ${Math.max(...execs)}, total ${execs.reduce((a, b) => a + b, 0)}); statuses ${histogram(statuses)}${errors ? `; ${errors} connection errors` : ''}`,
  };

  // The same key with a different body.
  const mk = `${k}-mismatch`;
  const m1 = await send(url, mk, BODY);
  const m2 = await send(url, mk, JSON.stringify({ amount: 99_999, currency: 'EUR' }));
  const mExec = (await counts(url, [mk])).keys[mk] ?? 0;
  const mismatch: Row = {
    pass: m1.status === 201 && m2.status >= 400 && m2.status < 500 && mExec === 1,
    text: `${m1.status} then ${m2.status}${m2.status === 201 && m2.body === m1.body ? ' (the first answer replayed)' : ''}; handler ran ${mExec}×`,
  };

  // A handler that throws, then succeeds; one that answers 500, then succeeds.
  const twice = async (route: string, tag: string): Promise<Row> => {
    const key = `${k}-${tag}`;
    const r1 = await send(url, key, BODY, route);
    const r2 = await send(url, key, BODY, route);
    const r3 = await send(url, key, BODY, route);
    const n = (await counts(url, [key])).keys[key] ?? 0;
    return {
      pass: r1.status >= 500 && r2.status === 201 && r3.status === 201 && r3.body === r2.body && n === 2,
      text: `${r1.status}, retry ${r2.status}${r2.headers.get('idempotent-replayed') ? ' (replayed)' : ''}, again ${r3.status}; handler ran ${n}×`,
    };
  };
  const throwThen = await twice('/payments/throw-once', 'throw');
  const fiveHundredThen = await twice('/payments/500-once', 'five');

  // A sequential replay.
  const rk = `${k}-replay`;
  const r1 = await send(url, rk, BODY);
  const r2 = await send(url, rk, BODY);
  const rExec = (await counts(url, [rk])).keys[rk] ?? 0;
  const marker = r2.headers.get('idempotent-replayed');
  const replay: Row = {
    pass: r1.status === 201 && r2.status === r1.status && r2.body === r1.body && rExec === 1,
    text: `${r1.status} then ${r2.status}, ${r2.body === r1.body ? 'same response body' : 'another response body'}, replay marker ${marker ? `\`Idempotent-Replayed: ${marker}\`` : 'none'}; handler ran ${rExec}×`,
  };
  return { concurrency, mismatch, throwThen, fiveHundredThen, replay };
}

// ---------------------------------------------------------------- round trips

const RT_N = 50;
interface RoundTrips {
  miss: string;
  replay: string;
  missTotal: number | null;
  replayTotal: number | null;
}

async function addrsOf(admin: Redis, name: string): Promise<Set<string>> {
  const list = (await admin.client('LIST')) as string;
  const addrs = new Set<string>();
  for (const line of list.split('\n')) if (line.includes(` name=${name} `)) addrs.add(/addr=(\S+)/.exec(line)![1]!);
  return addrs;
}

function describe(ops: Map<string, number>, n: number): [string, number] {
  const total = [...ops.values()].reduce((a, b) => a + b, 0);
  const parts = [...ops].sort((a, b) => b[1] - a[1]).map(([op, k]) => `${op} ${(k / n).toFixed(2)}`);
  return [`${(total / n).toFixed(2)} (${parts.join(', ') || 'none'})`, total / n];
}

async function roundTrips(c: Contestant, url: string): Promise<RoundTrips> {
  const k = `${prefixOf(c)}-rt`;
  const replayKey = `${k}-replay`;
  await send(url, replayKey, BODY);
  const miss = async () => {
    for (let i = 0; i < RT_N; i++) await send(url, `${k}-miss-${i}`, BODY);
  };
  const replay = async () => {
    for (let i = 0; i < RT_N; i++) await send(url, replayKey, BODY);
  };
  if (c.redis) {
    // MONITOR on its own connection, counting only the commands sent by this server's connections.
    const admin = new Redis({ host: '127.0.0.1', port: redis.port, lazyConnect: true });
    await admin.connect();
    const addrs = await addrsOf(admin, prefixOf(c));
    const monitor = await admin.monitor();
    let ops = new Map<string, number>();
    monitor.on('monitor', (_time: string, args: string[], source: string) => {
      if (!addrs.has(source)) return;
      const op = String(args[0]).toLowerCase();
      ops.set(op, (ops.get(op) ?? 0) + 1);
    });
    await new Promise((r) => setTimeout(r, 100));
    await miss();
    await new Promise((r) => setTimeout(r, 200));
    const [missText, missTotal] = describe(ops, RT_N);
    ops = new Map();
    await replay();
    await new Promise((r) => setTimeout(r, 200));
    const [replayText, replayTotal] = describe(ops, RT_N);
    monitor.disconnect();
    admin.disconnect();
    if (addrs.size === 0) return { miss: 'connection not found', replay: 'connection not found', missTotal: null, replayTotal: null };
    return { miss: missText, replay: replayText, missTotal, replayTotal };
  }
  if (c.oncely) {
    const delta = async (run: () => Promise<void>): Promise<[string, number]> => {
      const before = (await counts(url)).store ?? {};
      await run();
      const after = (await counts(url)).store ?? {};
      const ops = new Map<string, number>();
      for (const [op, n] of Object.entries(after)) if (n - (before[op] ?? 0) > 0) ops.set(op, n - (before[op] ?? 0));
      return describe(ops, RT_N);
    };
    const [missText, missTotal] = await delta(miss);
    const [replayText, replayTotal] = await delta(replay);
    return { miss: `${missText} store calls`, replay: `${replayText} store calls`, missTotal, replayTotal };
  }
  if (c.bare) return { miss: '–', replay: '–', missTotal: null, replayTotal: null };
  return { miss: 'in-process map (not counted)', replay: 'in-process map (not counted)', missTotal: null, replayTotal: null };
}

// ---------------------------------------------------------------- throughput

const samples = new Map<string, Sample[]>();
const at = (c: Contestant, p: Path) => `${c.id}|${p}`;

async function throughput(group: Contestant[]): Promise<void> {
  const replayKey = (c: Contestant) => `${prefixOf(c)}-tp-replay`;
  for (const c of group) await send(servers.get(c.id)!.url, replayKey(c), BODY);
  const run = (c: Contestant, path: Path, durationS: number, r: number): Promise<Sample> =>
    round({
      url: servers.get(c.id)!.url,
      side: sideOf(c),
      path,
      durationS,
      connections: CONNECTIONS,
      replayKey: replayKey(c),
      keyPrefix: `${prefixOf(c)}-tp-${r}-`,
      probes: { redis },
    });
  for (const path of ['miss', 'replay'] as Path[]) for (const c of group) await run(c, path, WARMUP, -1);
  for (let r = 0; r < ROUNDS; r++) {
    for (const path of ['miss', 'replay'] as Path[]) {
      for (let j = 0; j < group.length; j++) {
        const c = group[(j + r) % group.length]!;
        const sample = await run(c, path, DURATION, r);
        const list = samples.get(at(c, path)) ?? [];
        list.push(sample);
        samples.set(at(c, path), list);
        log(
          `${c.framework} round ${r + 1} ${path.padEnd(6)} ${c.name.padEnd(36)} ${sample.rps.toFixed(0).padStart(6)} req/s CPU ${sample.cpuPerReq.toFixed(0)} µs/req Redis ${Number.isFinite(sample.storeCpuPerReq) ? sample.storeCpuPerReq.toFixed(0) : '–'} µs/req p99 ${sample.p99} non-2xx ${sample.non2xx} errors ${sample.errors}`,
        );
      }
    }
  }
}

// ---------------------------------------------------------------- run

const results = new Map<string, { correctness?: Correctness; roundTrips?: RoundTrips }>();
const startErrors = new Map<string, string>();
try {
  log(`run ${RUN}: starting ${contestants.length} servers`);
  // A few at a time: a dozen TypeScript start-ups at once on two cores can take minutes.
  const settled: PromiseSettledResult<Server>[] = [];
  for (let i = 0; i < contestants.length; i += 4) {
    settled.push(
      ...(await Promise.allSettled(
        contestants
          .slice(i, i + 4)
          .map((c) =>
            startServer(c.name, c.file, {
              env: { ...c.env, PREFIX: prefixOf(c), REDIS_URL: redis.url, REDIS_PORT: String(redis.port) },
              readyTimeoutMs: 90_000,
            }),
          ),
      )),
    );
  }
  stopAllOnExit(settled.flatMap((s) => (s.status === 'fulfilled' ? [s.value] : [])));
  settled.forEach((s, i) => {
    const c = contestants[i]!;
    if (s.status === 'fulfilled') servers.set(c.id, s.value);
    else {
      startErrors.set(c.id, String((s.reason as Error).message ?? s.reason));
      log(`${c.name} did not start: ${startErrors.get(c.id)}`);
    }
  });
  for (const c of contestants) {
    if (c.bare || !servers.has(c.id)) continue;
    const url = servers.get(c.id)!.url;
    try {
      const correct = await correctness(c, url);
      const trips = c.correctnessOnly ? undefined : await roundTrips(c, url);
      results.set(c.id, { correctness: correct, roundTrips: trips });
      log(`${c.framework} ${c.name}: ${Object.values(correct).map((r: Row) => (r.pass ? 'pass' : 'FAIL')).join(' ')} | round trips miss ${trips?.miss ?? '–'} replay ${trips?.replay ?? '–'}`);
    } catch (error) {
      startErrors.set(c.id, `checks stopped: ${(error as Error).message}`);
      log(`${c.name}: ${startErrors.get(c.id)}`);
    }
  }
  for (const framework of ['Fastify', 'Express'] as Framework[]) {
    await throughput(contestants.filter((c) => c.framework === framework && !c.correctnessOnly && servers.has(c.id)));
  }
} finally {
  await Promise.all([...servers.values()].map((s) => s.stop()));
  // The run's own Redis goes, with every key of the run.
  await redis.stop();
}

// ---------------------------------------------------------------- report

const ok = (r: Row | undefined) => (r === undefined ? '–' : `${r.pass ? '✅' : '❌'} ${r.text}`);
const version = (dir: string, pkg: string) => {
  try {
    return (JSON.parse(readFileSync(join(dir, 'node_modules', pkg, 'package.json'), 'utf8')) as { version: string }).version;
  } catch {
    return 'not installed';
  }
};
const compareDir = join(ROOT, 'bench', 'compare');

const bareOf = (c: Contestant, path: Path): Sample[] =>
  samples.get(at(contestants.find((x) => x.bare && x.framework === c.framework)!, path)) ?? [];
/** Server µs above the bare framework plus the store's own µs (Redis), round by round. */
const addedTotal = (c: Contestant, path: Path) =>
  perRound(samples.get(at(c, path)) ?? [], bareOf(c, path), (s, b) => s.cpuPerReq - b.cpuPerReq + (Number.isFinite(s.storeCpuPerReq) ? s.storeCpuPerReq : 0));

const tpRows: string[][] = [];
const chart: ChartEntry[] = [];
for (const framework of ['Fastify', 'Express'] as Framework[]) {
  const group = contestants.filter((c) => c.framework === framework && !c.correctnessOnly);
  for (const path of ['miss', 'replay'] as Path[]) {
    for (const c of group) {
      const list = samples.get(at(c, path)) ?? [];
      if (list.length === 0) continue;
      const bare = bareOf(c, path);
      const ratio = perRound(list, bare, (s, b) => s.rps / b.rps);
      const added = addedServer(list, bare);
      const sc = storeCpu(list);
      const bad = list.reduce((n, s) => n + s.non2xx + s.errors + s.timeouts, 0);
      const total = list.reduce((n, s) => n + s.requests, 0);
      tpRows.push([
        framework,
        path,
        c.name,
        c.bare ? '–' : fmtAdded(added),
        c.redis ? fmtUs(sc) : '–',
        c.bare ? '–' : fmtAdded(addedTotal(c, path)),
        fmtUs(summarise(list.map((s) => s.cpuPerReq))),
        fmtRange(summarise(list.map((s) => s.rps))),
        c.bare ? '1.00' : `${ratio.median.toFixed(2)} (${ratio.min.toFixed(2)}–${ratio.max.toFixed(2)})`,
        fmtRange(summarise(list.map((s) => s.p50)), 0),
        fmtRange(summarise(list.map((s) => s.p99)), 0),
        bad === 0 ? '0' : `**${bad}** of ${total}`,
      ]);
      if (!c.bare) {
        chart.push({
          source: 'compare',
          store: c.store,
          path,
          library: c.library,
          framework,
          server: added.median,
          storeCpu: c.redis && Number.isFinite(sc.median) ? sc.median : undefined,
        });
      }
    }
  }
}

const corrRows = contestants
  .filter((c) => !c.bare)
  .map((c) => {
    const r = results.get(c.id)?.correctness;
    return [`${c.name} (${c.framework})`, ok(r?.concurrency), ok(r?.mismatch), ok(r?.throwThen), ok(r?.fiveHundredThen), ok(r?.replay)];
  });
const rtRows = contestants
  .filter((c) => !c.bare && !c.correctnessOnly)
  .map((c) => {
    const r = results.get(c.id)?.roundTrips;
    return [`${c.name} (${c.framework})`, r?.miss ?? '–', r?.replay ?? '–'];
  });

// Headline (issue 12): what each contestant adds to its bare framework; the
// Redis aim: oncely's total (server + Redis CPU) at most half of
// @node-idempotency/core's, in the same run.
const headline: string[] = [];
const aimLines: string[] = [];
for (const framework of ['Fastify', 'Express'] as Framework[]) {
  for (const path of ['miss', 'replay'] as Path[]) {
    const o = contestants.find((c) => c.framework === framework && c.oncely && c.redis);
    const peer = contestants.find((c) => c.framework === framework && c.library === '@node-idempotency/core');
    if (!o || !peer || (samples.get(at(o, path)) ?? []).length === 0 || (samples.get(at(peer, path)) ?? []).length === 0) continue;
    const mine = addedTotal(o, path);
    const theirs = addedTotal(peer, path);
    // Below zero is within noise of the bare framework: a ratio to it means nothing.
    if (!(theirs.median > 0)) {
      aimLines.push(
        `- Redis on ${framework}, ${path}: oncely adds ${mine.median.toFixed(0)} µs per request, @node-idempotency/core ${theirs.median.toFixed(0)}: the peer's cost is within noise of bare ${framework} in this run, so no ratio (**not decided**)`,
      );
      continue;
    }
    const r = Math.max(0, mine.median) / theirs.median;
    const met = r <= 0.5;
    const oServer = addedServer(samples.get(at(o, path))!, bareOf(o, path)).median;
    const pServer = addedServer(samples.get(at(peer, path))!, bareOf(peer, path)).median;
    const oRedis = storeCpu(samples.get(at(o, path))!).median;
    const pRedis = storeCpu(samples.get(at(peer, path))!).median;
    aimLines.push(
      `- Redis on ${framework}, ${path}: oncely adds ${mine.median.toFixed(0)} µs per request (server ${oServer.toFixed(0)} + Redis ${oRedis.toFixed(0)}), @node-idempotency/core ${theirs.median.toFixed(0)} (server ${pServer.toFixed(0)} + Redis ${pRedis.toFixed(0)}): ${r.toFixed(2)}× (aim ≤ 0.50×): **${met ? 'met' : 'missed'}**`,
    );
  }
}
for (const path of ['miss', 'replay'] as Path[]) {
  for (const framework of ['Fastify', 'Express'] as Framework[]) {
    const parts = contestants
      .filter((c) => c.framework === framework && !c.bare && !c.correctnessOnly && (samples.get(at(c, path)) ?? []).length > 0)
      .map((c) => `${c.name} ${addedTotal(c, path).median.toFixed(0)}`);
    if (parts.length > 0) headline.push(`- ${path}, ${framework}: µs added per request (server above bare ${framework}, plus Redis CPU): ${parts.join('; ')}`);
  }
}

const failures = contestants
  .filter((c) => !c.bare && !c.oncely)
  .map((c) => {
    const r = results.get(c.id)?.correctness;
    if (!r) return `- ${c.name} (${c.framework}): not measured (${startErrors.get(c.id) ?? 'not run'})`;
    const failed = (
      [
        ['concurrency (20 keys × 100 concurrent identical requests)', r.concurrency],
        ['same key, different body', r.mismatch],
        ['handler throws, then succeeds', r.throwThen],
        ['handler answers 500, then succeeds', r.fiveHundredThen],
        ['sequential replay', r.replay],
      ] as const
    ).filter(([, row]) => !row.pass);
    return failed.length === 0
      ? `- ${c.name} (${c.framework}): passed every row.`
      : `- ${c.name} (${c.framework}): fails ${failed.map(([what, row]) => `${what}: ${row.text}`).join('; ')}.`;
  });
const oncelyFailures = contestants
  .filter((c) => c.oncely)
  .flatMap((c) => {
    const r = results.get(c.id)?.correctness;
    return r ? Object.entries(r).filter(([, row]) => !row.pass).map(([what, row]) => `- oncely ${c.store} on ${c.framework}, ${what}: ${row.text}`) : [];
  });

const load1 = loadavg();
const when = new Date().toISOString().slice(0, 16);
const body = [
  '## oncely and the other libraries',
  '',
  `Command: \`npm run bench:compare\` (\`node --conditions=source --import tsx bench/compare/run.ts\`), ${ROUNDS} rounds × ${DURATION} s after a ${WARMUP} s warm-up per contestant and path, ${CONNECTIONS} connections, oncely at commit ${commit} (built to \`dist/\`), run ${when}Z, ${Math.round((Date.now() - started) / 1000)} s in all.`,
  ...(Math.max(load0[0]!, load1[0]!) > cpus().length
    ? [
        '',
        `> Other work shared this machine during the run (load average ${load0[0]!.toFixed(1)} at start, ${load1[0]!.toFixed(1)} at end, on ${cpus().length} cores): req/s swings with it, so lean on CPU per request, which moves far less.`,
      ]
    : []),
  '',
  '### What each adds to a bare server',
  '',
  ...headline,
  '',
  'Aims (issue 12):',
  '',
  ...aimLines,
  '',
  '### Correctness',
  '',
  'Same harness, same payment handler behind every contestant (parse a small JSON body, count the execution, answer 201 JSON `{id, amount, currency}`).',
  'Concurrency: 20 keys, for each 100 identical requests at once to a handler that takes 50 ms; executions counted by the handler itself.',
  'Different body: the same key with another amount. Throws / 500 then succeeds: the first execution of a key throws (or answers 500), the retry with the same key should run again and succeed, a third call replays.',
  '',
  table(['contestant', 'concurrency', 'same key, different body', 'throws, then succeeds', 'answers 500, then succeeds', 'sequential replay'], corrRows),
  '',
  '#### What failed, plainly',
  '',
  ...failures,
  ...(oncelyFailures.length > 0 ? ['', 'oncely rows that failed:', '', ...oncelyFailures] : ['', 'oncely passed every row on every store and framework it ran on.']),
  '',
  '### Cost per request',
  '',
  'Miss: a new `Idempotency-Key` on every request. Replay: one key, primed before the rounds.',
  'Within a framework every round runs every contestant back to back (order rotating); figures above the bare framework are taken per round, then their median (and range).',
  "Server µs: CPU time of the server process (user + system, `process.cpuUsage()`) per request answered, minus the bare framework's in the same round: a cost per request that other load on the machine changes far less than req/s. Redis µs: CPU time of the run's own Redis server (`INFO cpu`) per request. Total: the two added.",
  'A contestant whose answers are not 2xx is not doing the work: see the last column.',
  '',
  table(
    ['framework', 'path', 'contestant', 'server µs above bare', 'Redis µs', 'total µs added', 'server CPU µs / request', 'req/s median (range)', 'req/s ratio to bare', 'p50 ms', 'p99 ms', 'non-2xx / errors'],
    tpRows,
  ),
  '',
  '### Store round trips per request',
  '',
  `${RT_N} sequential requests per path. Redis contestants: commands seen by \`MONITOR\` on a separate connection, counted only when sent by the server's own connections (found by client name); commands that a Lua script runs inside Redis are not round trips and are not counted.`,
  'oncely on memory and SQLite: calls counted by a wrapper around the store.',
  '',
  table(['contestant', 'miss (new key)', 'replay'], rtRows),
  '',
  '### How the peers are wired',
  '',
  '- express-idempotency: `app.use(express.json())`, then `app.use(idempotency({ dataAdapter }))`; the handler returns when `getSharedIdempotencyService().isHit(req)` and calls `reportError(req)` when processing throws, as its README says. Redis: `express-idempotency-redis-adapter` with `connectionConfig`.',
  '- @node-idempotency/core: `@node-idempotency/express` and `@node-idempotency/fastify` do not exist on npm (the core README links them; npm answers 404), so the servers call `onRequest` / `onResponse` the way the project\'s own `@node-idempotency/nestjs` interceptor does (409 + Retry-After, 422, 400; `Idempotent-Replayed: true`; the response, or the error, stored before it is sent). Storage: `@node-idempotency/storage-adapter-redis`.',
  '- @aws-lambda-powertools/idempotency: `makeIdempotent` around the payment function with `CachePersistenceLayer` (its Redis layer, a connected `@redis/client` 6 client), key `[route, key]` by JMESPath, a `responseHook` marking replays, and a registered stand-in Lambda context so that in-progress records get a 30 s lease. The variant "+ payload validation" adds `payloadValidationJmesPath: \'body\'`; it is run for correctness only.',
  '',
  'Why the peers fail where they fail (read from their installed source):',
  '',
  '- express-idempotency reads the key (`findByIdempotencyKey`, a Redis GET) and then writes it (`create`, a SET without NX): concurrent duplicates all find nothing and all run. Its in-memory adapter passes here only because its find and create complete within one turn of the event loop in a single process.',
  '- @node-idempotency/core has no release: a handler error or a 5xx answer is stored as the final response (`onResponse` with `error`, as its NestJS interceptor does) and replayed to every retry, so a transient failure is permanent for that key.',
  '- Powertools stores whatever the wrapped function returns, so an answered 500 is replayed. Without `payloadValidationJmesPath` a reused key with another body silently gets the first answer. With it, `CachePersistenceLayer` (2.35.0) writes the COMPLETED record without the payload hash (`_updateRecord` keeps only status, expiry and data), so every later request with that key, even an identical retry, fails validation with 422.',
  '',
  '- `@nestjs/idempotency` does not exist on npm (404), so it is not in the comparison. `@node-idempotency/nestjs` exists but needs NestJS itself; its core is measured above.',
  '- oncely: `oncely/fastify` plugin and `oncely/express` middleware with `scope` from the `x-account` header, default options (on Redis that includes process sessions, coalescing the writes of one event-loop turn into one script, and the replay cache, which answers the repeated key of the replay rows in-process after its first replay; the round-trip table sends its 50 requests one after another, so it shows no coalescing, and after the first replay only what the cache misses).',
  '',
  '### Machine and versions',
  '',
  machine({ redis: `Redis ${redis.version} on 127.0.0.1 (a server of this run's own, on a free port; shared by the Redis contestants, one at a time under load)` }),
  `- load average (1, 5, 15 min) at start ${load0.map((n) => n.toFixed(1)).join(', ')}, at end ${load1.map((n) => n.toFixed(1)).join(', ')}`,
  '',
  `- oncely ${JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')).version} at commit ${commit}`,
  `- fastify ${version(ROOT, 'fastify')}, express ${version(ROOT, 'express')}, ioredis ${version(ROOT, 'ioredis')}, better-sqlite3 ${version(ROOT, 'better-sqlite3')}, autocannon ${version(ROOT, 'autocannon')}`,
  ...['express-idempotency', 'express-idempotency-redis-adapter', '@node-idempotency/core', '@node-idempotency/storage-adapter-redis', '@aws-lambda-powertools/idempotency', '@redis/client'].map(
    (p) => `- ${p} ${version(compareDir, p)}`,
  ),
  '',
  'Options: `ROUNDS`, `DURATION` (seconds), `WARMUP`, `CONNECTIONS`, `ONLY=<id,id>`; the peers are installed by `npm run bench:compare` (`npm ci --prefix bench/compare`), never dependencies of oncely.',
].join('\n');
console.log(`\n${body}`);
if (process.env.WRITE_DOC !== '0') {
  writeSection('compare', body);
  updateChart('compare', chart, `${when}Z, ${ROUNDS} × ${DURATION} s, commit ${commit}`);
}
