/**
 * The SQLite store alone, in-process: CPU µs per new key (claim + complete)
 * and per replay (claim of a completed key), 50 operations in flight as
 * under HTTP load, on a fresh file, after a warm-up of 20,000 keys. Compares
 * page-cache settings side by side (one process each, in turn):
 *
 *   node --conditions=source --import tsx bench/sqlite-store.ts
 *   MODES=default,sql,cache,mmap ROUNDS=3 N=20000
 *
 * - default: the store's own settings (WAL, synchronous=NORMAL, SQLite's default cache)
 * - cache: `PRAGMA cache_size = -65536` (64 MiB of page cache)
 * - mmap: `PRAGMA mmap_size = 268435456` (reads through a 256 MiB memory map)
 * - sql: not the store: the SQL statements it runs, alone, on the same
 *   table and settings (per new key a plain read, then in one
 *   `BEGIN IMMEDIATE` per 50 keys the read again and the insert, then in
 *   another the completion; per replay the plain read). The floor of any
 *   SQLite store built this way on this machine, before oncely's own work.
 */
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import Database from 'better-sqlite3';
import { sqliteStore } from '../src/stores/sqlite.js';

const N = Number(process.env.N ?? 20_000);
const ROUNDS = Number(process.env.ROUNDS ?? 3);
const IN_FLIGHT = 50;

async function measure(mode: string): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'oncely-sqlite-bench-'));
  const db = new Database(join(dir, 'bench.db'));
  const store = sqliteStore({ database: db, purge: false });
  if (mode === 'cache') db.pragma('cache_size = -65536');
  if (mode === 'mmap') db.pragma('mmap_size = 268435456');
  // A stored HTTP answer as the front doors write it: meta line, then a ~200-byte body.
  const outcome = `${JSON.stringify({ s: 201, h: [['content-type', 'application/json']] })}\n${'x'.repeat(200)}`;
  const input = { fingerprint: `v1:${'a'.repeat(64)}`, leaseMs: 30_000, ttlMs: 86_400_000 };
  const ids: string[] = [];
  const cpu = async (n: number, one: (i: number) => Promise<unknown>): Promise<number> => {
    const start = process.cpuUsage();
    for (let i = 0; i < n; i += IN_FLIGHT) {
      const batch: Promise<unknown>[] = [];
      for (let j = i; j < Math.min(n, i + IN_FLIGHT); j++) batch.push(one(j));
      await Promise.all(batch);
    }
    const used = process.cpuUsage(start);
    return (used.user + used.system) / n;
  };
  const miss = () =>
    cpu(N, async () => {
      const id = randomBytes(32).toString('hex');
      ids.push(id);
      const claim = await store.claim(id, input);
      if (claim.status === 'acquired') await store.complete(id, claim.token, outcome, 86_400_000);
    });
  const replay = () => cpu(N, (i) => store.claim(ids[(i * 7919) % ids.length]!, input));
  // sql: the store's own statements (copied from src/stores/sqlite.ts; keep them in step), run
  // directly, as its group commit batches them.
  const statementsAlone = (): { miss: () => Promise<number>; replay: () => Promise<number> } => {
    const t = 'oncely_records';
    const select = db.prepare(`SELECT state, token, fingerprint, lease_until, expires_at, outcome, owner FROM ${t} WHERE id = ?`);
    const insert = db.prepare(
      `INSERT OR REPLACE INTO ${t} (id, state, token, fingerprint, lease_until, expires_at, outcome, owner) VALUES (?, 0, ?, ?, ?, ?, NULL, ?)`,
    );
    const complete = db.prepare(
      `UPDATE ${t} SET state = 1, outcome = ?, expires_at = ? WHERE id = ? AND token = ? AND state = 0 AND expires_at > ?`,
    );
    const begin = db.prepare('BEGIN IMMEDIATE');
    const commit = db.prepare('COMMIT');
    return {
      miss: async () => {
        const start = process.cpuUsage();
        for (let i = 0; i < N; i += IN_FLIGHT) {
          const at = Date.now();
          const batch = Array.from({ length: Math.min(IN_FLIGHT, N - i) }, () => randomBytes(32).toString('hex'));
          for (const id of batch) select.get(id);
          begin.run();
          for (const id of batch) {
            select.get(id);
            insert.run(id, 't', input.fingerprint, at + input.leaseMs, at + input.ttlMs, null);
          }
          commit.run();
          begin.run();
          for (const id of batch) complete.run(outcome, at + input.ttlMs, id, 't', at);
          commit.run();
          ids.push(...batch);
          await new Promise((resolve) => setImmediate(resolve));
        }
        const used = process.cpuUsage(start);
        return (used.user + used.system) / N;
      },
      replay: () => cpu(N, async (i) => select.get(ids[(i * 7919) % ids.length]!)),
    };
  };
  const run = mode === 'sql' ? statementsAlone() : { miss, replay };
  await run.miss();
  const misses: number[] = [];
  const replays: number[] = [];
  for (let r = 0; r < ROUNDS; r++) misses.push(await run.miss());
  for (let r = 0; r < ROUNDS; r++) replays.push(await run.replay());
  const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!.toFixed(1);
  console.log(`| ${mode === 'sql' ? 'sql (the statements alone)' : mode} | ${ids.length} | ${median(misses)} | ${median(replays)} |`);
  await store.close();
  db.close();
  rmSync(dir, { recursive: true, force: true });
}

const mode = process.argv[2];
if (mode) await measure(mode);
else {
  console.log(`SQLite store alone: CPU µs per operation, median of ${ROUNDS} rounds of ${N}, ${IN_FLIGHT} in flight\n`);
  console.log('| settings | records at the end | new key (claim + complete) µs | replay µs |\n| --- | --- | --- | --- |');
  for (const each of (process.env.MODES ?? 'default,sql,cache,mmap').split(',')) {
    // One process per setting, so that none inherits another's heap or page cache.
    execFileSync(process.execPath, ['--conditions=source', '--import', 'tsx', fileURLToPath(import.meta.url), each], { stdio: 'inherit' });
  }
}
