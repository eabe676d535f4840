/**
 * The purge benchmark (issue 14): how fast each store without native TTL
 * deletes expired records, and whether its purge keeps up with new keys.
 *
 *   npm run bench:purge
 *   (node --conditions=source --import tsx bench/purge.ts)
 *   STORES=sqlite,postgres,mysql BACKLOG=100000 BATCHES=500,1000,5000 RATE=2000,5000 SECONDS=40 TTL_MS=5000 (the defaults)
 *
 * 1. Backlog: BACKLOG expired records (plus BACKLOG/5 live ones, so that the
 *    index holds both), rows like real ones (64-character id, fingerprint,
 *    token, a 400-byte outcome), then one drain with `purgeExpiredRecords`
 *    per batch size: records deleted per second, and how long the longest
 *    batch held its statement (the SQLite write lock and event loop; the
 *    row locks elsewhere).
 * 2. Steady state: RATE new keys per second for SECONDS (inserted straight
 *    in SQL every 50 ms, each retained TTL_MS), while the same drain runs
 *    every 10 s with batches of 1000 (the stores' default background purge,
 *    whose timer calls `purgeExpiredRecords` just like this). Counted just
 *    before and just after each drain: the expired records not yet deleted.
 *    The purge keeps up when a drain leaves (almost) none behind, whatever
 *    piled up in the 10 s before, and the drains take a small share of the
 *    time.
 *
 * Needs PostgreSQL on 127.0.0.1:5432 (db `test`) and MariaDB/MySQL on
 * 127.0.0.1:3306 (db `test`), as the tests do; every table has a random
 * name and is dropped at the end. Bounded in time: fixed sizes and durations,
 * and a watchdog ends the run after 15 minutes. Not a test.
 */
import { randomBytes, randomUUID } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import mysql from 'mysql2/promise';
import type { IdempotencyStore } from 'oncely';
import { migrateMysql, mysqlStore } from 'oncely/stores/mysql';
import { migratePostgres, postgresStore, purgeExpiredRecords } from 'oncely/stores/postgres';
import { sqliteStore } from 'oncely/stores/sqlite';
import pg from 'pg';

type Kind = 'sqlite' | 'postgres' | 'mysql';

const STORES = (process.env.STORES ?? 'sqlite,postgres,mysql').split(',') as Kind[];
const BACKLOG = Number(process.env.BACKLOG ?? 100_000);
const BATCHES = (process.env.BATCHES ?? '500,1000,5000').split(',').map(Number);
const RATES = (process.env.RATE ?? '2000,5000').split(',').map(Number);
const SECONDS = Number(process.env.SECONDS ?? 40);
const TTL_MS = Number(process.env.TTL_MS ?? 5_000);
const INTERVAL_MS = 10_000;
const STEADY_BATCH = 1000;
const OUTCOME = JSON.stringify({ status: 201, headers: { 'content-type': 'application/json' }, body: 'x'.repeat(330) });

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const hex = (): string => randomBytes(32).toString('hex');

/** One store under test, with the raw SQL the benchmark needs around it. */
interface Bench {
  store: IdempotencyStore;
  /** Insert `n` completed records expiring at `expiresAt(i)` (epoch ms). */
  insert(n: number, expiresAt: (i: number) => number): Promise<void>;
  /** Expired records still in the table. */
  expired(): Promise<number>;
  /** Empty the table. */
  clear(): Promise<void>;
  cleanup(): Promise<void>;
}

function row(expiresAt: number): [string, string, string, number, number, string] {
  return [hex(), randomUUID(), `v1:${hex()}`, expiresAt, expiresAt, OUTCOME];
}

async function open(kind: Kind): Promise<Bench> {
  const table = `oncely_bench_purge_${randomBytes(4).toString('hex')}`;
  if (kind === 'sqlite') {
    const dir = mkdtempSync(join(tmpdir(), 'oncely-bench-purge-'));
    const db = new Database(join(dir, 'purge.db'));
    const store = sqliteStore({ database: db, table, purge: false });
    const insert = db.prepare(
      `INSERT INTO "${table}" (id, state, token, fingerprint, lease_until, expires_at, outcome) VALUES (?, 1, ?, ?, ?, ?, ?)`,
    );
    const many = db.transaction((n: number, expiresAt: (i: number) => number) => {
      for (let i = 0; i < n; i++) insert.run(...row(expiresAt(i)));
    });
    const expired = db.prepare(`SELECT count(*) AS n FROM "${table}" WHERE expires_at <= ?`);
    return {
      store,
      async insert(n, expiresAt) {
        for (let done = 0; done < n; done += 10_000) many(Math.min(10_000, n - done), (i) => expiresAt(done + i));
      },
      expired: async () => (expired.get(Date.now()) as { n: number }).n,
      async clear() {
        db.exec(`DELETE FROM "${table}"`);
      },
      async cleanup() {
        await store.close();
        db.close();
        rmSync(dir, { recursive: true, force: true });
      },
    };
  }
  if (kind === 'postgres') {
    const pool = new pg.Pool({ host: process.env.PGHOST ?? '127.0.0.1', user: process.env.PGUSER ?? 'postgres', database: process.env.PGDATABASE ?? 'test', max: 4 });
    pool.on('error', () => {});
    await migratePostgres(pool, { table });
    const store = postgresStore({ pool, table, purge: false });
    const expired = `SELECT count(*)::int AS n FROM "${table}" WHERE expires_at <= (extract(epoch FROM clock_timestamp()) * 1000)::bigint`;
    return {
      store,
      async insert(n, expiresAt) {
        for (let done = 0; done < n; done += 5_000) {
          const rows = Array.from({ length: Math.min(5_000, n - done) }, (_, i) => row(expiresAt(done + i)));
          await pool.query(
            `INSERT INTO "${table}" (id, state, token, fingerprint, lease_until, expires_at, outcome)
             SELECT id, 1, token, fp, lease, exp, convert_to(outcome, 'UTF8')
               FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::text[]) AS r(id, token, fp, lease, exp, outcome)`,
            [0, 1, 2, 3, 4, 5].map((c) => rows.map((r) => r[c])),
          );
        }
      },
      expired: async () => Number((await pool.query(expired)).rows[0].n),
      async clear() {
        await pool.query(`TRUNCATE "${table}"`);
      },
      async cleanup() {
        await store.close();
        await pool.query(`DROP TABLE IF EXISTS "${table}"`);
        await pool.end();
      },
    };
  }
  const pool = mysql.createPool({ host: process.env.MYSQL_HOST ?? '127.0.0.1', user: process.env.MYSQL_USER ?? 'root', database: process.env.MYSQL_DATABASE ?? 'test', connectionLimit: 4 });
  await migrateMysql(pool, { table });
  const store = mysqlStore({ pool, table, purge: false });
  const expired = `SELECT COUNT(*) AS n FROM \`${table}\` WHERE expires_at <= (TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(3)) DIV 1000)`;
  return {
    store,
    async insert(n, expiresAt) {
      for (let done = 0; done < n; done += 1_000) {
        const rows = Array.from({ length: Math.min(1_000, n - done) }, (_, i) => row(expiresAt(done + i)));
        await pool.query(
          `INSERT INTO \`${table}\` (id, state, token, fingerprint, lease_until, expires_at, outcome) VALUES ${rows.map(() => '(?, 1, ?, ?, ?, ?, ?)').join(', ')}`,
          rows.flat(),
        );
      }
    },
    async expired() {
      const [rows] = await pool.query(expired);
      return Number((rows as Array<{ n: number }>)[0]?.n ?? 0);
    },
    async clear() {
      await pool.query(`TRUNCATE TABLE \`${table}\``);
    },
    async cleanup() {
      await store.close();
      await pool.query(`DROP TABLE IF EXISTS \`${table}\``);
      await pool.end();
    },
  };
}

/** The store with each purge batch timed. */
function timed(store: IdempotencyStore): { store: Pick<IdempotencyStore, 'purgeExpired'>; batchMs: number[] } {
  const batchMs: number[] = [];
  return {
    batchMs,
    store: {
      async purgeExpired(limit) {
        const started = performance.now();
        const n = await store.purgeExpired(limit);
        batchMs.push(performance.now() - started);
        return n;
      },
    },
  };
}

const quantile = (values: number[], q: number): number => {
  if (values.length === 0) return 0;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))] ?? 0;
};
const fmt = (n: number, digits = 0): string => n.toLocaleString('en-US', { maximumFractionDigits: digits, minimumFractionDigits: digits });

interface BacklogRow {
  kind: Kind;
  batch: number;
  deleted: number;
  seconds: number;
  perSecond: number;
  batches: number;
  p50: number;
  max: number;
}

async function backlog(kind: Kind, bench: Bench, batch: number): Promise<BacklogRow> {
  await bench.clear();
  const past = Date.now() - 60_000;
  await bench.insert(BACKLOG, (i) => past + (i % 10_000));
  await bench.insert(Math.round(BACKLOG / 5), () => Date.now() + 3_600_000);
  const probe = timed(bench.store);
  const report = await purgeExpiredRecords(probe.store, { batch });
  const left = await bench.expired();
  if (left !== 0 || report.deleted !== BACKLOG) throw new Error(`${kind}: ${report.deleted} deleted, ${left} expired left`);
  return {
    kind,
    batch,
    deleted: report.deleted,
    seconds: report.ms / 1000,
    perSecond: report.deleted / (report.ms / 1000),
    batches: report.batches,
    p50: quantile(probe.batchMs, 0.5),
    max: Math.max(...probe.batchMs),
  };
}

interface SteadyRow {
  kind: Kind;
  rate: number;
  achieved: number;
  /** Most expired records found just before a drain. */
  before: number;
  /** Most expired records left just after a drain. */
  after: number;
  deleted: number;
  drains: number;
  /** Longest drain, ms. */
  longestDrain: number;
  /** Share of the run spent in purge statements. */
  busy: number;
  maxBatch: number;
}

async function steady(kind: Kind, bench: Bench, rate: number): Promise<SteadyRow> {
  await bench.clear();
  const probe = timed(bench.store);
  const started = Date.now();
  const until = started + SECONDS * 1000;
  let inserted = 0;
  let deleted = 0;
  let drains = 0;
  let before = 0;
  let after = 0;
  let longestDrain = 0;
  let stop = false;
  // The background purge as the stores run it: a drain, then INTERVAL_MS of rest.
  const purger = (async () => {
    for (let rest = Date.now() + INTERVAL_MS / 2; !stop; rest = Date.now() + INTERVAL_MS) {
      while (!stop && Date.now() < rest) await sleep(50);
      if (stop) break;
      before = Math.max(before, await bench.expired());
      const report = await purgeExpiredRecords(probe.store, { batch: STEADY_BATCH });
      after = Math.max(after, await bench.expired());
      deleted += report.deleted;
      longestDrain = Math.max(longestDrain, report.ms);
      drains++;
    }
  })();
  // New keys at `rate`: every 50 ms, as many as are due by then.
  while (Date.now() < until) {
    const due = Math.floor(((Date.now() - started) / 1000) * rate) - inserted;
    if (due > 0) {
      await bench.insert(due, () => Date.now() + TTL_MS);
      inserted += due;
    }
    await sleep(50);
  }
  const seconds = (Date.now() - started) / 1000;
  stop = true;
  await purger;
  const busyMs = probe.batchMs.reduce((sum, ms) => sum + ms, 0);
  return {
    kind,
    rate,
    achieved: inserted / seconds,
    before,
    after,
    deleted,
    drains,
    longestDrain,
    busy: busyMs / (seconds * 1000),
    maxBatch: Math.max(0, ...probe.batchMs),
  };
}

const NAMES: Record<Kind, string> = { sqlite: 'SQLite', postgres: 'PostgreSQL', mysql: 'MariaDB' };

async function main(): Promise<void> {
  const watchdog = setTimeout(() => {
    console.error('bench:purge: stopped by its 15-minute watchdog');
    process.exit(1);
  }, 15 * 60_000);
  watchdog.unref();
  const load = loadavg();
  const began = new Date();
  const backlogs: BacklogRow[] = [];
  const steadies: SteadyRow[] = [];
  for (const kind of STORES) {
    const bench = await open(kind);
    try {
      for (const batch of BATCHES) {
        const result = await backlog(kind, bench, batch);
        backlogs.push(result);
        console.error(`${kind} backlog, batch ${batch}: ${fmt(result.perSecond)} records/s`);
      }
      for (const rate of RATES) {
        const result = await steady(kind, bench, rate);
        steadies.push(result);
        console.error(`${kind} steady at ${rate}/s: ${result.before} expired before a drain, ${result.after} after`);
      }
    } finally {
      await bench.cleanup();
    }
  }
  const lines: string[] = [];
  lines.push(
    `Backlog: ${fmt(BACKLOG)} expired records and ${fmt(BACKLOG / 5)} live ones, one drain (\`purgeExpiredRecords\`) per batch size.`,
    '',
    '| store | batch | deleted | seconds | records/s | batches | batch p50 ms | batch max ms |',
    '| --- | --- | --- | --- | --- | --- | --- | --- |',
  );
  for (const r of backlogs) {
    lines.push(
      `| ${NAMES[r.kind]} | ${r.batch} | ${fmt(r.deleted)} | ${fmt(r.seconds, 2)} | ${fmt(r.perSecond)} | ${r.batches} | ${fmt(r.p50, 1)} | ${fmt(r.max, 1)} |`,
    );
  }
  lines.push(
    '',
    `Steady state: new keys for ${SECONDS} s, each retained ${TTL_MS / 1000} s; a drain (batches of ${STEADY_BATCH}) every ${INTERVAL_MS / 1000} s, as the stores' default background purge. Expired: records past their retention not yet deleted, counted just before and just after each drain.`,
    '',
    '| store | new keys/s (achieved) | drains | deleted | expired before a drain (max) | expired after a drain (max) | longest drain ms | longest batch ms | purge busy |',
    '| --- | --- | --- | --- | --- | --- | --- | --- | --- |',
  );
  for (const r of steadies) {
    lines.push(
      `| ${NAMES[r.kind]} | ${fmt(r.rate)} (${fmt(r.achieved)}) | ${r.drains} | ${fmt(r.deleted)} | ${fmt(r.before)} | ${fmt(r.after)} | ${fmt(r.longestDrain)} | ${fmt(r.maxBatch, 1)} | ${fmt(r.busy * 100, 1)} % |`,
    );
  }
  lines.push(
    '',
    `Run ${began.toISOString().slice(0, 16)}Z, ${fmt((Date.now() - began.getTime()) / 1000)} s in all; ${cpus()[0]?.model ?? 'unknown CPU'}, ${cpus().length} cores, load average ${load.map((l) => l.toFixed(1)).join(', ')} at start; Node.js ${process.version}; the databases on the same machine.`,
  );
  console.log(lines.join('\n'));
}

await main();
