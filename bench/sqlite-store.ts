/**
 * The SQLite store alone, in-process: CPU µs per new key (claim + complete)
 * and per replay (claim of a completed key), 50 operations in flight as
 * under HTTP load, on a fresh file, after a warm-up of 20,000 keys. Compares
 * page-cache settings side by side (one process each, in turn):
 *
 *   node --conditions=source --import tsx bench/sqlite-store.ts
 *   MODES=default,cache,mmap ROUNDS=3 N=20000
 *
 * - default: the store's own settings (WAL, synchronous=NORMAL, SQLite's default cache)
 * - cache: `PRAGMA cache_size = -65536` (64 MiB of page cache)
 * - mmap: `PRAGMA mmap_size = 268435456` (reads through a 256 MiB memory map)
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
  await miss();
  const misses: number[] = [];
  const replays: number[] = [];
  for (let r = 0; r < ROUNDS; r++) misses.push(await miss());
  for (let r = 0; r < ROUNDS; r++) replays.push(await replay());
  const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!.toFixed(1);
  console.log(`| ${mode} | ${ids.length} | ${median(misses)} | ${median(replays)} |`);
  await store.close();
  db.close();
  rmSync(dir, { recursive: true, force: true });
}

const mode = process.argv[2];
if (mode) await measure(mode);
else {
  console.log(`SQLite store alone: CPU µs per operation, median of ${ROUNDS} rounds of ${N}, ${IN_FLIGHT} in flight\n`);
  console.log('| settings | records at the end | new key (claim + complete) µs | replay µs |\n| --- | --- | --- | --- |');
  for (const each of (process.env.MODES ?? 'default,cache,mmap').split(',')) {
    // One process per setting, so that none inherits another's heap or page cache.
    execFileSync(process.execPath, ['--conditions=source', '--import', 'tsx', fileURLToPath(import.meta.url), each], { stdio: 'inherit' });
  }
}
