/**
 * One measured round of one contestant, and what the harnesses derive from
 * rounds: server CPU per request, the store's own CPU per request (the
 * benchmark's private Redis, or the PostgreSQL backends and MariaDB threads
 * of the server's own connections), round trips per request, and the
 * figures above the bare framework, taken round by round.
 */
import { counts, type Counts, load, type Path, type RunResult, type Summary, summarise } from './load.js';
import type { BenchRedis } from './redis.js';
import { cpuDeltaUs, type CpuSnapshot, type MysqlCpu, pgSnapshot } from './storecpu.js';

/** Which store a contestant's CPU and round trips are read from. */
export type StoreSide = 'none' | 'memory' | 'sqlite' | 'redis' | 'postgres' | 'mariadb';

export interface Sample extends RunResult {
  /** Handler executions over the round. */
  executions: number;
  /** Server CPU time per request, µs. */
  cpuPerReq: number;
  /** The server's garbage-collection pauses per request, µs (NaN when not reported). */
  gcPerReq: number;
  /** The store's own CPU time per request, µs (NaN: not measurable, or nothing to measure). */
  storeCpuPerReq: number;
  /** oncely store calls over the round, by operation (counting wrapper; none for peers). */
  store: Record<string, number>;
  /** Round trips to the store over the round (Redis commands, SQL statements), or NaN when not counted. */
  trips: number;
  /** Round trips by command or kind. */
  tripsBy: Record<string, number>;
}

export interface Probes {
  redis?: BenchRedis;
  mysql?: MysqlCpu;
}

interface Snapshot {
  counts: Counts | null;
  cpu?: CpuSnapshot | number;
  commands?: Record<string, number>;
}

type Backends = { pg?: number[]; mysql?: number[] };

async function snapshot(url: string, side: StoreSide, probes: Probes): Promise<Snapshot> {
  const c = await counts(url).catch(() => null);
  const backends = (c as (Counts & { backends?: Backends }) | null)?.backends;
  if (side === 'redis' && probes.redis) return { counts: c, cpu: await probes.redis.cpuUs(), commands: await probes.redis.commands() };
  if (side === 'postgres' && backends?.pg) return { counts: c, cpu: pgSnapshot(backends.pg) };
  if (side === 'mariadb' && backends?.mysql && probes.mysql) return { counts: c, cpu: await probes.mysql.snapshot(backends.mysql) };
  return { counts: c };
}

function delta(before: Record<string, number> | undefined, after: Record<string, number> | undefined): Record<string, number> {
  const out: Record<string, number> = {};
  for (const [k, n] of Object.entries(after ?? {})) {
    const d = n - (before?.[k] ?? 0);
    if (d > 0) out[k] = d;
  }
  return out;
}

export interface RoundOptions {
  url: string;
  side: StoreSide;
  path: Path;
  durationS: number;
  connections: number;
  replayKey: string;
  keyPrefix: string;
  probes: Probes;
}

/** Load one server for one round and read what it cost. */
export async function round(o: RoundOptions): Promise<Sample> {
  const before = await snapshot(o.url, o.side, o.probes);
  const r = await load({ url: o.url, path: o.path, durationS: o.durationS, connections: o.connections, replayKey: o.replayKey, keyPrefix: o.keyPrefix });
  const after = await snapshot(o.url, o.side, o.probes);
  const n = Math.max(1, r.requests);
  const store = delta(before.counts?.store, after.counts?.store);
  let storeCpu = Number.NaN;
  if (typeof before.cpu === 'number' && typeof after.cpu === 'number') storeCpu = after.cpu - before.cpu;
  else if (before.cpu instanceof Map && after.cpu instanceof Map) storeCpu = cpuDeltaUs(before.cpu, after.cpu);
  let tripsBy: Record<string, number> = {};
  if (o.side === 'redis') {
    // Commands the server's client sent (oncely's counting wrapper), else every command Redis ran
    // (a peer: it runs no scripts, so each command is a round trip).
    const sent = Object.entries(store).filter(([k]) => k.startsWith('cmd:'));
    tripsBy = sent.length > 0 || before.counts?.store ? Object.fromEntries(sent.map(([k, n]) => [k.slice(4), n])) : delta(before.commands, after.commands);
  } else if (o.side === 'postgres' || o.side === 'mariadb') tripsBy = { statements: store.statements ?? 0 };
  else if (o.side === 'memory' || o.side === 'sqlite') {
    for (const [op, k] of Object.entries(store)) if (op !== 'heartbeat' && !op.startsWith('cmd:')) tripsBy[op] = k;
  }
  const trips = o.side === 'none' ? Number.NaN : Object.values(tripsBy).reduce((a, b) => a + b, 0);
  return {
    ...r,
    executions: (after.counts?.total ?? 0) - (before.counts?.total ?? 0),
    cpuPerReq: before.counts && after.counts ? (after.counts.cpuUs - before.counts.cpuUs) / n : Number.NaN,
    gcPerReq:
      before.counts?.gcUs !== undefined && after.counts?.gcUs !== undefined ? (after.counts.gcUs - before.counts.gcUs) / n : Number.NaN,
    storeCpuPerReq: storeCpu / n,
    store,
    trips,
    tripsBy,
  };
}

/** Per round: `f(sample, bare sample)`, then median and range over the rounds. */
export function perRound(samples: readonly Sample[], bare: readonly Sample[], f: (s: Sample, b: Sample) => number): Summary {
  return summarise(samples.map((s, i) => (bare[i] ? f(s, bare[i]!) : Number.NaN)).filter((v) => Number.isFinite(v)));
}

/** Server CPU µs per request above the bare framework's, round by round. */
export const addedServer = (samples: readonly Sample[], bare: readonly Sample[]): Summary =>
  perRound(samples, bare, (s, b) => s.cpuPerReq - b.cpuPerReq);

/** The store's CPU µs per request (NaN when not measured). */
export const storeCpu = (samples: readonly Sample[]): Summary => {
  const values = samples.map((s) => s.storeCpuPerReq).filter((v) => Number.isFinite(v));
  return values.length === 0 ? { median: Number.NaN, min: Number.NaN, max: Number.NaN } : summarise(values);
};

/** Round trips per request over all rounds, and by command. */
export function tripsPerRequest(samples: readonly Sample[]): { total: number; by: Record<string, number> } {
  const requests = samples.reduce((n, s) => n + s.requests, 0);
  const by: Record<string, number> = {};
  let total = 0;
  for (const s of samples) {
    if (!Number.isFinite(s.trips)) return { total: Number.NaN, by };
    total += s.trips;
    for (const [k, n] of Object.entries(s.tripsBy)) by[k] = (by[k] ?? 0) + n;
  }
  for (const k of Object.keys(by)) by[k]! /= Math.max(1, requests);
  return { total: total / Math.max(1, requests), by };
}

/** `+12 (9–15)`, signed; `–` when not a number. */
export function fmtAdded(s: Summary, digits = 0): string {
  if (!Number.isFinite(s.median)) return '–';
  const f = (n: number) => `${n >= 0 ? '+' : '−'}${Math.abs(n).toFixed(digits)}`;
  return s.min === s.max ? f(s.median) : `${f(s.median)} (${f(s.min)}…${f(s.max)})`;
}

/** `12 (9–15)`, `–` when not a number. */
export function fmtUs(s: Summary, digits = 0): string {
  if (!Number.isFinite(s.median)) return '–';
  return s.min === s.max ? s.median.toFixed(digits) : `${s.median.toFixed(digits)} (${s.min.toFixed(digits)}–${s.max.toFixed(digits)})`;
}

/** `2.00 (claim 1.00, complete 1.00)`. */
export function fmtTrips(t: { total: number; by: Record<string, number> }): string {
  if (!Number.isFinite(t.total)) return '–';
  const parts = Object.entries(t.by)
    .filter(([, n]) => n >= 0.005)
    .sort((a, b) => b[1] - a[1])
    .map(([k, n]) => `${k} ${n.toFixed(2)}`);
  return `${t.total.toFixed(2)}${parts.length > 0 ? ` (${parts.join(', ')})` : ''}`;
}
