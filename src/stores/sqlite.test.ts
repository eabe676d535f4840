import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import Database from 'better-sqlite3';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { defineStoreConformance } from '../testing/index.js';
import { type SqliteStore, sqliteStore } from './sqlite.js';

const dir = mkdtempSync(join(tmpdir(), 'oncely-sqlite-'));
const file = join(dir, 'conformance.db');
const opened: Database.Database[] = [];
const stores: SqliteStore[] = [];
const open = (path: string): Database.Database => {
  const db = new Database(path);
  opened.push(db);
  return db;
};
const make = (path: string, options: Partial<Parameters<typeof sqliteStore>[0]> = {}): SqliteStore => {
  const store = sqliteStore({ database: open(path), ...options });
  stores.push(store);
  return store;
};
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const newId = (): string => randomBytes(32).toString('hex');
const LONG = { fingerprint: 'v1:fp', leaseMs: 30_000, ttlMs: 60_000 };

afterAll(async () => {
  for (const store of stores) await store.close();
  for (const db of opened) if (db.open) db.close();
  rmSync(dir, { recursive: true, force: true });
});

defineStoreConformance(
  { describe, it, beforeAll, afterAll },
  { name: 'sqlite', store: () => make(file), anotherClient: () => make(file) },
);

describe('sqlite store', () => {
  it('configures WAL, NORMAL sync and a busy timeout on the connection', () => {
    const db = open(join(dir, 'pragmas.db'));
    sqliteStore({ database: db });
    expect(db.pragma('journal_mode', { simple: true })).toBe('wal');
    expect(db.pragma('synchronous', { simple: true })).toBe(1);
    expect(db.pragma('busy_timeout', { simple: true })).toBe(5000);
  });

  it('uses the table option and indexes expires_at', async () => {
    const db = open(join(dir, 'table.db'));
    const store = sqliteStore({ database: db, table: 'my_keys', purgeIntervalMs: 0 });
    expect(store.table).toBe('my_keys');
    const id = newId();
    const claim = await store.claim(id, LONG);
    expect(claim.status).toBe('acquired');
    expect(db.prepare('SELECT count(*) AS n FROM my_keys WHERE id = ?').get(id)).toEqual({ n: 1 });
    const indexes = db.prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'my_keys'").all();
    expect(indexes).toContainEqual({ name: 'my_keys_expires_at' });
    expect(db.prepare("SELECT count(*) AS n FROM sqlite_master WHERE name = 'oncely_records'").get()).toEqual({ n: 0 });
  });

  it('rejects a table name that is not a plain identifier', () => {
    const db = open(join(dir, 'bad.db'));
    expect(() => sqliteStore({ database: db, table: 'x"; DROP TABLE y; --' })).toThrow(/table name/);
  });

  it('purges expired records in the background, and close() stops the timer', async () => {
    const db = open(join(dir, 'timer.db'));
    const store = sqliteStore({ database: db, purgeIntervalMs: 30, purgeBatch: 2 });
    for (let i = 0; i < 5; i++) {
      const id = newId();
      const claim = await store.claim(id, LONG);
      if (claim.status !== 'acquired') throw new Error('expected acquired');
      await store.complete(id, claim.token, 'x', 20);
    }
    const count = () => (db.prepare('SELECT count(*) AS n FROM oncely_records').get() as { n: number }).n;
    expect(count()).toBe(5);
    await sleep(200);
    expect(count()).toBe(0);
    await store.close();
    const id = newId();
    const claim = await store.claim(id, LONG);
    if (claim.status !== 'acquired') throw new Error('expected acquired');
    await store.complete(id, claim.token, 'x', 10);
    await sleep(150);
    expect(count()).toBe(1);
  });

  it('keeps records across reopening the file', async () => {
    const path = join(dir, 'reopen.db');
    const db = open(path);
    const store = sqliteStore({ database: db });
    const id = newId();
    const busy = newId();
    const claim = await store.claim(id, LONG);
    if (claim.status !== 'acquired') throw new Error('expected acquired');
    expect(await store.complete(id, claim.token, '{"status":201}', 60_000)).toBe(true);
    const held = await store.claim(busy, LONG);
    if (held.status !== 'acquired') throw new Error('expected acquired');
    await store.close();
    db.close();

    const again = make(path);
    const replay = await again.claim(id, LONG);
    expect(replay).toMatchObject({ status: 'completed', record: { outcome: '{"status":201}' } });
    expect(await again.claim(busy, LONG)).toMatchObject({ status: 'in_progress', leaseUntil: held.leaseUntil });
    expect(await again.complete(busy, held.token, 'done', 60_000)).toBe(true);
  });

  it('runs a claim inside a transaction the caller already opened', async () => {
    const db = open(join(dir, 'inbox.db'));
    const store = sqliteStore({ database: db, purgeIntervalMs: 0 });
    const id = newId();
    db.exec('BEGIN');
    const claim = await store.claim(id, LONG);
    db.exec('ROLLBACK');
    expect(claim.status).toBe('acquired');
    expect(await store.get(id)).toBeNull();
  });

  it('gives exactly one winner per id among several processes claiming on one file', async () => {
    const path = join(dir, 'processes.db');
    make(path); // create the table before the children race
    const ids = Array.from({ length: 200 }, newId);
    const script = join(dir, 'child.mjs');
    const storeUrl = pathToFileURL(resolve('src/stores/sqlite.ts')).href;
    const sqliteUrl = pathToFileURL(resolve('node_modules/better-sqlite3/lib/index.js')).href;
    writeFileSync(
      script,
      `import Database from ${JSON.stringify(sqliteUrl)};
import { sqliteStore } from ${JSON.stringify(storeUrl)};
const store = sqliteStore({ database: new Database(process.argv[2]), purgeIntervalMs: 0 });
const ids = JSON.parse(process.argv[3]);
process.stdout.write('ready\\n');
process.stdin.once('data', async () => {
  const out = [];
  for (const id of ids) out.push((await store.claim(id, { fingerprint: 'fp', leaseMs: 30000, ttlMs: 60000 })).status);
  process.stdout.write(JSON.stringify(out) + '\\n');
  process.exit(0);
});
`,
    );
    const children = Array.from({ length: 6 }, () =>
      spawn(process.execPath, ['--conditions=source', '--import', 'tsx', script, path, JSON.stringify(ids)], {
        cwd: resolve('.'),
        stdio: ['pipe', 'pipe', 'inherit'],
      }),
    );
    const lines = children.map((child) => {
      let buffer = '';
      const waiters: Array<(line: string) => void> = [];
      const queue: string[] = [];
      child.stdout.on('data', (chunk: Buffer) => {
        buffer += chunk.toString();
        let nl = buffer.indexOf('\n');
        while (nl >= 0) {
          const line = buffer.slice(0, nl);
          buffer = buffer.slice(nl + 1);
          const waiter = waiters.shift();
          if (waiter) waiter(line);
          else queue.push(line);
          nl = buffer.indexOf('\n');
        }
      });
      return (): Promise<string> =>
        new Promise((resolveLine) => {
          const line = queue.shift();
          if (line !== undefined) resolveLine(line);
          else waiters.push(resolveLine);
        });
    });
    expect(await Promise.all(lines.map((next) => next()))).toEqual(children.map(() => 'ready'));
    for (const child of children) child.stdin.write('go\n');
    const results = (await Promise.all(lines.map((next) => next()))).map((line) => JSON.parse(line) as string[]);
    for (let i = 0; i < ids.length; i++) {
      const statuses = results.map((r) => r[i]);
      expect(statuses.filter((s) => s === 'acquired'), `id ${i}: ${statuses.join(',')}`).toHaveLength(1);
      expect(statuses.filter((s) => s === 'in_progress')).toHaveLength(children.length - 1);
    }
  }, 60_000);
});
